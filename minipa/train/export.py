"""Writing trained models in the formats users already have, so the tiny world loads like real SD 1.5.

    model_index.json                     diffusers StableDiffusionPipeline index
    unet/  vae/                          diffusers: config.json + diffusion_pytorch_model.safetensors
    text_encoder/  image_encoder/        transformers: config.json + model.safetensors
    tokenizer/                           vocab.json + merges.txt (+ the two small JSONs transformers reads)
    scheduler/scheduler_config.json      DDIMScheduler, SD 1.5's schedule
    ip-adapter.safetensors               the official flat layout: image_proj.* and ip_adapter.{1,3,…}.*
    SHA256SUMS                           the manifest `minipa.weights.verify_manifest` checks on load

Weights are stored in fp16 (the shipped model must stay small); the loaders cast them to the
dtype asked for. Every file is written atomically (temporary file, then rename).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from torch import nn

from minipa import keymap
from minipa.clip import CLIPTextConfig, CLIPVisionConfig
from minipa.ddpm import ScheduleConfig
from minipa.tokenizer import CLIPTokenizer
from minipa.unet import UNetConfig
from minipa.vae import VAEConfig
from minipa.weights import MANIFEST, save_safetensors, sha256_of

DIFFUSERS_VERSION = "0.30.0"  # the oldest diffusers these configs are written for
TRANSFORMERS_VERSION = "4.40.0"


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


def save_unet(unet: nn.Module, folder: Path, dtype=torch.float16) -> None:
    write_json(folder / "config.json", unet_config_dict(unet.config))
    save_safetensors(unet, folder / "diffusion_pytorch_model.safetensors", dtype=dtype)


def save_vae(vae: nn.Module, folder: Path, dtype=torch.float16) -> None:
    write_json(folder / "config.json", vae_config_dict(vae.config))
    save_safetensors(vae, folder / "diffusion_pytorch_model.safetensors", dtype=dtype)


def save_text_encoder(text_encoder: nn.Module, folder: Path, dtype=torch.float16) -> None:
    write_json(folder / "config.json", text_config_dict(text_encoder.config))
    save_safetensors(text_encoder, folder / "model.safetensors", dtype=dtype)


def save_image_encoder(image_encoder: nn.Module, folder: Path, dtype=torch.float16) -> None:
    write_json(folder / "config.json", vision_config_dict(image_encoder.config))
    save_safetensors(image_encoder, folder / "model.safetensors", dtype=dtype)


def save_tokenizer(tokenizer: CLIPTokenizer, folder: Path) -> None:
    """vocab.json + merges.txt, plus the settings transformers' CLIPTokenizer needs to read the folder."""
    tokenizer.save_pretrained(folder)
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
    """The official flat `.safetensors` layout: keys `image_proj.*` and `ip_adapter.{1,3,…}.to_{k,v}_ip.weight`."""
    state = adapter.state_dict()
    save_safetensors({key: state[name] for name, key in keymap.ip_adapter_file_keys(state).items()}, path, dtype=dtype)


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
