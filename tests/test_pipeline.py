"""End to end: minipa.load_pipeline vs diffusers' StableDiffusionPipeline + load_ip_adapter on the same
files and the same starting latents; final "np" images must agree within 1e-4."""

import json

import numpy as np
import pytest
import torch
from conftest import diffusers_pipeline
from PIL import Image, ImageDraw

import minipa
from minipa.cli import main as cli
from minipa.ip_adapter import DecoupledCrossAttention

STEPS = 4
SIZE = 64  # the tiny UNet's sample_size 8 × the VAE's factor 8
PROMPT = "a photo of a red circle on a blue background, highly detailed"
BLOCKS = {"down": {"block_2": [0.0, 1.0]}, "up": {"block_1": [0.0, 1.0, 0.5]}, "mid": 0.3}


def prompt_images():
    a = Image.new("RGB", (300, 200), (20, 40, 200))
    ImageDraw.Draw(a).ellipse((100, 50, 200, 150), fill=(220, 30, 30))
    b = Image.new("RGB", (180, 240), (240, 240, 240))
    ImageDraw.Draw(b).rectangle((30, 60, 150, 180), fill=(10, 160, 40))
    return a, b


@pytest.fixture(scope="module")
def latents():
    return torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(123))


@pytest.fixture(scope="module")
def ours(tiny_world):
    return minipa.load_pipeline(tiny_world["model"], ip_adapter=tiny_world["ip_safetensors"])


@pytest.fixture(scope="module")
def ours_plain(tiny_world):
    return minipa.load_pipeline(tiny_world["model"])


@pytest.fixture(scope="module")
def theirs(tiny_world):
    return diffusers_pipeline(tiny_world, adapter="ip_safetensors")


def run_theirs(pipe, latents, guidance=7.5, **kwargs):
    return pipe(PROMPT, negative_prompt="", num_inference_steps=STEPS, guidance_scale=guidance, height=SIZE,
                width=SIZE, latents=latents.clone(), output_type="np", **kwargs).images


def run_ours(pipe, latents, guidance=7.5, **kwargs):
    return pipe(PROMPT, num_steps=STEPS, guidance_scale=guidance, height=SIZE, width=SIZE, latents=latents.clone(),
                output="np", progress=False, **kwargs)


def assert_images_close(a, b, atol=1e-4):
    assert a.shape == b.shape == (1, SIZE, SIZE, 3)
    diff = np.abs(a - b).max()
    print(f"max abs difference {diff:.2e}")  # shown with pytest -rP
    assert diff <= atol, f"max abs difference {diff:.2e} > {atol}"


def test_text_only_equals_diffusers(tiny_world, ours_plain, latents):
    assert_images_close(run_ours(ours_plain, latents), run_theirs(diffusers_pipeline(tiny_world), latents))


@pytest.mark.parametrize("scale", [0.5, 0.0])
def test_text_and_image_prompt_equals_diffusers(ours, theirs, latents, scale):
    image, _ = prompt_images()
    theirs.set_ip_adapter_scale(scale)
    assert_images_close(run_ours(ours, latents, ip_image=image, ip_scale=scale), run_theirs(theirs, latents, ip_adapter_image=image))


def test_image_prompt_without_guidance_equals_diffusers(ours, theirs, latents):
    image, _ = prompt_images()
    theirs.set_ip_adapter_scale(1.0)
    assert_images_close(
        run_ours(ours, latents, guidance=1.0, ip_image=image, ip_scale=1.0),
        run_theirs(theirs, latents, guidance=1.0, ip_adapter_image=image),
    )


def test_two_image_prompts_equal_diffusers(ours, theirs, latents):
    a, b = prompt_images()
    theirs.set_ip_adapter_scale(0.8)
    assert_images_close(run_ours(ours, latents, ip_image=[a, b], ip_scale=0.8), run_theirs(theirs, latents, ip_adapter_image=[[a, b]]))


