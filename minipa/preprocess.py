"""Image → the (B, 3, 224, 224) tensor CLIP's image tower reads, exactly as `CLIPImageProcessor` makes it.

The steps (SD / IP-Adapter defaults), each as transformers does it without torchvision:
1. RGB:        transparency is composited onto white; grayscale, palette, CMYK … converted by PIL;
               16-bit images are scaled to 8 bits first (transformers would clip them to white);
2. resize:     bicubic, with PIL, on the 8-bit image, so the *shortest* edge becomes 224 and the
               long edge int(224 · long / short) (truncated, not rounded);
3. centre-crop 224×224: top = (H − 224) // 2, left = (W − 224) // 2;
4. scale:      x / 255 (computed in float64, then stored as float32);
5. normalise:  (x − mean) / std per channel, with CLIP's mean and std, in float32.
Doing step 2 with torch's bicubic instead of PIL's changes an IP-Adapter image by ~8e-4, so PIL it is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIZE = 224


class ImageInputError(ValueError):
    """An image argument minipa cannot read or convert."""


def load_image(path: str | Path) -> Image.Image:
    """Open an image file, with a clear error for a missing or non-image file."""
    path = Path(path)
    if not path.is_file():
        raise ImageInputError(f"{path}: no such image file")
    try:
        with Image.open(path) as image:
            image.seek(0)  # an animated image (GIF, WebP, …) is read as its first frame
            return image.copy()  # a copy owns its pixels, so the file can be closed
    except Image.DecompressionBombError as err:
        raise ImageInputError(f"{path}: refused, the image is implausibly large ({err})") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ImageInputError(f"{path}: not an image file that PIL can read ({err})") from None


def to_pil(image, what: str = "image") -> Image.Image:
    """A PIL image from a PIL image, a path, a numpy array (H, W[, C], uint8 or float in [0, 1])
    or a torch tensor (C, H, W, uint8 or float in [0, 1])."""
    if isinstance(image, (str, Path)):
        return load_image(image)
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, torch.Tensor):
        if image.ndim != 3:
            raise ImageInputError(f"{what}: a tensor image should be (C, H, W), got shape {tuple(image.shape)}")
        image = image.detach().cpu().permute(1, 2, 0).numpy()  # (C, H, W) → (H, W, C)
    if isinstance(image, np.ndarray):
        return _array_to_pil(image, what)
    raise ImageInputError(f"{what}: expected a PIL image, a path, a numpy array or a tensor, got {type(image).__name__}")


def _array_to_pil(array: np.ndarray, what: str) -> Image.Image:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise ImageInputError(f"{what}: an array image should be (H, W), (H, W, 3) or (H, W, 4), got shape {array.shape}")
    if np.issubdtype(array.dtype, np.floating):
        if array.size and (array.min() < 0 or array.max() > 1):
            raise ImageInputError(f"{what}: float images should hold values in [0, 1], found [{array.min():.3g}, {array.max():.3g}]")
        array = np.round(array * 255)
    elif array.dtype == np.uint16:
        array = np.round(array / 257.0)  # 16 bits → 8 bits: 65535 ↦ 255
    elif array.dtype != np.uint8:
        raise ImageInputError(f"{what}: unsupported array dtype {array.dtype} (use uint8, uint16 or float in [0, 1])")
    return Image.fromarray(array.astype(np.uint8))


def to_rgb(image: Image.Image, what: str = "image") -> Image.Image:
    """Step 1: an 8-bit RGB image; transparent pixels are composited onto white, as transformers does."""
    if image.width == 0 or image.height == 0:
        raise ImageInputError(f"{what}: the image is empty ({image.width}×{image.height} pixels)")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit grayscale (PNG, TIFF)
        image = _array_to_pil(np.asarray(image).astype(np.uint16), what)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def resize_shortest_edge(image: Image.Image, size: int = SIZE, resample=Image.Resampling.BICUBIC) -> Image.Image:
    """Step 2: resize (bicubic, unless `resample` says otherwise) so that min(H, W) = size; the long edge is
    truncated to an integer."""
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)
    new_size = (size, new_long) if w <= h else (new_long, size)  # PIL sizes are (width, height)
    return image.resize(new_size, resample=resample)


def center_crop(pixels: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Step 3: the central size×size window of (H, W, C) pixels."""
    h, w = pixels.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return pixels[top : top + size, left : left + size]


def preprocess_image(images, size: int = SIZE, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """One image or a list of them → (B, 3, size, size) float32, ready for CLIPVisionModelWithProjection."""
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        images = list(images)  # a (B, C, H, W) batch
    elif not isinstance(images, (list, tuple)):
        images = [images]
    if not images:
        raise ImageInputError("preprocess_image got an empty list of images")
    batch = []
    for i, image in enumerate(images):
        what = f"image {i}" if len(images) > 1 else "image"
        rgb = resize_shortest_edge(to_rgb(to_pil(image, what), what), size)
        pixels = center_crop(np.asarray(rgb), size)  # (size, size, 3) uint8
        x = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)  # step 4: [0, 255] → [0, 1]
        x = (x - np.array(mean, dtype=np.float32)) / np.array(std, dtype=np.float32)  # step 5
        batch.append(torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))))  # (H, W, 3) → (3, H, W)
    return torch.stack(batch)  # (B, 3, size, size)
