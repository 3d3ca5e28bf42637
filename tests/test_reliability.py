"""Reliability and safety, as a table: every bad file and bad input a user can hand minipa, and the
one readable error it gets (type + key words). To add a case, add a row.

Each row is (id, make, error type, words): `make(world, tmp)` builds the bad thing and returns a
zero-argument callable that must raise `error` with every one of `words` in its message.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file, save_file

import minipa
from minipa import keymap
from minipa.cli import main as cli
from minipa.config import ConfigError, read_config
from minipa.loading import load_ip_adapter, load_tokenizer, load_unet
from minipa.preprocess import ImageInputError, preprocess_image
from minipa.weights import WeightsError

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = load_tokenizer(ROOT / "weights" / "bpe_simple_vocab_16e6.txt.gz")


# ─── helpers that build bad files from the tiny world ──────────────────────────────────────────


def copy_model(world, tmp: Path) -> Path:
    """A writable copy of the tiny SD folder (files are small)."""
    return Path(shutil.copytree(world["model"], tmp / "sd"))


def edit_json(path: Path, **changes) -> Path:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))
    return path


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def malicious(tmp: Path, name: str) -> Path:
    torch.save({"state_dict": {"x": torch.ones(1)}, "payload": Evil(tmp / "pwned")}, tmp / name)
    return tmp / name


def unet_folder(world, tmp, **config_changes) -> Path:
    model = copy_model(world, tmp)
    edit_json(model / "unet" / "config.json", **config_changes)
    return model / "unet"


def inpainting_model(world, tmp) -> Path:
    """The tiny model made into an inpainting one: 9 input channels (latents, mask, masked image)."""
    model = copy_model(world, tmp)
    edit_json(model / "unet" / "config.json", in_channels=9)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["conv_in.weight"] = torch.cat([state["conv_in.weight"]] * 3, dim=1)[:, :9].contiguous()
    save_file(state, weights)
    return model


def unet_config(world):
    from minipa.unet import UNetConfig

    return read_config(world["model"] / "unet" / "config.json", UNetConfig)


def truncated_unet(world, tmp) -> Path:
    model = copy_model(world, tmp)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 3])
    return model / "unet"


def emptied_unet(world, tmp) -> Path:
    model = copy_model(world, tmp)
    (model / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    return model / "unet"


def adapter_variant(world, tmp, variant: str) -> Path:
    """Official-format IP-Adapter files of other variants, with the tiny world's sizes."""
    base = load_file(world["ip_safetensors"])
    D = base["image_proj.norm.weight"].shape[0]
    if variant == "sdxl":
        state = {k: torch.zeros(v.shape[0], 2048) if k.endswith("_ip.weight") else v for k, v in base.items()}
        state["image_proj.proj.weight"] = torch.zeros(4 * 2048, 48)
    elif variant == "plus":
        state = {k: v for k, v in base.items() if k.startswith("ip_adapter.")}
        state.update({"image_proj.latents": torch.zeros(1, 16, D), "image_proj.proj_in.weight": torch.zeros(D, 32),
                      "image_proj.layers.0.0.to_q.weight": torch.zeros(D, D)})
    elif variant == "faceid":
        state = {k: v for k, v in base.items() if k.startswith("ip_adapter.")}
        state.update({"image_proj.proj.0.weight": torch.zeros(64, 512), "image_proj.proj.2.weight": torch.zeros(4 * D, 64),
                      "image_proj.norm.weight": torch.zeros(D)})
    else:  # "missing": a download cut short by a few tensors (zip kept the header)
        state = {k: v for k, v in base.items() if not k.startswith("ip_adapter.31.")}
    save_file(state, tmp / f"ip-{variant}.safetensors")
    return tmp / f"ip-{variant}.safetensors"


def load_adapter(world, tmp, variant):
    unet = load_unet(world["model"] / "unet")
    path = adapter_variant(world, tmp, variant)
    return lambda: load_ip_adapter(path, unet)


