"""Strict, safe checkpoint loading (minipa/weights.py), independent of any model."""

import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from minipa.train.export import save_safetensors
from minipa.weights import Checkpoint, WeightsError, load_weights


class Evil:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("suffix", [".ckpt", ".bin"])
def test_malicious_pickle_is_refused_without_running_it(tmp_path, suffix):
    marker = tmp_path / "pwned"
    path = tmp_path / f"evil{suffix}"
    torch.save({"state_dict": {"w": torch.ones(1)}, "payload": Evil(marker)}, path)
    with pytest.raises(WeightsError, match="refused to unpickle.*weights_only=True"):
        Checkpoint(path)
    assert not marker.exists()


def test_nested_pickles_are_flattened_with_dots(tmp_path):
    torch.save({"image_proj": {"proj.weight": torch.ones(8, 2)}, "ip_adapter": {"1.to_k_ip.weight": torch.ones(3, 2)}}, tmp_path / "ip.bin")
    assert Checkpoint(tmp_path / "ip.bin").shapes == {"image_proj.proj.weight": (8, 2), "ip_adapter.1.to_k_ip.weight": (3, 2)}
    torch.save({"state_dict": {"model.x": torch.ones(2)}, "global_step": 3}, tmp_path / "ldm.ckpt")
    assert Checkpoint(tmp_path / "ldm.ckpt").keys() == ["model.x"]


def test_unreadable_files_say_what_is_wrong(tmp_path):
    with pytest.raises(WeightsError, match="no such weights file"):
        Checkpoint(tmp_path / "missing.safetensors")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(WeightsError, match="empty \\(0 bytes\\)"):
        Checkpoint(tmp_path / "empty.safetensors")
    save_file({"x": torch.ones(64, 64)}, tmp_path / "whole.safetensors")
    data = (tmp_path / "whole.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="cut.safetensors: not a readable safetensors file"):
        Checkpoint(tmp_path / "cut.safetensors")
    (tmp_path / "cut.ckpt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(WeightsError, match="cut.ckpt: not a readable PyTorch checkpoint"):
        Checkpoint(tmp_path / "cut.ckpt")
    (tmp_path / "w.onnx").write_bytes(b"x")
    with pytest.raises(WeightsError, match="unknown weights format '.onnx'"):
        Checkpoint(tmp_path / "w.onnx")


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)


def test_loads_strictly_onto_meta_built_modules_with_dtype(tmp_path):
    reference = Tiny()
    save_safetensors(reference, tmp_path / "tiny.safetensors")
    with torch.device("meta"):
        model = Tiny()
    ckpt = Checkpoint(tmp_path / "tiny.safetensors")
    load_weights(model, ckpt, {k: k for k in ckpt.keys()}, family="Tiny", dtype=torch.float16)
    for name, param in model.state_dict().items():
        assert param.device.type == "cpu" and param.dtype == torch.float16
        assert torch.equal(param, reference.state_dict()[name].half())


def test_every_problem_is_reported_at_once(tmp_path):
    state = Tiny().state_dict()
    state["proj.weight"] = torch.zeros(5, 4)  # wrong shape
    del state["norm.bias"]  # missing
    state["extra.weight"] = torch.zeros(1)  # unexpected
    save_file(state, tmp_path / "bad.safetensors")
    with torch.device("meta"):
        model = Tiny()
    ckpt = Checkpoint(tmp_path / "bad.safetensors")
    with pytest.raises(WeightsError) as err:
        load_weights(model, ckpt, {k: k for k in ckpt.keys()}, family="the Tiny test model", describe=lambda s: f"{len(s)} tensors")
    message = str(err.value)
    for words in ["bad.safetensors", "does not match the Tiny test model", "looks like: 4 tensors",
                  "1 missing", "norm.bias", "1 unexpected", "extra.weight", "1 wrong shape", "(5, 4)", "(3, 4)"]:
        assert words in message


def test_a_1x1_convolution_loads_into_a_linear(tmp_path):
    linear = nn.Linear(4, 3)
    save_file({"w": linear.weight.detach().reshape(3, 4, 1, 1).contiguous(), "b": linear.bias.detach()}, tmp_path / "conv.safetensors")
    with torch.device("meta"):
        model = nn.Linear(4, 3)
    load_weights(model, Checkpoint(tmp_path / "conv.safetensors"), {"weight": "w", "bias": "b"}, family="Linear")
    assert torch.equal(model.weight, linear.weight)
