"""Image-prompt controls (minipa/image_prompt.py): regions, a negative image prompt, saved features and a step range
against diffusers on the tiny random SD-shaped world (both adapter formats); combining and the rest by their invariants."""

import numpy as np
import pytest
import torch
from conftest import diffusers_pipeline
from PIL import Image, ImageDraw
from test_pipeline import SIZE, assert_images_close, prompt_images, run_ours, run_theirs

import minipa
from minipa.cli import COMBINE_MODES as CLI_COMBINE_MODES
from minipa.cli import main as cli
from minipa.image_prompt import COMBINE_MODES, ImagePrompt, combine
from minipa.ip_adapter import mask_weights

ADAPTERS = ["ip_safetensors", "ip_plus"]


@pytest.fixture(scope="module")
def latents():
    return torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module", params=ADAPTERS)
def pair(request, tiny_world):
    """(minipa, diffusers) pipelines on the same files, for the base adapter and for Plus."""
    adapter = request.param
    return minipa.load_pipeline(tiny_world["model"], ip_adapter=tiny_world[adapter]), diffusers_pipeline(tiny_world, adapter=adapter)


@pytest.fixture(scope="module")
def ours(tiny_world):
    return minipa.load_pipeline(tiny_world["model"], ip_adapter=tiny_world["ip_safetensors"])


@pytest.fixture(scope="module")
def ours_plus(tiny_world):
    return minipa.load_pipeline(tiny_world["model"], ip_adapter=tiny_world["ip_plus"])


def masks(size=128):
    """Two regions of a square picture: a disc on the left, a slanted band on the right (grey levels, not just 0/255)."""
    left, right = Image.new("L", (size, size), 0), Image.new("RGB", (size, size), (0, 0, 0))
    ImageDraw.Draw(left).ellipse((5, 20, 70, 100), fill=200)
    ImageDraw.Draw(right).polygon([(60, 0), (size, 0), (size, size), (90, size)], fill=(255, 255, 255))
    return left, right


# ─── against diffusers ───────────────────────────────────────────────────────────────────────────


def test_regions_with_two_image_prompts_equal_diffusers(pair, latents):
    from diffusers.image_processor import IPAdapterMaskProcessor

    ours, theirs = pair
    a, b = prompt_images()
    theirs.set_ip_adapter_scale(0.8)
    mask_tensor = IPAdapterMaskProcessor().preprocess(list(masks()), height=SIZE, width=SIZE)  # (2, 1, H, W)
    expected = run_theirs(theirs, latents, ip_adapter_image=[[a, b]],
                          cross_attention_kwargs={"ip_adapter_masks": [mask_tensor.reshape(1, 2, SIZE, SIZE)]})
    assert_images_close(run_ours(ours, latents, ip_image=[a, b], ip_scale=0.8, ip_masks=list(masks())), expected)
    unmasked = run_ours(ours, latents, ip_image=[a, b], ip_scale=0.8)
    assert np.abs(unmasked - expected).max() > 1e-3, "the masks changed nothing: the test cannot tell regions apart"


def test_masks_are_preprocessed_and_resized_as_diffusers_does():
    from diffusers.image_processor import IPAdapterMaskProcessor

    ours = minipa.image_prompt.load_masks(list(masks()), 2, 48, 48)
    theirs = IPAdapterMaskProcessor().preprocess(list(masks()), height=48, width=48)[:, 0]
    assert torch.equal(ours, theirs)
    for queries, (h, w) in [(36, (6, 6)), (9, (3, 3)), (24, (4, 6))]:
        grid = torch.nn.functional.interpolate(ours[None], size=(h * 8, w * 8))[0]  # an h:w aspect ratio
        expected = torch.stack([IPAdapterMaskProcessor.downsample(m[None], 1, queries, 1)[0, :, 0] for m in grid])
        assert torch.equal(mask_weights(grid, queries), expected)


def test_negative_image_prompt_equals_diffusers(pair, latents):
    ours, theirs = pair
    a, b = prompt_images()
    plus = ours.ip_adapter.plus
    theirs.set_ip_adapter_scale(0.9)
    positive, _ = theirs.encode_image(a, "cpu", 1, output_hidden_states=plus)
    negative, _ = theirs.encode_image(b, "cpu", 1, output_hidden_states=plus)
    expected = run_theirs(theirs, latents, ip_adapter_image_embeds=[torch.stack([negative, positive])])
    got = run_ours(ours, latents, ip_image=a, ip_scale=0.9, negative_ip_image=b)
    assert_images_close(got, expected)
    assert np.abs(got - run_ours(ours, latents, ip_image=a, ip_scale=0.9)).max() > 1e-3, "the negative image changed nothing"


