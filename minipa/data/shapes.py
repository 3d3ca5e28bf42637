"""The tiny world: coloured shapes on coloured backgrounds, with captions — a domain two CPU cores can learn.

Every image is a `Scene`: one shape (circle, square, triangle, star) of one colour, small or large,
somewhere on a plain background of another colour, and either plain or striped inside.
Its caption says everything *except* the position and the stripes:

    Scene(shape="star", colour="red", background="blue", size="small", pattern="striped", …)
    → "a small red star on a blue background"

The stripes are on purpose: an attribute no caption mentions, so a text prompt cannot ask for it
and only an image prompt can carry it (the paper's motivation for image prompts, in miniature).

Everything is a pure function of (seed, split, index): image i of a split is the same on every
machine and in every run, so the data never has to be stored. Splits:
- "train": scenes whose (shape, colour, background) combination is one of the training combinations;
- "test": new scenes (other random draws) of the training combinations — images never seen in training;
- "heldout": scenes of the `held_out_combos()` combinations, which training never shows at all.
A random seed chooses the draws, never the splits: the held-out combinations are the domain's, the same for
every seed, so `ShapesDataset("heldout", n, seed=s)` is held out from a world trained with any seed.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
import torch
from PIL import Image, ImageDraw

from minipa.preprocess import CLIP_MEAN, CLIP_STD, SIZE as CLIP_SIZE
from minipa.tokenizer import CONTEXT_LENGTH, END, START, CLIPTokenizer, bytes_to_unicode

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {"red": (215, 40, 40), "green": (40, 165, 60), "blue": (45, 80, 215), "yellow": (240, 205, 35), "purple": (140, 50, 170)}
BACKGROUNDS = tuple(COLOURS)  # the same palette; a shape never has its background's colour
SIZES = {"small": 0.25, "large": 0.33}  # the shape's radius as a fraction of the image side
PATTERNS = ("plain", "striped")  # never in a caption
RESOLUTION = 64  # pixels; the tiny VAE turns 64×64×3 into 8×8×4
SUPERSAMPLE = 4  # draw at 4× and average 4×4 blocks: anti-aliased edges, exactly reproducible
STRIPE_PERIOD = 16  # pixels at 64×64; the dark half of each period is the colour at STRIPE_SHADE brightness
STRIPE_SHADE = 0.45
SPLITS = ("train", "test", "heldout")
NUM_HELD_OUT = 8  # of the 4 × 5 × 4 = 80 (shape, colour, background) combinations
HELD_OUT_DRAW = 0  # which 8: a constant of the domain, not a seed


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    size: str
    pattern: str
    x: float  # centre, as a fraction of the image side
    y: float

    @property
    def caption(self) -> str:
        return caption(self.shape, self.colour, self.background, self.size)


def caption(shape: str, colour: str, background: str, size: str | None = None) -> str:
    """"a small red star on a blue background" (the size may be left out)."""
    size_word = f"{size} " if size else ""
    return f"a {size_word}{colour} {shape} on a {background} background"


def all_combos() -> list[tuple[str, str, str]]:
    return [(s, c, b) for s in SHAPES for c in COLOURS for b in BACKGROUNDS if b != c]


@lru_cache(maxsize=None)
def held_out_combos() -> tuple[tuple[str, str, str], ...]:
    """The (shape, colour, background) combinations that training never sees: a fixed draw of 8 of the 80,
    the same whatever random seed a dataset or a world uses (an evaluation's "held out" must be held out)."""
    combos = all_combos()
    order = np.random.default_rng([HELD_OUT_DRAW, 11]).permutation(len(combos))
    return tuple(combos[i] for i in sorted(order[:NUM_HELD_OUT]))


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), index])


