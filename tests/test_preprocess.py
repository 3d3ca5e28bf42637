"""preprocess_image gives the pixels transformers' CLIPImageProcessor gives (its PIL path, SD/IP-Adapter defaults)."""

import numpy as np
import pytest
import torch
from PIL import Image

from minipa.preprocess import ImageInputError, preprocess_image

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def processor():
    return transformers.CLIPImageProcessor(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, do_convert_rgb=True,
        resample=3, do_center_crop=True, do_normalize=True, do_rescale=True,  # 3 = PIL bicubic
    )


def picture(width, height, channels=3, seed=0):
    """Noise over smooth gradients: both sharp and flat regions for the bicubic filter."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    planes = [x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), ((x + y) % 64) * 4, 255 - (x * y) % 256]
    base = np.stack(planes[:channels], -1)
    noisy = base + rng.normal(0, 40, (height, width, channels))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def rgba_picture(width, height):
    pixels = picture(width, height, 4, seed=3)
    pixels[..., 3] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]  # from transparent to opaque
    return Image.fromarray(pixels, "RGBA")


CASES = {
    "square": lambda: Image.fromarray(picture(300, 300)),
    "landscape": lambda: Image.fromarray(picture(640, 427)),
    "portrait": lambda: Image.fromarray(picture(333, 500)),
    "already_224_short_edge": lambda: Image.fromarray(picture(224, 301)),
    "odd_crop_offsets": lambda: Image.fromarray(picture(451, 257)),
    "rgba": lambda: rgba_picture(320, 240),
    "grayscale": lambda: Image.fromarray(picture(260, 390, 3)[..., 0], "L"),
    "grayscale_alpha": lambda: rgba_picture(200, 250).convert("LA"),
    "palette": lambda: Image.fromarray(picture(256, 300)).convert("P", palette=Image.Palette.ADAPTIVE),
    "tiny_7x5": lambda: Image.fromarray(picture(7, 5)),
    "tiny_1x1": lambda: Image.fromarray(picture(1, 1)),
    "upscaled_small": lambda: Image.fromarray(picture(100, 60)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_pixels_equal_clip_image_processor(processor, name):
    image = CASES[name]()
    expected = processor(images=image, return_tensors="pt")["pixel_values"]
    got = preprocess_image(image)
    assert got.shape == expected.shape == (1, 3, 224, 224) and got.dtype == torch.float32
    assert (got - expected).abs().max() <= 1e-5


def test_paths_arrays_and_tensors_give_the_same_pixels(processor, tmp_path):
    pixels = picture(300, 200)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    expected = processor(images=Image.fromarray(pixels), return_tensors="pt")["pixel_values"]
    from_array = processor(images=pixels, return_tensors="pt")["pixel_values"]  # transformers' own numpy path
    assert (from_array - expected).abs().max() <= 1e-5
    as_tensor = torch.from_numpy(pixels).permute(2, 0, 1)  # (C, H, W) uint8
    batch = preprocess_image([tmp_path / "a.png", str(tmp_path / "a.png"), pixels, as_tensor, as_tensor.float() / 255])
    assert batch.shape == (5, 3, 224, 224)
    assert all((row - expected[0]).abs().max() <= 1e-5 for row in batch)
    assert torch.equal(preprocess_image(as_tensor[None]), batch[3:4])  # a (B, C, H, W) batch


def test_sixteen_bit_image_is_scaled_not_clipped(processor):
    deep = (picture(240, 240)[..., 0].astype(np.uint16) * 257)  # 8-bit values spread over 16 bits
    image16 = Image.fromarray(deep)
    assert image16.mode == "I;16"
    expected = processor(images=Image.fromarray((deep // 257).astype(np.uint8), "L"), return_tensors="pt")["pixel_values"]
    assert (preprocess_image(image16) - expected).abs().max() <= 1e-5


def test_non_image_file_is_a_clear_error(tmp_path):
    (tmp_path / "notes.png").write_text("this is not a picture")
    with pytest.raises(ImageInputError, match="notes.png: not an image file"):
        preprocess_image(tmp_path / "notes.png")
    with pytest.raises(ImageInputError, match="no such image file"):
        preprocess_image(tmp_path / "missing.jpg")


def test_zero_sized_image_is_a_clear_error():
    with pytest.raises(ImageInputError, match=r"image is empty \(0×5 pixels\)"):
        preprocess_image(Image.new("RGB", (0, 5)))
    with pytest.raises(ImageInputError, match="empty"):
        preprocess_image(np.zeros((0, 4, 3), dtype=np.uint8))


def test_bad_arrays_and_types_are_clear_errors():
    with pytest.raises(ImageInputError, match=r"should be \(H, W\), \(H, W, 3\) or \(H, W, 4\)"):
        preprocess_image(np.zeros((8, 8, 2), dtype=np.uint8))
    with pytest.raises(ImageInputError, match=r"values in \[0, 1\]"):
        preprocess_image(np.full((8, 8, 3), 2.0))
    with pytest.raises(ImageInputError, match="expected a PIL image"):
        preprocess_image(42)
    with pytest.raises(ImageInputError, match="empty list"):
        preprocess_image([])