def wrong_image_encoder(world, tmp) -> Path:
    """A CLIP vision encoder of another size (as ViT-L/14 is to ViT-H/14): projection 32 instead of 48."""
    from conftest import TINY_VISION
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    path = tmp / "image_encoder"
    CLIPVisionModelWithProjection(CLIPVisionConfig(**{**TINY_VISION, "projection_dim": 32, "hidden_size": 48})).save_pretrained(path)
    return path


# ─── the table ──────────────────────────────────────────────────────────────────────────────────

BAD_FILES = [
    ("pickle-with-code-ckpt", lambda w, t: (lambda p=malicious(t, "evil.ckpt"): load_unet(p)), WeightsError,
     ["evil.ckpt", "refused to unpickle", "weights_only=True", ".safetensors"]),
    ("pickle-with-code-bin-adapter", lambda w, t: (lambda p=malicious(t, "ip.bin"): load_ip_adapter(p, load_unet(w["model"] / "unet"))),
     WeightsError, ["ip.bin", "refused to unpickle"]),
    ("truncated-safetensors", lambda w, t: (lambda p=truncated_unet(w, t): load_unet(p)), WeightsError,
     ["diffusion_pytorch_model.safetensors", "not a readable safetensors file", "truncated or corrupt"]),
    ("zero-byte-file", lambda w, t: (lambda p=emptied_unet(w, t): load_unet(p)), WeightsError,
     ["diffusion_pytorch_model.safetensors", "empty (0 bytes)"]),
    ("config-missing", lambda w, t: (lambda p=(copy_model(w, t) / "unet"): (p.joinpath("config.json").unlink(), load_unet(p))),
     ConfigError, ["config.json", "no such file"]),
    ("config-not-json", lambda w, t: (lambda p=(copy_model(w, t) / "unet"): (p.joinpath("config.json").write_text("{oops"), load_unet(p))),
     ConfigError, ["config.json", "not valid JSON"]),
    ("config-wrong-field", lambda w, t: (lambda p=unet_folder(w, t, layers_per_block="two"): load_unet(p)),
     ConfigError, ["config.json", "layers_per_block"]),
    ("config-unknown-field", lambda w, t: (lambda p=unet_folder(w, t, magic_switch=True): load_unet(p)),
     ConfigError, ["magic_switch", "not a setting of an SD 1.x UNet"]),
    ("sdxl-unet", lambda w, t: (lambda p=unet_folder(w, t, addition_embed_type="text_time"): load_unet(p)),
     ConfigError, ["addition_embed_type", "text_time", "SD 1.x UNet"]),
    ("sd2-unet", lambda w, t: (lambda p=unet_folder(w, t, use_linear_projection=True): load_unet(p)),
     ConfigError, ["use_linear_projection", "SD 1.x UNet"]),
    ("inpainting-model", lambda w, t: (lambda p=inpainting_model(w, t): minipa.load_pipeline(p)),
     ValueError, ["9 input channels", "inpainting UNets (9 channels) are not supported"]),
    ("inpainting-unet-as-sd15-file", lambda w, t: (lambda p=inpainting_model(w, t): load_unet(p / "unet" / "diffusion_pytorch_model.safetensors", config=unet_config(w))),
     WeightsError, ["conv_in.weight", "looks like: an inpainting UNet (9 input channels)"]),
    ("vae-given-as-unet", lambda w, t: (lambda: load_unet(w["model"] / "vae")), ConfigError,
     ["vae/config.json", "UNet2DConditionModel", "AutoencoderKL"]),
    ("vae-weights-as-unet-file", lambda w, t: (lambda: load_unet(w["model"] / "vae" / "diffusion_pytorch_model.safetensors")),
     WeightsError, ["does not match an SD 1.x UNet", "looks like: an SD VAE"]),
    ("sdxl-model-folder", lambda w, t: (lambda p=copy_model(w, t): (edit_json(p / "model_index.json", _class_name="StableDiffusionXLPipeline"), minipa.load_pipeline(p))),
     ValueError, ["model_index.json", "SDXL", "SD 1.x"]),
    ("folder-without-model-index", lambda w, t: (lambda: minipa.load_pipeline(w["model"] / "unet")), ConfigError,
     ["model_index.json", "no such file"]),
    ("ip-adapter-sdxl", lambda w, t: load_adapter(w, t, "sdxl"), WeightsError, ["ip-sdxl.safetensors", "SDXL"]),
    ("ip-adapter-plus", lambda w, t: load_adapter(w, t, "plus"), WeightsError, ["ip-plus.safetensors", "IP-Adapter Plus"]),
    ("ip-adapter-faceid", lambda w, t: load_adapter(w, t, "faceid"), WeightsError, ["ip-faceid.safetensors", "FaceID"]),
    ("ip-adapter-missing-layer", lambda w, t: load_adapter(w, t, "missing"), WeightsError,
     ["ip-missing.safetensors", "missing", "ip_adapter.31.to_k_ip.weight"]),
    ("image-encoder-of-another-size", lambda w, t: (lambda p=wrong_image_encoder(w, t): minipa.load_pipeline(w["model"], ip_adapter=w["ip_safetensors"], image_encoder=p)),
     ValueError, ["image_encoder", "gives 32-wide image embeddings", "expects 48-wide"]),
    ("scheduler-config-unsupported", lambda w, t: (lambda p=copy_model(w, t): (edit_json(p / "scheduler" / "scheduler_config.json", beta_schedule="squaredcos_cap_v2"), minipa.load_pipeline(p))),
     ConfigError, ["scheduler_config.json", "beta_schedule", "squaredcos_cap_v2"]),
    ("model-path-missing", lambda w, t: (lambda: minipa.load_pipeline(t / "nowhere")), FileNotFoundError, ["nowhere", "does not exist"]),
]


