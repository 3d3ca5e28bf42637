"""The tiny world's data: a synthetic, seeded "shapes" domain with captions (see `shapes.py`)."""

from minipa.data.shapes import (
    BACKGROUNDS, COLOURS, PATTERNS, SHAPES, SIZES, Scene, ShapesDataset, caption, clip_pixels, held_out_combos,
    render, tiny_tokenizer,
)

__all__ = [
    "BACKGROUNDS", "COLOURS", "PATTERNS", "SHAPES", "SIZES", "Scene", "ShapesDataset", "caption", "clip_pixels",
    "held_out_combos", "render", "tiny_tokenizer",
]