def test_saved_features_equal_encoding_on_the_fly_and_diffusers_embeds(pair, latents, tmp_path):
    ours, theirs = pair
    a, b = prompt_images()
    on_the_fly = run_ours(ours, latents, ip_image=[a, b], ip_scale=0.7)
    path = ours.encode_image_prompt([a, b]).save(tmp_path / "embeds.safetensors")
    from_file = run_ours(ours, latents, ip_embeds=path, ip_scale=0.7)
    assert np.array_equal(from_file, on_the_fly)  # exact: the same tensors, read back

    saved = ImagePrompt.load(path)
    theirs.set_ip_adapter_scale(0.7)
    negative = saved.negative.expand_as(saved.features)  # one "no image" row, one per image prompt for diffusers
    expected = run_theirs(theirs, latents, ip_adapter_image_embeds=[torch.stack([negative, saved.features])])
    assert_images_close(from_file, expected)


def test_step_range_end_equals_diffusers_cutoff_callback(pair, latents):
    from diffusers.callbacks import IPAdapterScaleCutoffCallback

    ours, theirs = pair
    image, _ = prompt_images()
    theirs.set_ip_adapter_scale(1.0)
    expected = run_theirs(theirs, latents, ip_adapter_image=image, callback_on_step_end=IPAdapterScaleCutoffCallback(cutoff_step_ratio=0.25))
    got = run_ours(ours, latents, ip_image=image, ip_scale=1.0, ip_steps=(0.0, 0.25))
    assert_images_close(got, expected)
    assert np.abs(got - run_ours(ours, latents, ip_image=image, ip_scale=1.0)).max() > 1e-3, "the cutoff changed nothing"


# ─── invariants where no reference exists ────────────────────────────────────────────────────────


def test_full_step_range_is_no_range_and_an_empty_one_is_plain_sd(tiny_world, ours, latents):
    image, _ = prompt_images()
    every = run_ours(ours, latents, ip_image=image, ip_scale=1.0)
    assert np.array_equal(run_ours(ours, latents, ip_image=image, ip_scale=1.0, ip_steps=(0, 1)), every)
    plain = run_ours(minipa.load_pipeline(tiny_world["model"]), latents)
    assert np.array_equal(run_ours(ours, latents, ip_image=image, ip_scale=1.0, ip_steps=(1, 1)), plain)
    assert np.abs(every - plain).max() > 1e-3


@pytest.mark.parametrize("mode", COMBINE_MODES[1:])
def test_combining_one_image_is_that_image(ours, latents, mode):
    image, _ = prompt_images()
    alone = run_ours(ours, latents, ip_image=image, ip_scale=1.0)
    weights = [1.0] if mode in ("add", "subtract") else [0.3]  # a mean of one is itself whatever its weight
    np.testing.assert_allclose(run_ours(ours, latents, ip_image=image, ip_scale=1.0, ip_combine=mode, ip_weights=weights), alone, atol=1e-6)


@torch.inference_mode()
def test_add_sums_the_features_for_the_base_adapter_and_the_tokens_for_plus(ours, ours_plus):
    a, b = prompt_images()
    prompt = ours.encode_image_prompt([a, b])
    summed = ours.ip_adapter.image_tokens(prompt.features.sum(0, keepdim=True))  # image_proj(e_a + e_b)
    torch.testing.assert_close(ours._image_tokens(prompt, "add", None, 1, False), summed, rtol=0, atol=1e-6)

    prompt = ours_plus.encode_image_prompt([a, b])
    concat = ours_plus._image_tokens(prompt, "concat", None, 1, False)  # [tokens of a, tokens of b]
    n = concat.shape[1] // 2
    torch.testing.assert_close(ours_plus._image_tokens(prompt, "add", [1, 1], 1, False), concat[:, :n] + concat[:, n:], rtol=0, atol=1e-6)


def test_the_combinations_follow_their_formulas():
    x, w = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), [0.5, 2.0, 1.5]
    wx = torch.tensor(w, dtype=torch.float64)[:, None] * x
    torch.testing.assert_close(combine(x, "add", w), wx.sum(0, keepdim=True))
    torch.testing.assert_close(combine(x, "subtract", w), wx[:1] - wx[1:].mean(0, keepdim=True))
    torch.testing.assert_close(combine(x, "average", w), wx.sum(0, keepdim=True) / 4.0)
    unit = x / x.norm(dim=1, keepdim=True)
    expected = (torch.tensor(w, dtype=torch.float64)[:, None] * unit).sum(0, keepdim=True) / 4.0 * x.norm(dim=1).mean()
    torch.testing.assert_close(combine(x, "norm_average", w), expected)
    assert combine(x, "concat") is x


def test_an_all_ones_mask_is_no_mask(ours, latents):
    image, _ = prompt_images()
    np.testing.assert_allclose(run_ours(ours, latents, ip_image=image, ip_scale=1.0, ip_masks=np.ones((SIZE, SIZE))),
                               run_ours(ours, latents, ip_image=image, ip_scale=1.0), atol=1e-6)