@pytest.mark.parametrize("case, make, error, words", BAD_FILES, ids=[row[0] for row in BAD_FILES])
def test_bad_file(tiny_world, tmp_path, case, make, error, words):
    action = make(tiny_world, tmp_path)
    with pytest.raises(error) as err:
        action()
    for word in words:
        assert word in str(err.value), f"{case}: {word!r} not in: {err.value}"
    assert not (tmp_path / "pwned").exists()


@pytest.fixture(scope="module")
def pipe(tiny_world):
    return minipa.load_pipeline(tiny_world["model"], ip_adapter=tiny_world["ip_safetensors"])


def image_file(tmp: Path, name: str, make) -> Path:
    make().save(tmp / name)
    return tmp / name


def generate(pipe, **kwargs):
    settings = dict(prompt="a red circle", num_steps=1, height=64, width=64, output="np", progress=False)
    return lambda: pipe(**{**settings, **kwargs})


BAD_INPUTS = [
    ("height-not-multiple-of-8", lambda p, t: generate(p, height=60), ValueError, ["height", "multiple of 8", "60"]),
    ("width-absurd", lambda p, t: generate(p, width=51200), ValueError, ["width", "from 8 to 2048", "51200"]),
    ("steps-zero", lambda p, t: generate(p, num_steps=0), ValueError, ["num_steps", "from 1 to", "0"]),
    ("steps-negative", lambda p, t: generate(p, num_steps=-3), ValueError, ["num_steps", "-3"]),
    ("guidance-nan", lambda p, t: generate(p, guidance_scale=math.nan), ValueError, ["guidance scale", "finite", "nan"]),
    ("guidance-negative", lambda p, t: generate(p, guidance_scale=-2.0), ValueError, ["guidance scale", ">= 0"]),
    ("scale-nan", lambda p, t: generate(p, ip_image=Image.new("RGB", (9, 9)), ip_scale=math.nan), ValueError, ["ip_scale", "finite"]),
    ("scale-negative", lambda p, t: generate(p, ip_image=Image.new("RGB", (9, 9)), ip_scale=-0.1), ValueError, ["ip_scale", ">= 0"]),
    ("scale-bad-block", lambda p, t: generate(p, ip_image=Image.new("RGB", (9, 9)), ip_scale={"down": {"block_9": 1.0}}),
     ValueError, ["block_9", "no block"]),
    ("image-not-an-image", lambda p, t: generate(p, ip_image=t / "notes.txt" if (t / "notes.txt").write_text("hi") else None),
     ImageInputError, ["notes.txt", "not an image"]),
    ("image-path-missing", lambda p, t: generate(p, ip_image=t / "missing.png"), ImageInputError, ["missing.png", "no such image"]),
    ("image-zero-size-array", lambda p, t: generate(p, ip_image=np.zeros((0, 5, 3), np.uint8)), ImageInputError, ["image is empty", "pixels"]),
    ("latents-wrong-shape", lambda p, t: generate(p, latents=torch.zeros(1, 4, 5, 5)), ValueError, ["latents", "(1, 4, 8, 8)"]),
    ("output-unknown", lambda p, t: generate(p, output="jpeg"), ValueError, ["output", "'pil'", "jpeg"]),
    ("scheduler-unknown", lambda p, t: generate(p, scheduler="euler"), ValueError, ["scheduler", "euler", "ddim"]),
    ("negative-prompts-count", lambda p, t: generate(p, prompt=["a", "b"], negative_prompt=["x"]), ValueError, ["negative_prompt", "expected 2"]),
]