def test_per_block_scale_equals_diffusers(ours, theirs, latents):
    image, _ = prompt_images()
    theirs.set_ip_adapter_scale(BLOCKS)
    assert_images_close(run_ours(ours, latents, ip_image=image, ip_scale=BLOCKS), run_theirs(theirs, latents, ip_adapter_image=image))


@pytest.fixture(scope="module")
def ours_plus(tiny_world):
    return minipa.load_pipeline(tiny_world["model"], ip_adapter=tiny_world["ip_plus"])


@pytest.fixture(scope="module")
def theirs_plus(tiny_world):
    return diffusers_pipeline(tiny_world, adapter="ip_plus")


def test_ip_adapter_plus_equals_diffusers(ours_plus, theirs_plus, latents):
    image, _ = prompt_images()  # Resampler over the patch features; "no image" = the features of a zero image
    theirs_plus.set_ip_adapter_scale(0.7)
    assert_images_close(run_ours(ours_plus, latents, ip_image=image, ip_scale=0.7), run_theirs(theirs_plus, latents, ip_adapter_image=image))


def test_ip_adapter_plus_with_two_image_prompts_equals_diffusers(ours_plus, theirs_plus, latents):
    a, b = prompt_images()
    theirs_plus.set_ip_adapter_scale(1.0)
    assert_images_close(run_ours(ours_plus, latents, ip_image=[a, b], ip_scale=1.0), run_theirs(theirs_plus, latents, ip_adapter_image=[[a, b]]))


