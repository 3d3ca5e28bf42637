"""The tiny model shipped in weights/tiny: intact, small, loaded by the same loader as SD 1.5, and it works."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import minipa.pipeline as pipeline_module
from minipa.data.shapes import BACKGROUNDS, COLOURS, SHAPES, ShapesDataset
from minipa.pipeline import TINY_MODEL, load_pipeline
from minipa.weights import Checkpoint, WeightsError, verify_manifest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not (TINY_MODEL / "SHA256SUMS").is_file(), reason="weights/tiny has not been trained yet")


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline()


def test_shipped_files_are_intact_small_and_fp16():
    verify_manifest(TINY_MODEL)
    files = [p for p in TINY_MODEL.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 25 * 2**20
    for path in TINY_MODEL.rglob("*.safetensors"):
        ckpt = Checkpoint(path)
        assert {ckpt.tensor(k).dtype for k in ckpt.keys()} == {torch.float16}, path
    index = json.loads((TINY_MODEL / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["unet"] == ["diffusers", "UNet2DConditionModel"]


def test_default_pipeline_is_the_tiny_model_with_its_ip_adapter(pipe):
    assert pipe.ip_adapter is not None and pipe.image_encoder is not None
    assert pipe.unet.config.sample_size * 8 == 64
    assert pipe.ip_adapter.image_proj.num_tokens == 4


def test_text_prompt_generates_the_requested_shape_and_colours(pipe):
    from minipa.eval import Judge
    from minipa.train.classifier import classify
    from minipa.train.world import EVAL_FILE

    judge = Judge(pipe, TINY_MODEL / EVAL_FILE)
    prompt = "a red circle on a blue background"  # what people type: the size left out (the README's quick start)
    images = pipe([prompt] * 4, num_steps=25, guidance_scale=5.0, seed=0, output="np", progress=False)
    pixels = torch.from_numpy((images * 255).round()).to(torch.uint8)  # (4, 64, 64, 3)
    predicted = classify(judge.classifier, pixels)
    assert sum(SHAPES[int(s)] == "circle" for s in predicted["shape"]) >= 3
    assert sum(list(COLOURS)[int(c)] == "red" for c in predicted["colour"]) >= 3
    assert sum(BACKGROUNDS[int(b)] == "blue" for b in predicted["background"]) >= 3


def test_image_prompt_generates(pipe):
    image = ShapesDataset("test", 1).images()[0].numpy()
    out = pipe("", ip_image=image, ip_scale=1.0, num_steps=10, guidance_scale=5.0, progress=False)[0]
    assert out.size == (64, 64)


def test_diffusers_loads_the_shipped_folder():
    diffusers = pytest.importorskip("diffusers")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(TINY_MODEL, torch_dtype=torch.float32, safety_checker=None)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size


def test_corrupted_or_missing_files_are_a_clear_error(tmp_path, monkeypatch):
    copy = tmp_path / "tiny"
    shutil.copytree(TINY_MODEL, copy)
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    monkeypatch.setattr(pipeline_module, "TINY_MODEL", copy)
    with pytest.raises(WeightsError) as err:
        load_pipeline()
    message = str(err.value)
    assert "unet/diffusion_pytorch_model.safetensors: sha256 mismatch" in message
    assert "git checkout -- weights/tiny" in message and "minipa.train" in message
    (copy / "ip-adapter.safetensors").unlink()
    with pytest.raises(WeightsError, match="ip-adapter.safetensors: missing"):
        load_pipeline()


def test_cli_generate_uses_the_tiny_model(tmp_path):
    """With no --model the CLI draws with the shipped tiny model. (How long it takes is a benchmark's business, not a test's.)"""
    out = tmp_path / "star.png"
    subprocess.run([sys.executable, "-m", "minipa", "generate", "--prompt", "a large yellow star on a purple background",
                    "--steps", "25", "--guidance", "5", "--out", str(out), "--no-progress"], check=True, cwd=ROOT)
    assert out.is_file() and json.loads(out.with_suffix(".json").read_text())["model"].startswith("tiny")


def test_cli_says_which_words_the_tiny_model_does_not_know(tmp_path, capsys):
    from minipa.cli import main as cli

    run = ["generate", "--steps", "1", "--no-progress", "--out", str(tmp_path / "x.png"), "--overwrite"]
    assert cli([*run, "--prompt", "a small dog on the beach", "--negative-prompt", "blurry"]) == 0
    err = capsys.readouterr().err
    assert "does not know 'dog', 'the', 'beach', 'blurry'; it knows shapes circle, square" in err
    assert cli([*run, "--prompt", "A Red circle, on a blue background"]) == 0  # case and punctuation do not matter
    assert "warning" not in capsys.readouterr().err