@pytest.mark.parametrize("case, make, error, words", BAD_INPUTS, ids=[row[0] for row in BAD_INPUTS])
def test_bad_input(pipe, tmp_path, case, make, error, words):
    with pytest.raises(error) as err:
        make(pipe, tmp_path)()
    for word in words:
        assert word.lower() in str(err.value).lower(), f"{case}: {word!r} not in: {err.value}"


def test_image_prompt_without_adapter(tiny_world):
    plain = minipa.load_pipeline(tiny_world["model"])
    with pytest.raises(ValueError, match="no IP-Adapter is loaded; load_pipeline\\(ip_adapter=PATH\\)"):
        generate(plain, ip_image=Image.new("RGB", (9, 9)))()


# Odd but valid inputs: each must simply work.
ODD_IMAGES = {
    "1x1": lambda: Image.new("RGB", (1, 1), (200, 10, 10)),
    "10000x100": lambda: Image.new("RGB", (10000, 100), (10, 200, 10)),
    "rgba": lambda: Image.new("RGBA", (40, 30), (10, 10, 200, 100)),
    "16-bit-gray": lambda: Image.fromarray(np.full((30, 40), 40000, np.uint16)),
    "cmyk": lambda: Image.new("CMYK", (40, 30), (0, 200, 200, 0)),
    "palette": lambda: Image.new("RGB", (40, 30), (90, 20, 160)).convert("P"),
}


@pytest.mark.parametrize("kind", sorted(ODD_IMAGES))
def test_odd_images_work(pipe, kind):
    image = generate(pipe, ip_image=ODD_IMAGES[kind](), ip_scale=0.5)()
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def test_animated_gif_uses_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (30, 30), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    assert torch.equal(preprocess_image(tmp_path / "anim.gif"), preprocess_image(frames[0]))


def test_empty_and_very_long_prompts(pipe):
    assert np.isfinite(generate(pipe, prompt="")()).all()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generate(pipe, prompt="word " * 100)()
    messages = [str(w.message) for w in caught]
    assert any("102 tokens long" in m and "25 tokens were dropped" in m for m in messages), messages


# ─── numerics ───────────────────────────────────────────────────────────────────────────────────


