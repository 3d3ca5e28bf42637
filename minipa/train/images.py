"""Your own images and captions, for `minipa train-adapter`: two layouts, checked before training starts.

    photos/                          a folder: every image with a caption file of the same name beside it
      cat.png   cat.txt              ("a cat on a sofa"); subfolders are read too
      dog.jpg   dog.txt
    data.json                        the official training script's layout: a JSON list of records,
      [{"image_file": "cat.png", "text": "a cat on a sofa"}, …]   image_file relative to an image root
    data.jsonl                       the same records, one per line

Every image is read twice over for one training example (`ImageCaptions.load`):
- for the VAE, as SD was trained: RGB, the shorter side resized to the resolution (bilinear, with PIL, as the
  official script's torchvision `Resize`), the centre cropped square (top = (H − R) // 2, as diffusers'
  `VaeImageProcessor` crops; torchvision's `CenterCrop` rounds odd margins half to even instead), [0, 255] → [-1, 1];
- for the image encoder, CLIP's own preprocessing (`minipa.preprocess.preprocess_image`), as at inference.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from minipa.preprocess import center_crop, load_image, preprocess_image, resize_shortest_edge, to_rgb

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class DatasetError(ValueError):
    """Training data that cannot be used as it is; the message names the file."""


@dataclass(frozen=True)
class Example:
    image: Path
    caption: str


class ImageCaptions:
    """A checked list of (image file, caption) pairs, and the tensors a training step reads from them."""

    def __init__(self, examples: Sequence[Example], source: Path):
        self.examples, self.source = list(examples), source

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def captions(self) -> list[str]:
        return [e.caption for e in self.examples]

    def load(self, index: Sequence[int], resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Images `index` → SD pixels (B, 3, R, R) in [-1, 1] for the VAE, and CLIP pixels (B, 3, 224, 224)."""
        images = [to_rgb(load_image(self.examples[i].image), str(self.examples[i].image)) for i in index]
        return torch.stack([sd_pixels(image, resolution) for image in images]), preprocess_image(images)


def sd_pixels(image: Image.Image, resolution: int) -> torch.Tensor:
    """An RGB image → (3, R, R) in [-1, 1]: shorter side to R (bilinear), centre crop, the VAE's range."""
    resized = resize_shortest_edge(image, resolution, resample=Image.Resampling.BILINEAR)
    pixels = center_crop(np.asarray(resized), resolution)  # (R, R, 3) uint8
    x = torch.from_numpy(np.array(pixels)).permute(2, 0, 1).float()  # (3, R, R), a writable copy
    return x / 127.5 - 1


def read_dataset(path: str | Path, image_root: str | Path | None = None, allow_empty_captions: bool = False) -> ImageCaptions:
    """A folder of images with .txt captions, or a .json/.jsonl list of {"image_file", "text"} records (image files
    relative to `image_root`, by default the list's folder). Every image is opened and checked here, so that bad
    data stops the run before any model is loaded. A missing or blank caption is an error, unless
    `allow_empty_captions` (the image then trains with the empty caption)."""
    path = Path(path)
    if path.is_dir():
        if image_root is not None:
            raise DatasetError(f"{path}: an image root is for a .json/.jsonl list of records, not for a folder of images")
        examples = _read_folder(path, allow_empty_captions)
    elif path.suffix in (".json", ".jsonl") and path.is_file():
        examples = _read_records(path, Path(image_root) if image_root is not None else path.parent, allow_empty_captions)
    else:
        raise DatasetError(f"{path}: expected a folder of images with .txt captions, or a .json/.jsonl file of "
                           f'{{"image_file": …, "text": …}} records' + ("" if path.exists() else " (it does not exist)"))
    if not examples:
        raise DatasetError(f"{path}: no images found (image files end in {', '.join(IMAGE_SUFFIXES)})")
    for example in examples:
        check_image(example.image)
    return ImageCaptions(examples, path)


def _read_folder(folder: Path, allow_empty: bool) -> list[Example]:
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    examples = []
    for image in images:
        caption_file = image.with_suffix(".txt")
        caption = _read_text(caption_file) if caption_file.is_file() else None
        examples.append(Example(image, _caption(caption, allow_empty, f"{image}: no caption: expected {caption_file.name} beside it")))
    return examples


def _read_records(path: Path, root: Path, allow_empty: bool) -> list[Example]:
    """The official layout: records with "image_file" (relative to `root`) and "text"."""
    examples = []
    for where, record in _records(path):
        if not isinstance(record, dict) or not isinstance(record.get("image_file"), str) or not record["image_file"]:
            raise DatasetError(f'{path}: {where} has no "image_file" (expected {{"image_file": "cat.png", "text": "a cat"}}), '
                               f"found {json.dumps(record)[:80]}")
        image = root / record["image_file"]
        if not image.is_file():
            raise DatasetError(f"{path}: {where}: no such image file {image}")
        text = record.get("text")
        if text is not None and not isinstance(text, str):
            raise DatasetError(f'{path}: {where}: "text" should be a string, found {json.dumps(text)[:80]}')
        examples.append(Example(image, _caption(text, allow_empty, f'{path}: {where} ({image.name}) has no caption ("text")')))
    return examples


def _records(path: Path) -> list[tuple[str, object]]:
    """(where, record) pairs from a JSON list ("record i") or a JSONL file ("line n")."""
    text = _read_text(path)
    if path.suffix == ".jsonl":
        return [(f"line {n}", _parse(line, path, f"line {n}: ")) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    records = _parse(text, path, "")
    if not isinstance(records, list):
        raise DatasetError(f"{path}: expected a JSON list of records, found {type(records).__name__}")
    return [(f"record {i}", record) for i, record in enumerate(records)]


def _parse(text: str, path: Path, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}: {where}not valid JSON ({err})") from None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path}: not UTF-8 text ({err})") from None


def _caption(text: str | None, allow_empty: bool, missing: str) -> str:
    if text is None or not text.strip():
        if not allow_empty:
            raise DatasetError(f"{missing} (pass --allow-empty-captions to train such images with the empty caption)")
        return ""
    return text.strip()


def check_image(path: Path) -> None:
    """Open the file and check its structure (PIL's `verify`: headers, and chunk checksums for PNG)."""
    try:
        with Image.open(path) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DatasetError(f"{path}: not an image file that PIL can read ({err})") from None