def sample_scene(seed: int, split: str, index: int) -> Scene:
    """Scene `index` of `split`: a pure function of its arguments."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = _rng(seed, split, index)
    held_out = held_out_combos()
    combos = list(held_out) if split == "heldout" else [c for c in all_combos() if c not in held_out]
    shape, colour, background = combos[rng.integers(len(combos))]
    size = list(SIZES)[rng.integers(len(SIZES))]
    pattern = PATTERNS[rng.integers(len(PATTERNS))]
    margin = 1.15 * SIZES[size] + 0.02  # keep the whole shape (a star's points reach 1.15 radii) inside the image
    x, y = rng.uniform(margin, 1 - margin, size=2)
    return Scene(shape, colour, background, size, pattern, float(x), float(y))


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Polygon vertices (pixels) of a shape centred at (cx, cy) with radius r; None for the circle."""
    if shape == "square":
        h = 0.85 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":  # upright, equilateral, centred on its centroid
        angles = np.deg2rad([-90, 30, 150])
        return [(cx + 1.15 * r * np.cos(a), cy + 0.15 * r + 1.15 * r * np.sin(a)) for a in angles]
    if shape == "star":  # five points; inner radius 0.45 of the outer one
        angles = np.deg2rad(-90 + 36 * np.arange(10))
        radii = np.where(np.arange(10) % 2 == 0, 1.15 * r, 0.5 * r)
        return [(cx + rr * np.cos(a), cy + rr * np.sin(a)) for rr, a in zip(radii, angles)]
    return None


