"""Writing trained models in the formats users already have, so the tiny world loads like real SD 1.5.

    model_index.json                     diffusers StableDiffusionPipeline index
    unet/  vae/                          diffusers: config.json + diffusion_pytorch_model.safetensors
    text_encoder/  image_encoder/        transformers: config.json + model.safetensors
    tokenizer/                           vocab.json + merges.txt (+ the two small JSONs transformers reads)
    scheduler/scheduler_config.json      DDIMScheduler, SD 1.5's schedule
    ip-adapter.safetensors               the official flat layout: image_proj.* and ip_adapter.{1,3,…}.*
                                         (or ip-adapter.bin, the official nested pickle; `minipa train-adapter --save-bin`)
    SHA256SUMS                           the manifest `minipa.weights.verify_manifest` checks on load

Weights are stored in fp16 (the shipped model must stay small); the loaders cast them to the
dtype asked for. Every file is written atomically (temporary file, then rename).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from minipa import keymap
from minipa.clip import CLIPTextConfig, CLIPVisionConfig
from minipa.ddpm import ScheduleConfig
from minipa.tokenizer import CLIPTokenizer
from minipa.unet import UNetConfig
from minipa.vae import VAEConfig
from minipa.weights import MANIFEST, sha256_of

DIFFUSERS_VERSION = "0.30.0"  # the oldest diffusers these configs are written for
TRANSFORMERS_VERSION = "4.40.0"


def save_safetensors(module_or_state: nn.Module | Mapping[str, torch.Tensor], path: str | Path, dtype=None):
    """Write weights as `.safetensors` atomically (temporary file, then rename)."""
    from safetensors.torch import save_file

    state = module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else module_or_state
    state = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in state.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp))
    tmp.replace(path)


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _fields(config) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def unet_config_dict(config: UNetConfig) -> dict:
    return {"_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION, **_fields(config)}


def vae_config_dict(config: VAEConfig) -> dict:
    return {"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION, **_fields(config)}


def text_config_dict(config: CLIPTextConfig) -> dict:
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "torch_dtype": "float16",
            "transformers_version": TRANSFORMERS_VERSION, "bos_token_id": config.vocab_size - 2,
            "pad_token_id": config.vocab_size - 1, **_fields(config)}


def vision_config_dict(config: CLIPVisionConfig) -> dict:
    return {"architectures": ["CLIPVisionModelWithProjection"], "model_type": "clip_vision_model", "torch_dtype": "float16",
            "transformers_version": TRANSFORMERS_VERSION, **_fields(config)}


def scheduler_config_dict(config: ScheduleConfig) -> dict:
    return {"_class_name": "DDIMScheduler", "_diffusers_version": DIFFUSERS_VERSION, **dataclasses.asdict(config)}


# each component's config writer and the weights file name its library looks for
COMPONENTS = {UNetConfig: (unet_config_dict, "diffusion_pytorch_model.safetensors"),
              VAEConfig: (vae_config_dict, "diffusion_pytorch_model.safetensors"),
              CLIPTextConfig: (text_config_dict, "model.safetensors"), CLIPVisionConfig: (vision_config_dict, "model.safetensors")}


def save_component(model: nn.Module, folder: Path, dtype=torch.float16) -> None:
    """A UNet, VAE or CLIP tower as its diffusers/transformers folder: config.json + the weights file."""
    config_dict, weights = COMPONENTS[type(model.config)]
    write_json(folder / "config.json", config_dict(model.config))
    save_safetensors(model, folder / weights, dtype=dtype)


def save_tokenizer(tokenizer: CLIPTokenizer, folder: str | Path) -> None:
    """vocab.json + merges.txt, plus the settings transformers' CLIPTokenizer needs to read the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(tokenizer.vocab, ensure_ascii=False), encoding="utf-8")
    merges = sorted(tokenizer.ranks, key=tokenizer.ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>"}
    write_json(folder / "special_tokens_map.json", specials)
    write_json(folder / "tokenizer_config.json", {"tokenizer_class": "CLIPTokenizer", "model_max_length": tokenizer.context_length,
                                                  "do_lower_case": True, **specials})


def save_scheduler(config: ScheduleConfig, folder: Path) -> None:
    write_json(folder / "scheduler_config.json", scheduler_config_dict(config))


def save_model_index(folder: Path, with_image_encoder: bool = True) -> None:
    index = {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if with_image_encoder:
        index["image_encoder"] = ["transformers", "CLIPVisionModelWithProjection"]
    write_json(folder / "model_index.json", dict(sorted(index.items())))


def save_ip_adapter(adapter: nn.Module, path: Path, dtype=torch.float16) -> None:
    """The official layouts: `.safetensors` flat, keys `image_proj.*` and `ip_adapter.{1,3,…}.to_{k,v}_ip.weight`;
    `.bin` (a pickle of tensors only, like ip-adapter_sd15.bin) nested, {"image_proj": {…}, "ip_adapter": {…}}."""
    state = adapter.state_dict()
    flat = {key: state[name] for name, key in keymap.ip_adapter_file_keys(state).items()}
    path = Path(path)
    if path.suffix != ".bin":
        return save_safetensors(flat, path, dtype=dtype)
    nested = {"image_proj": {}, "ip_adapter": {}}
    for key, tensor in flat.items():
        group, _, rest = key.partition(".")
        nested[group][rest] = tensor.detach().to("cpu", dtype).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(nested, tmp)
    os.replace(tmp, path)


def write_manifest(folder: Path) -> Path:
    """SHA256SUMS over every file under `folder` (sha256sum's format: "<hex>  <relative path>")."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp"))
    lines = [f"{sha256_of(p)}  {p.relative_to(folder).as_posix()}\n" for p in files]
    path = folder / MANIFEST
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(lines), encoding="utf-8")
    os.replace(tmp, path)
    return path


# ─── The original LDM single file: keymap's rules run backwards ──────────────────────────────────


def ldm_unet_keys(names, layers_per_block: int = 2, prefix: str = keymap.LDM_UNET_PREFIX) -> dict[str, str]:
    """The inverse rule: diffusers/minipa UNet parameter names → LDM file keys (used to write LDM files).

    Whether an up block has attentions (which moves its upsampler from slot `.1` to `.2`) is read off `names`.
    """
    names = list(names)
    with_attention = {n.split(".")[1] for n in names if n.startswith("up_blocks.") and ".attentions." in n}
    top, middle, resnet_parts = (
        {new: old for old, new in table.items()} for table in (keymap.LDM_UNET_TOP, keymap.LDM_MIDDLE, keymap.LDM_RESNET_PARTS)
    )
    per_level = layers_per_block + 1

    def block_and_rest(name: str) -> tuple[str, str]:
        group, *p = name.split(".")
        if group == "mid_block":
            return f"middle_block.{middle[p[0] + '.' + p[1]]}", ".".join(p[2:])
        b, kind, j, rest = int(p[0]), p[1], int(p[2]), ".".join(p[3:])
        if group == "down_blocks" and kind == "downsamplers":  # conv.weight → op.weight
            return f"input_blocks.{1 + b * per_level + layers_per_block}.0.op", rest.removeprefix("conv.")
        if group == "up_blocks" and kind == "upsamplers":
            return f"output_blocks.{b * per_level + layers_per_block}.{2 if p[0] in with_attention else 1}", rest
        slot = {v: k for k, v in keymap.LDM_SLOTS.items()}[kind]
        if group == "down_blocks":
            return f"input_blocks.{1 + b * per_level + j}.{slot}", rest
        if group == "up_blocks":
            return f"output_blocks.{b * per_level + j}.{slot}", rest
        raise ValueError(f"{name!r} is not an SD UNet parameter name")

    out = {}
    for name in names:
        key = keymap.swap_prefix(name, top)
        if key is None:
            block, rest = block_and_rest(name)
            if ".resnets." in name:
                rest = keymap.swap_prefix(rest, resnet_parts)
            key = f"{block}.{rest}"
        out[name] = prefix + key
    return out


def ldm_vae_keys(names, levels: int = 4, prefix: str = keymap.LDM_VAE_PREFIX) -> dict[str, str]:
    """The inverse rule, minipa/diffusers VAE names → LDM file keys (used to write LDM files)."""
    back = [(new, old) for old, new in keymap.LDM_VAE_RENAMES]
    return {name: prefix + keymap.rename_pieces(keymap.renumber_levels(name, levels, to_diffusers=False), back) for name in names}


def clip_text_ldm_keys(names) -> dict[str, str]:
    """The inverse rule, minipa → LDM single-file names (used to write LDM files)."""
    return {name: keymap.LDM_TEXT_PREFIX + name for name in names}


def save_ldm_checkpoint(unet: dict, vae: dict, text_encoder: dict, path: Path, layers_per_block: int = 2, vae_levels: int = 4):
    """Three state dicts under minipa/diffusers names, written as one original LDM single file (`model.diffusion_model.*`,
    `first_stage_model.*`, `cond_stage_model.transformer.*`); the VAE's attention projections become 1×1 convolutions."""
    text_encoder = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in text_encoder.items()}  # transformers 5 saves it flat
    single = {}
    for state, keys in ((unet, ldm_unet_keys(unet, layers_per_block)), (vae, ldm_vae_keys(vae, vae_levels)),
                        (text_encoder, clip_text_ldm_keys(text_encoder))):
        single.update({keys[name]: tensor for name, tensor in state.items()})
    single = {k: v[:, :, None, None] if ".attn_1." in k and k.endswith("weight") and v.ndim == 2 else v for k, v in single.items()}
    save_safetensors(single, path)