def test_nan_guard_names_the_step(tiny_world):
    broken = minipa.load_pipeline(tiny_world["model"])
    with torch.no_grad():
        broken.unet.conv_out.bias[0] = math.nan
    with pytest.raises(FloatingPointError, match="NaN/inf at step 1 of 2 \\(t=501\\)"):
        broken("a circle", num_steps=2, height=64, width=64, progress=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_cpu_works(tiny_world, dtype):
    """torch ≥ 2.1 runs every op minipa uses in fp16/bf16 on the CPU (slowly): no refusal needed."""
    full = minipa.load_pipeline(tiny_world["model"])
    half = minipa.load_pipeline(tiny_world["model"], dtype=dtype)
    a, b = (p("a circle", num_steps=1, height=64, width=64, output="np", progress=False) for p in (full, half))
    assert np.isfinite(b).all() and np.abs(a - b).max() < 0.05


# ─── the CLI: one line, non-zero exit, nothing written ──────────────────────────────────────────


def test_cli_errors_are_one_line_without_traceback(tmp_path, capsys):
    out = tmp_path / "x.png"
    assert cli(["generate", "--prompt", "x", "--model", str(tmp_path / "missing"), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("minipa: error:") and "missing" in err and "Traceback" not in err and "\n" not in err
    assert not out.exists()
    with pytest.raises(FileNotFoundError):
        cli(["generate", "--prompt", "x", "--model", str(tmp_path / "missing"), "--out", str(out), "--debug"])


def test_cli_refuses_non_png_and_existing_files(tiny_world, tmp_path, capsys):
    existing = tmp_path / "keep.png"
    existing.write_bytes(b"precious")
    assert cli(["generate", "--model", str(tiny_world["model"]), "--out", str(existing)]) == 1
    assert existing.read_bytes() == b"precious" and "--overwrite" in capsys.readouterr().err
    assert cli(["generate", "--model", str(tiny_world["model"]), "--out", str(tmp_path / "x.jpg")]) == 1
    assert "must end in .png" in capsys.readouterr().err


# ─── fuzzing ────────────────────────────────────────────────────────────────────────────────────

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.text(max_size=300))
def test_fuzz_tokenizer_never_crashes_and_stays_in_vocabulary(text):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # long texts warn about truncation; that is tested above
        ids = TOKENIZER(text)
    assert ids.shape == (1, 77)
    assert ids.min() >= 0 and ids.max() < len(TOKENIZER.vocab)
    assert ids[0, 0] == 49406  # <|startoftext|>


UNET_KEY_PARTS = st.lists(
    st.tuples(
        st.sampled_from(["model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.", ""]),
        st.sampled_from(["input_blocks", "middle_block", "output_blocks", "time_embed", "out", "conv_in", "label_emb"]),
        st.integers(0, 14), st.integers(0, 3),
        st.sampled_from(["in_layers.0.weight", "op.weight", "transformer_blocks.0.attn2.to_k.weight", "weight", "norm.bias", "x"]),
    ),
    max_size=40,
)


@FUZZ
@given(UNET_KEY_PARTS)
def test_fuzz_key_mapper_places_or_reports_every_key(parts):
    keys = sorted({f"{prefix}{a}.{i}.{j}.{rest}" for prefix, a, i, j, rest in parts})
    names, unmatched = keymap.ldm_unet_names(keys)
    ours = [k for k in keys if k.startswith(keymap.LDM_UNET_PREFIX)]
    assert sorted(list(names.values()) + list(unmatched)) == sorted(ours)  # every UNet key: placed or reported
    assert len(set(names.values())) == len(names)  # no file key feeds two parameters


@FUZZ
@given(st.integers(1, 600), st.integers(1, 600), st.sampled_from(["RGB", "RGBA", "L", "LA", "P", "CMYK", "I;16", "1"]))
def test_fuzz_preprocessing_any_size_and_mode(width, height, mode):
    image = Image.new(mode, (width, height))
    pixels = preprocess_image(image)
    assert pixels.shape == (1, 3, 224, 224) and torch.isfinite(pixels).all()