@lru_cache(maxsize=4)
def _stripes(big: int) -> np.ndarray:
    yy, xx = np.mgrid[0:big, 0:big]
    return (((xx + yy) // (STRIPE_PERIOD * SUPERSAMPLE // 2)) % 2 == 1).astype(np.float32)


def render(scene: Scene, resolution: int = RESOLUTION) -> np.ndarray:
    """A scene → (H, W, 3) uint8 pixels."""
    big = resolution * SUPERSAMPLE
    cx, cy, r = scene.x * big, scene.y * big, SIZES[scene.size] * big
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    outline = _outline(scene.shape, cx, cy, r)
    if outline is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon(outline, fill=255)
    inside = np.asarray(mask, dtype=np.float32) / 255  # (big, big) coverage
    dark = np.zeros_like(inside)
    if scene.pattern == "striped":  # diagonal stripes: the dark half of every period
        dark = inside * _stripes(big)

    def box(a):  # average SUPERSAMPLE×SUPERSAMPLE blocks: (big, big) → (resolution, resolution, 1)
        return a.reshape(resolution, SUPERSAMPLE, resolution, SUPERSAMPLE).mean(axis=(1, 3))[..., None]

    colour = np.array(COLOURS[scene.colour], dtype=np.float32)
    background = np.array(COLOURS[scene.background], dtype=np.float32)
    inside, dark = box(inside), box(dark)
    # pixel = colour where inside and light, shaded colour where inside and dark, background elsewhere
    pixels = (inside - dark) * colour + dark * STRIPE_SHADE * colour + (1 - inside) * background
    return np.round(pixels).astype(np.uint8)


class ShapesDataset(torch.utils.data.Dataset):
    """`length` scenes of one split. Item i: {"pixels": (3, 64, 64) in [-1, 1], "caption", "scene"}."""

    def __init__(self, split: str = "train", length: int = 10_000, seed: int = 0):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.split, self.length, self.seed = split, length, seed

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> Scene:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a {self.split} split of {self.length} scenes")
        return sample_scene(self.seed, self.split, index)

    def __getitem__(self, index: int) -> dict:
        scene = self.scene(index)
        return {"pixels": to_model_pixels(render(scene)), "caption": scene.caption, "scene": scene}

    def images(self) -> torch.Tensor:
        """Every image of the split, rendered once: (N, 64, 64, 3) uint8."""
        return torch.from_numpy(np.stack([render(self.scene(i)) for i in range(self.length)]))

    def scenes(self) -> list[Scene]:
        return [self.scene(i) for i in range(self.length)]


def to_model_pixels(images) -> torch.Tensor:
    """uint8 (…, H, W, 3) → float (…, 3, H, W) in [-1, 1], the VAE's input range."""
    x = torch.as_tensor(np.asarray(images)).float() / 127.5 - 1
    return x.movedim(-1, -3)


# ─── The same caption in other words ──────────────────────────────────────────────────────────────
#
# People do not type the caption form: they leave the size out ("a red circle on a blue background"), name
# the background first, or list the attributes. Training draws one *phrasing* of each image's caption per
# sample: a template (word order) and a set of attributes left out. Some templates never appear in training,
# so that an evaluation can measure how the model reads word orders it has not seen.


@dataclass(frozen=True)
class Template:
    """A word order, in three forms: both parts, the subject alone, the background alone. {a} is the subject
    with its article ("a small red star"), {s} without it ("small red star"), {bg} the background colour.
    `share`: how often training draws it (the shares of `TEMPLATES` sum to 1)."""

    full: str
    subject: str = "{a}"
    background: str = "on a {bg} background"
    share: float = 0.0


# Training names the background first in three ways ("with", a comma, both) and puts the shape's noun as late as
# the held-out orders do: each held-out order joins parts that training shows, in a way it does not. A text tower
# with learned positions read neither a comma before the subject nor a noun at a new position (HISTORY, recipe v14).
TEMPLATES = {  # what training draws from
    "caption": Template("{a} on a {bg} background", share=0.3),  # the caption form
    "with": Template("a {bg} background with {a}", background="a {bg} background", share=0.1),
    "list": Template("{s}, {bg} background", subject="{s}", background="{bg} background", share=0.1),
    "short": Template("{a} on {bg}", share=0.1),
    "bare": Template("{s} on a {bg} background", subject="{s}", share=0.1),
    "on_first": Template("on {bg}, {a}", background="on {bg}", share=0.1),
    "background_with": Template("{bg} background with {s}", subject="{s}", background="{bg} background", share=0.1),
    "with_comma": Template("a {bg} background, with {a}", background="a {bg} background", share=0.1),
}
HELD_OUT_TEMPLATES = {  # never in training: the evaluation's new phrasings, made of the same words
    "background_first": Template("on a {bg} background, {a}"),
    "with_after": Template("{a} with a {bg} background"),
    "list_background_first": Template("{bg} background, {s}", subject="{s}", background="{bg} background"),
}
ATTRIBUTES = ("shape", "colour", "background", "size")
OMISSIONS = {  # attributes left out → how often, given a template (the rates sum to 1)
    (): 0.4, ("size",): 0.25, ("background",): 0.1, ("size", "background"): 0.05, ("colour",): 0.05,
    ("shape",): 0.05, ("shape", "colour", "size"): 0.1,
}


def phrase(shape: str, colour: str, background: str, size: str, template: Template | str = "caption",
           omit: tuple[str, ...] = ()) -> str:
    """One phrasing of a scene's caption: phrase("star", "red", "blue", "small", "list", omit=("size",))
    → "red star, blue background". A shape left out becomes "shape"; the subject and the background cannot both go."""
    if isinstance(template, str):
        template = {**TEMPLATES, **HELD_OUT_TEMPLATES}[template]
    if bad := set(omit) - set(ATTRIBUTES):
        raise ValueError(f"omit: expected some of {ATTRIBUTES}, got {sorted(bad)}")
    words = [w for attribute, w in (("size", size), ("colour", colour)) if attribute not in omit]
    no_subject = {"shape", "colour", "size"} <= set(omit)
    if no_subject and "background" in omit:
        raise ValueError("a phrasing must keep the subject or the background")
    subject = " ".join(words + ["shape" if "shape" in omit else shape])
    form = template.background if no_subject else template.subject if "background" in omit else template.full
    return form.format(a=f"a {subject}", s=subject, bg=background)


@dataclass
class Phrasings:
    """Every phrasing of a set of scenes, for training: `texts` (P,) distinct strings, `attributes` (P, 4) the
    class index each string names (shape, colour, background, size; −1 where left out), `index` (N, K) the row
    of `texts` of phrasing k of scene n (k runs over templates × omissions), `probs` (K,) how often k is drawn."""

    texts: list[str]
    attributes: torch.Tensor
    index: torch.Tensor
    probs: torch.Tensor

    @classmethod
    def of(cls, scenes: list["Scene"], templates: dict[str, Template] | None = None) -> "Phrasings":
        templates = TEMPLATES if templates is None else templates
        kinds = [(t, omit) for t in templates.values() for omit in OMISSIONS]
        rows: dict[str, int] = {}  # text → its row
        attributes, by_combo = [], {}  # by_combo: (shape, colour, background, size) → the rows of its K phrasings
        for s in scenes:
            combo = (s.shape, s.colour, s.background, s.size)
            if combo not in by_combo:
                labels = attribute_labels(s)
                for t, omit in kinds:
                    text = phrase(*combo, t, omit)
                    if text not in rows:
                        rows[text] = len(rows)
                        attributes.append([-1 if a in omit else labels[a] for a in ATTRIBUTES])
                by_combo[combo] = [rows[phrase(*combo, t, omit)] for t, omit in kinds]
        shares = torch.tensor([t.share for t in templates.values()])
        shares = shares if shares.sum() > 0 else torch.ones(len(templates))  # templates without shares: uniform
        probs = (shares[:, None] / shares.sum() * torch.tensor(list(OMISSIONS.values()))[None, :]).flatten()  # template-major, as kinds
        return cls(list(rows), torch.tensor(attributes), torch.tensor([by_combo[(s.shape, s.colour, s.background, s.size)]
                                                                       for s in scenes]), probs)

    def whole(self) -> "Phrasings":
        """The same phrasings, drawn only among the kinds that name every attribute (other word orders)."""
        names_all = (self.attributes[self.index] >= 0).all(dim=-1).all(dim=0)  # (K,): no −1 for any scene
        probs = self.probs * names_all
        return replace(self, probs=probs / probs.sum())


def attribute_labels(scene: "Scene") -> dict[str, int]:
    """The class index of each captioned attribute: {"shape": 3, "colour": 0, "background": 2, "size": 0}."""
    return {"shape": SHAPES.index(scene.shape), "colour": list(COLOURS).index(scene.colour),
            "background": BACKGROUNDS.index(scene.background), "size": list(SIZES).index(scene.size)}


# ─── What the tiny CLIP image tower sees ─────────────────────────────────────────────────────────


@lru_cache(maxsize=None)
def _bicubic_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """(size_out, size_in): PIL's bicubic resize along one axis, as a matrix (read off PIL itself)."""
    rows = []
    for j in range(size_in):
        unit = np.zeros((1, size_in), dtype=np.float32)
        unit[0, j] = 1.0
        resized = Image.fromarray(unit, mode="F").resize((size_out, 1), resample=Image.Resampling.BICUBIC)
        rows.append(np.asarray(resized)[0])
    return torch.from_numpy(np.stack(rows, axis=1).astype(np.float32))  # (size_out, size_in)


def clip_pixels(images: torch.Tensor, size: int = CLIP_SIZE) -> torch.Tensor:
    """uint8 (B, h, w, 3) square images → (B, 3, size, size): `preprocess_image` for a batch, in torch.
    The same as `clip_normalise(clip_resize(images, size))`."""
    return clip_normalise(clip_resize(images, size))


def clip_resize(images: torch.Tensor, size: int = CLIP_SIZE) -> torch.Tensor:
    """uint8 (B, h, h, 3) → uint8 (B, 3, size, size): PIL's bicubic resize, for a batch, in torch.

    PIL resizes an 8-bit image in two passes (width, then height), rounding to 8 bits after each;
    bicubic weights are a fixed matrix R, so each pass is one matmul: Y = round(R · X). Square images
    need no crop. Matches `preprocess_image` to within two 8-bit steps (PIL rounds its fixed-point
    weights; a test checks it), and runs a training batch in milliseconds instead of one PIL call per
    image. The result is 8-bit, so a training set can keep its resized images (CLIP training does).
    """
    images = torch.as_tensor(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"clip_resize/clip_pixels expect square uint8 images (B, h, h, 3), got {tuple(images.shape)}")
    R = _bicubic_matrix(images.shape[1], size)  # (size, h)
    out = torch.empty(len(images), 3, size, size, dtype=torch.uint8)
    for i in range(0, len(images), 256):  # in slices, so the float copies stay small (a training set has 10,000)
        x = images[i : i + 256].float().movedim(-1, 1)  # (b, 3, h, w)
        x = torch.matmul(x, R.T).round_().clamp_(0, 255)  # width pass: (b, 3, h, size)
        out[i : i + 256] = torch.matmul(R, x).round_().clamp_(0, 255)  # height pass: (b, 3, size, size), stored as uint8
    return out


def clip_normalise(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) → float, with CLIP's mean and std per channel."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return pixels.float().div_(255).sub_(mean).div_(std)  # in place: the same numbers, a third of the time at 224²


# ─── The tiny world's tokenizer ──────────────────────────────────────────────────────────────────


def caption_words() -> list[str]:
    words = {"a", "on", "with", "background", "shape", *SHAPES, *COLOURS, *SIZES}  # every word of every template
    return sorted(words)


def unknown_words(text: str) -> list[str]:
    """The words of `text` the tiny world never says (each once, in order): the tiny model reads them as noise."""
    known = set(caption_words())
    return list(dict.fromkeys(w for w in re.findall(r"[a-z]+", text.lower()) if w not in known))


def vocabulary_line() -> str:
    """What the tiny world's captions are made of, in one line."""
    return (f"shapes {', '.join(SHAPES)}; colours {', '.join(COLOURS)}; sizes {', '.join(SIZES)}; "
            f"and 'background', 'shape', 'a', 'on', 'with' (e.g. \"a red circle on a blue background\", \"red star, green background\")")


def tiny_tokenizer(context_length: int = CONTEXT_LENGTH) -> CLIPTokenizer:
    """A CLIP BPE tokenizer with a vocabulary of ~600 tokens: every byte (so any text still
    tokenizes), one merge chain per caption word (so each word becomes one token), and the two
    special tokens last, as in CLIP (so <|endoftext|> has the highest id, which CLIP pools at).
    Prompts become `context_length` ids (SD 1.5: 77)."""
    byte_chars = list(bytes_to_unicode().values())
    vocab_list = byte_chars + [c + "</w>" for c in byte_chars]
    merges: list[tuple[str, str]] = []
    for word in caption_words():
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        merged = symbols[0]
        for nxt in symbols[1:]:
            if (merged, nxt) not in merges:
                merges.append((merged, nxt))
                vocab_list.append(merged + nxt)
            merged += nxt
    vocab_list = list(dict.fromkeys(vocab_list)) + [START, END]
    vocab = {token: i for i, token in enumerate(vocab_list)}
    return CLIPTokenizer(vocab, merges, context_length)


def caption_table(scenes: list[Scene]) -> tuple[list[str], torch.Tensor]:
    """Unique captions and, for each scene, the index of its caption: (captions, (N,) long)."""
    captions = sorted({s.caption for s in scenes})
    where = {c: i for i, c in enumerate(captions)}
    return captions, torch.tensor([where[s.caption] for s in scenes])


def scene_labels(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """Class indices per attribute, for the evaluation classifier: {"shape": (N,), …}."""
    return {
        "shape": torch.tensor([SHAPES.index(s.shape) for s in scenes]),
        "colour": torch.tensor([list(COLOURS).index(s.colour) for s in scenes]),
        "background": torch.tensor([BACKGROUNDS.index(s.background) for s in scenes]),
        "size": torch.tensor([list(SIZES).index(s.size) for s in scenes]),
        "pattern": torch.tensor([PATTERNS.index(s.pattern) for s in scenes]),
    }


def describe_domain() -> str:
    """One JSON line with the domain's vocabulary (for the model card and the checkpoints)."""
    return json.dumps({"shapes": SHAPES, "colours": list(COLOURS), "sizes": list(SIZES), "patterns": PATTERNS,
                       "held_out": held_out_combos(), "crc": zlib.crc32(repr(all_combos()).encode())})