def test_mlp_image_projection_equals_diffusers_faceid_layout(tiny_world, latents):
    """FaceID's image_proj (an MLP) over the CLIP global embedding. diffusers loads the layout but does not
    compute that embedding for it (FaceID reads face embeddings), so it gets transformers' CLIP embedding."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    image, _ = prompt_images()
    ours = minipa.load_pipeline(tiny_world["model"], ip_adapter=tiny_world["ip_mlp"])
    theirs = diffusers_pipeline(tiny_world, adapter="ip_mlp")
    assert type(theirs.unet.encoder_hid_proj.image_projection_layers[0]).__name__ == "IPAdapterFaceIDImageProjection"
    encoder = CLIPVisionModelWithProjection.from_pretrained(tiny_world["image_encoder"])
    with torch.no_grad():
        embeds = encoder(**CLIPImageProcessor()(image, return_tensors="pt")).image_embeds[:, None]  # (1, 1, E)
    theirs.set_ip_adapter_scale(0.7)
    expected = run_theirs(theirs, latents, ip_adapter_image_embeds=[torch.cat([torch.zeros_like(embeds), embeds])])
    assert_images_close(run_ours(ours, latents, ip_image=image, ip_scale=0.7), expected)


def test_dpm_solver_with_an_image_prompt_equals_diffusers(tiny_world, ours, latents):
    from diffusers import DPMSolverMultistepScheduler

    theirs = diffusers_pipeline(tiny_world, adapter="ip_safetensors")
    theirs.scheduler = DPMSolverMultistepScheduler.from_config(theirs.scheduler.config)  # diffusers' way to switch samplers
    image, _ = prompt_images()
    theirs.set_ip_adapter_scale(0.6)
    expected = run_theirs(theirs, latents, ip_adapter_image=image)
    assert_images_close(run_ours(ours, latents, ip_image=image, ip_scale=0.6, scheduler="dpm++"), expected)


def test_bin_and_safetensors_adapters_give_the_same_image(tiny_world, ours, latents):
    image, _ = prompt_images()
    from_bin = minipa.load_pipeline(tiny_world["model"], ip_adapter=tiny_world["ip_bin"])
    # bit-identical weights (test_ip_adapter checks); only their memory differs (mmap-ed pickle vs safetensors),
    # which can steer the CPU matmul kernels into different summation orders: float noise, ~1e-6
    assert_images_close(run_ours(from_bin, latents, ip_image=image), run_ours(ours, latents, ip_image=image), atol=1e-5)


def test_ddpm_and_seed_equal_diffusers(tiny_world, ours_plain):
    from diffusers import DDPMScheduler

    pipe = diffusers_pipeline(tiny_world)
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    expected = pipe(PROMPT, num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="np",
                    generator=torch.Generator().manual_seed(7)).images
    got = ours_plain(PROMPT, num_steps=STEPS, height=SIZE, width=SIZE, seed=7, scheduler="ddpm", output="np", progress=False)
    assert_images_close(got, expected)


def test_scale_zero_is_exactly_plain_sd(ours, ours_plain, latents):
    image, _ = prompt_images()
    assert np.array_equal(run_ours(ours, latents, ip_image=image, ip_scale=0.0), run_ours(ours_plain, latents))


def test_guidance_one_skips_the_unconditional_branch(ours_plain, latents):
    batches = []
    hook = ours_plain.unet.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
    try:
        run_ours(ours_plain, latents, guidance=1.0)
        run_ours(ours_plain, latents, guidance=7.5)
    finally:
        hook.remove()
    assert batches == [1] * STEPS + [2] * STEPS


def test_same_seed_same_image_and_outputs_agree(ours_plain):
    def go(seed, output):
        return ours_plain("a square", num_steps=2, height=SIZE, width=SIZE, seed=seed, output=output, progress=False)

    a, b = go(3, "np"), go(3, "np")
    assert np.array_equal(a, b)
    assert not np.array_equal(a, go(4, "np"))
    pil = go(3, "pil")[0]
    assert pil.size == (SIZE, SIZE) and np.array_equal(np.asarray(pil), (a[0] * 255).round().astype(np.uint8))
    latent = go(3, "latent")
    assert latent.shape == (1, 4, SIZE // 8, SIZE // 8)
    assert np.array_equal(ours_plain.decode(latent, "np"), a)


def test_components_are_plain_attributes(ours):
    for name in ("unet", "vae", "text_encoder", "tokenizer", "image_encoder", "image_proj", "scheduler"):
        assert getattr(ours, name) is not None, name
    assert sum(isinstance(m, DecoupledCrossAttention) for m in ours.unet.modules()) == 16


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(height=60), "height must be a multiple of 8"),
        (dict(width=100000), "width must be a multiple of 8"),
        (dict(guidance_scale=float("nan")), "guidance scale w must be a finite number"),
        (dict(num_steps=0), "num_steps must be an integer from 1"),
        (dict(output="jpg"), "output must be one of"),
        (dict(latents=torch.zeros(1, 4, 3, 3)), "latents: expected shape (1, 4, 8, 8)"),
        (dict(ip_image=Image.new("RGB", (8, 8)), ip_scale=-1.0), "ip_scale must be a finite number >= 0"),
        (dict(scheduler="euler"), "unknown scheduler 'euler'"),
    ],
)
def test_bad_arguments_are_clear_errors(ours, kwargs, words):
    with pytest.raises(ValueError) as err:
        ours(PROMPT, num_steps=kwargs.pop("num_steps", 2), progress=False, **kwargs)
    assert words in str(err.value)


def test_image_prompt_without_adapter_is_an_error(ours_plain):
    with pytest.raises(ValueError, match="no IP-Adapter is loaded"):
        ours_plain(PROMPT, ip_image=Image.new("RGB", (8, 8)), num_steps=1, progress=False)


def test_cli_writes_png_and_sidecar(tiny_world, tmp_path):
    image_path = tmp_path / "prompt.png"
    prompt_images()[0].save(image_path)
    out = tmp_path / "out" / "img.png"
    args = ["generate", "--prompt", "a red circle", "--image-prompt", str(image_path), "--model", str(tiny_world["model"]),
            "--ip-adapter", str(tiny_world["ip_safetensors"]), "--scale", "0.7", "--steps", "3", "--seed", "5",
            "--out", str(out), "--no-progress"]
    assert cli(args) == 0
    assert Image.open(out).size == (SIZE, SIZE)
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["prompt"] == "a red circle" and record["ip_scale"] == 0.7 and record["num_steps"] == 3
    assert record["seed"] == 5 and record["height"] == SIZE and record["ip_image"] == [str(image_path)]
    assert cli(args) == 1  # refuses to overwrite
    assert cli(args + ["--overwrite"]) == 0


def test_cli_failure_writes_nothing(tiny_world, tmp_path, capsys):
    out = tmp_path / "img.png"
    code = cli(["generate", "--prompt", "x", "--model", str(tiny_world["model"]), "--height", "63", "--out", str(out), "--no-progress"])
    assert code == 1 and not out.exists() and not out.with_suffix(".json").exists()
    err = capsys.readouterr().err
    assert "height must be a multiple of 8" in err and "Traceback" not in err


def test_cli_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        cli(["generate", "--help"])
    text = capsys.readouterr().out
    for flag in ("--prompt", "--image-prompt", "--model", "--ip-adapter", "--image-encoder", "--scale", "--steps",
                 "--guidance", "--seed", "--out", "--overwrite", "--height", "--width", "--scheduler"):
        assert flag in text


def test_single_file_checkpoint_gives_the_same_image_as_the_folder(tiny_world, ours_plain, latents, tmp_path):
    """The tiny model written as one LDM-named file (minipa's key rules, proven against diffusers'
    converters in test_unet/test_vae/test_clip) loads through load_pipeline like a real SD 1.5 .safetensors."""
    from safetensors.torch import load_file

    from minipa.train.export import save_ldm_checkpoint

    model = tiny_world["model"]
    save_ldm_checkpoint(*(load_file(model / part) for part in ("unet/diffusion_pytorch_model.safetensors",
                        "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors")), tmp_path / "tiny-sd.safetensors")
    pipe = minipa.load_pipeline(tmp_path / "tiny-sd.safetensors", configs=model)
    # the same tensors from another file: only float noise from memory layout (see the .bin test above)
    assert_images_close(run_ours(pipe, latents), run_ours(ours_plain, latents), atol=1e-5)


def test_image_encoder_of_the_wrong_width_is_named(tiny_world, tmp_path):
    from conftest import TINY_VISION
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    wrong = tmp_path / "image_encoder"
    CLIPVisionModelWithProjection(CLIPVisionConfig(**{**TINY_VISION, "projection_dim": 24})).save_pretrained(wrong)
    with pytest.raises(ValueError) as err:
        minipa.load_pipeline(tiny_world["model"], ip_adapter=tiny_world["ip_safetensors"], image_encoder=wrong)
    assert "gives 24-wide image embeddings" in str(err.value) and "expects 48-wide" in str(err.value)

    wider = tmp_path / "wider_encoder"  # Plus reads hidden states: the hidden width must fit its proj_in
    CLIPVisionModelWithProjection(CLIPVisionConfig(**{**TINY_VISION, "hidden_size": 48})).save_pretrained(wider)
    with pytest.raises(ValueError) as err:
        minipa.load_pipeline(tiny_world["model"], ip_adapter=tiny_world["ip_plus"], image_encoder=wider)
    assert "gives 48-wide patch features" in str(err.value) and "expects 32-wide" in str(err.value)


def test_unreadable_image_prompt_is_a_clear_error(ours, tmp_path):
    from minipa.preprocess import ImageInputError

    (tmp_path / "notes.png").write_text("not an image")
    for bad in (tmp_path / "notes.png", tmp_path / "missing.png"):
        with pytest.raises(ImageInputError) as err:
            ours(PROMPT, ip_image=bad, num_steps=1, progress=False)
        assert bad.name in str(err.value)


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        minipa.load_pipeline(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="model_index.json"):
        minipa.load_pipeline(tmp_path)