# ─── bad input: a clear error naming the argument ────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"ip_masks": [np.ones((SIZE, SIZE))]}, "ip_masks: expected 2 mask(s)"),
        ({"ip_masks": [np.ones((SIZE, 2 * SIZE))] * 2}, "aspect ratio"),
        ({"ip_masks": [np.ones((2, SIZE, SIZE))] * 2}, "2-d"),
        ({"ip_steps": (-0.1, 0.5)}, "ip_steps: expected 0 ≤ start ≤ end ≤ 1"),
        ({"ip_steps": (0.6, 0.5)}, "ip_steps: expected 0 ≤ start ≤ end ≤ 1"),
        ({"ip_steps": 0.5}, "ip_steps: expected (start, end)"),
        ({"ip_combine": "mean"}, "ip_combine: expected one of"),
        ({"ip_combine": "average", "ip_weights": [1.0]}, "ip_weights: expected 2"),
        ({"ip_weights": [1.0, 2.0]}, "ip_weights: 'concat'"),
        ({"ip_combine": "average", "ip_weights": [1.0, -1.0]}, "positive sum"),
        ({"negative_ip_image": [Image.new("RGB", (8, 8))] * 3}, "negative_ip_image: expected 1 image or 2"),
    ],
)
def test_bad_image_prompt_controls_are_clear_errors(ours, kwargs, words):
    with pytest.raises(ValueError) as err:
        ours("x", ip_image=list(prompt_images()), num_steps=1, height=SIZE, width=SIZE, progress=False, **kwargs)
    assert words in str(err.value)


def test_features_for_another_adapter_or_encoder_are_refused(ours, ours_plus, tmp_path):
    image, _ = prompt_images()
    plus_file = ours_plus.encode_image_prompt(image).save(tmp_path / "plus.safetensors")
    with pytest.raises(ValueError, match="for IP-Adapter Plus; the loaded adapter reads image embeds"):
        ours("x", ip_embeds=plus_file, num_steps=1, progress=False)
    other = ours.encode_image_prompt(image)
    other.encoder = other.encoder.replace("Σ|w|=", "Σ|w|=9")
    with pytest.raises(ValueError, match="made with another image encoder"):
        ours("x", ip_embeds=other, num_steps=1, progress=False)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="not a readable .safetensors"):
        ours("x", ip_embeds=tmp_path / "junk.safetensors", num_steps=1, progress=False)
    with pytest.raises(ValueError, match="give one of them"):
        ours("x", ip_image=image, ip_embeds=plus_file, num_steps=1, progress=False)
    with pytest.raises(ValueError, match="ip_masks was given without an image prompt"):
        ours("x", ip_masks=np.ones((8, 8)), num_steps=1, progress=False)


def test_the_encoder_fingerprint_is_the_same_in_every_dtype(ours):
    from minipa.image_prompt import encoder_fingerprint

    name = encoder_fingerprint(ours.image_encoder)
    for dtype in (torch.float16, torch.bfloat16):
        assert encoder_fingerprint(ours.image_encoder.to(dtype)) == name
    ours.image_encoder.float()


# ─── the command line ────────────────────────────────────────────────────────────────────────────


def test_cli_encodes_once_and_generates_from_the_file(tiny_world, tmp_path):
    assert CLI_COMBINE_MODES == COMBINE_MODES
    a, b = prompt_images()
    a.save(tmp_path / "a.png")
    b.save(tmp_path / "b.png")
    masks()[0].save(tmp_path / "left.png")
    common = ["--model", str(tiny_world["model"]), "--ip-adapter", str(tiny_world["ip_safetensors"])]
    embeds = tmp_path / "embeds.safetensors"
    assert cli(["encode-image", str(tmp_path / "a.png"), "--negative-image-prompt", str(tmp_path / "b.png"), "--out", str(embeds), *common]) == 0
    run = ["generate", "--prompt", "x", "--steps", "2", "--no-progress", "--ip-steps", "0", "0.5", "--ip-mask", str(tmp_path / "left.png"), *common]
    assert cli([*run, "--ip-embeds", str(embeds), "--out", str(tmp_path / "from_file.png")]) == 0
    assert cli([*run, "--image-prompt", str(tmp_path / "a.png"), "--negative-image-prompt", str(tmp_path / "b.png"),
                "--out", str(tmp_path / "on_the_fly.png")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "from_file.png")), np.asarray(Image.open(tmp_path / "on_the_fly.png")))
    assert cli(["encode-image", str(tmp_path / "a.png"), "--out", str(embeds), *common]) == 1  # exists: refused


def test_cli_combines_with_weights(tiny_world, tmp_path):
    a, b = prompt_images()
    a.save(tmp_path / "a.png")
    b.save(tmp_path / "b.png")
    args = ["generate", "--prompt", "x", "--steps", "2", "--no-progress", "--model", str(tiny_world["model"]),
            "--ip-adapter", str(tiny_world["ip_safetensors"]), "--image-prompt", str(tmp_path / "a.png"),
            "--image-prompt", str(tmp_path / "b.png"), "--ip-combine", "average", "--ip-weights", "2", "1", "--out", str(tmp_path / "o.png")]
    assert cli(args) == 0
    assert '"ip_combine": "average"' in (tmp_path / "o.json").read_text()
