"""Reading the JSON configs that diffusers and transformers write, into minipa's dataclasses (the loading layer).

Every model has a small config dataclass (`UNetConfig`, `VAEConfig`, …) with `sd15()`-style
constructors, beside its modules. `read_config(path, UNetConfig)` fills one from a `config.json` and refuses
what minipa cannot honour: a field set to a value we do not implement is an error that names the field,
the value found and the value supported, never a silent fallback.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Mapping

from minipa.clip import CLIPTextConfig, CLIPVisionConfig
from minipa.ddpm import ScheduleConfig
from minipa.unet import UNetConfig
from minipa.vae import VAEConfig


class ConfigError(ValueError):
    """A config file that is missing, unreadable or asks for something minipa does not support."""


def read_json(path: str | Path, what: str, error: type[Exception] = ConfigError) -> dict:
    """Read a JSON object from `path`; `what` names the file's role in error messages, raised as `error`."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what}: expected a JSON file at {path}, but there is no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise error(f"{what}: {path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise error(f"{what}: {path} should hold a JSON object, found {type(data).__name__}")
    return data


def config_from_dict(
    cls: type,
    data: Mapping[str, Any],
    *,
    family: str,
    source: str | Path = "<dict>",
    fixed: Mapping[str, Any] = {},
    ignored: tuple[str, ...] = (),
):
    """Build dataclass `cls` from a diffusers/transformers config mapping.

    - keys starting with "_" (`_class_name`, `_diffusers_version`, …) are bookkeeping and skipped;
    - `fixed` lists settings minipa does not implement: each is accepted only with the value
      that switches the feature off, anything else is an error;
    - `ignored` lists settings that only tune a feature that is switched off (accepted, no effect);
    - any other key that is not a dataclass field is an error, so nothing is silently ignored.
    Fields missing from the file keep the dataclass defaults.
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    values, problems = {}, []
    for key, value in data.items():
        if key.startswith("_") or key in ignored:
            continue
        if key in fields:
            values[key] = tuple(value) if isinstance(value, list) else value
        elif key in fixed:
            if value != fixed[key]:
                problems.append(f"{key}={value!r} is not supported (minipa supports {fixed[key]!r})")
        else:
            problems.append(f"{key}={value!r} is not a setting of {family}")
    hints = typing.get_type_hints(cls)
    problems += [
        f"{name}={value!r} should be {_describe(hints[name])}" for name, value in values.items() if not _matches(value, hints[name])
    ]
    if problems:
        raise ConfigError(f"{source}: this config is not one minipa can build as {family}:\n  - " + "\n  - ".join(problems))
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{source}: invalid {family} config: {err}") from None


def _matches(value, hint) -> bool:
    """Does a JSON value fit a dataclass field's type (int, float, bool, str, tuples, optionals)?"""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arm) for arm in args)
    if origin is tuple:
        item = args[0] if args else Any
        return isinstance(value, tuple) and all(_matches(v, item) for v in value)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True  # anything richer is left to the dataclass's own checks


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arm) for arm in args)
    if origin is tuple:
        return f"a list of {_describe(args[0]) if args else 'values'}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}.get(hint, str(hint))


# ─── The configs of each model family ───────────────────────────────────────────────────────────
# Settings minipa does not implement are accepted only with the value that switches them off.

UNET_SWITCHED_OFF = {
    "center_input_sample": False, "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False,
    "mid_block_only_cross_attention": None, "downsample_padding": 1, "mid_block_scale_factor": 1, "dropout": 0.0,
    "act_fn": "silu", "transformer_layers_per_block": 1, "reverse_transformer_layers_per_block": None,
    "num_attention_heads": None,  # SD 1.x gives the head count as `attention_head_dim` (legacy naming)
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "dual_cross_attention": False,
    "use_linear_projection": False,  # SD 2.x uses Linear proj_in/proj_out
    "class_embed_type": None, "num_class_embeds": None, "class_embeddings_concat": False,
    "projection_class_embeddings_input_dim": None, "addition_embed_type": None,  # SDXL: "text_time"
    "addition_time_embed_dim": None, "addition_embed_type_num_heads": 64, "upcast_attention": False,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "attention_type": "default", "cross_attention_norm": None,
}
VAE_SWITCHED_OFF = {"act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
                    "shift_factor": None, "latents_mean": None, "latents_std": None}
SCHEDULE_SWITCHED_OFF = {"trained_betas": None, "thresholding": False, "rescale_betas_zero_snr": False, "variance_type": "fixed_small"}
# settings of features that are off, or of samplers whose schedule is the same: accepted, no effect
SCHEDULE_IGNORED = ("dynamic_thresholding_ratio", "sample_max_value", "skip_prk_steps")
# keys of a transformers CLIP config.json that do not change inference: bookkeeping, the dtype (it comes from the
# weights or `dtype=`), random initialisation, dropout (training only) and tokenizer facts
CLIP_IGNORED = ("architectures", "transformers_version", "torch_dtype", "dtype", "initializer_range", "initializer_factor",
                "dropout", "attention_dropout", "bos_token_id", "pad_token_id", "model_type")


@dataclasses.dataclass(frozen=True)
class Family:
    name: str  # in error messages: "… not one minipa can build as {name}"
    kind_key: str  # the key naming the class in the file, and its expected value
    kind: str
    fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    ignored: tuple[str, ...] = ()


FAMILIES = {
    UNetConfig: Family("an SD 1.x UNet", "_class_name", "UNet2DConditionModel", UNET_SWITCHED_OFF),
    VAEConfig: Family("SD VAE (AutoencoderKL)", "_class_name", "AutoencoderKL", VAE_SWITCHED_OFF),
    ScheduleConfig: Family("a DDPM-family noise schedule", "", "", SCHEDULE_SWITCHED_OFF, SCHEDULE_IGNORED),
    CLIPTextConfig: Family("CLIPTextConfig", "model_type", "clip_text_model", ignored=CLIP_IGNORED),
    CLIPVisionConfig: Family("CLIPVisionConfig", "model_type", "clip_vision_model", ignored=CLIP_IGNORED),
}


def read_config(path: str | Path, cls: type):
    """A diffusers/transformers `config.json` → minipa's config dataclass `cls` (a key of FAMILIES).

    A file written for another class (`_class_name`, `model_type`) is refused by name before any setting is read."""
    family = FAMILIES[cls]
    data = read_json(path, f"{cls.__name__} config")
    found = data.get(family.kind_key, family.kind)
    if found != family.kind:
        raise ConfigError(f"{path}: {family.kind_key} is {found!r}, expected {family.kind!r}: this is not the config of "
                          f"{family.name} (is this the right folder?)")
    return config_from_dict(cls, data, family=family.name, source=path, fixed=family.fixed, ignored=family.ignored)
