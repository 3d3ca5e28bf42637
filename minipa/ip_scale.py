"""λ, the image branch's weight at inference (paper §3.2.3): one number, or one per block (InstantStyle),
and per query: region masks, one per image prompt (`set_ip_masks`).

InstantStyle showed that the UNet's blocks do different jobs (one up block carries style, one down
block layout), so λ may be a mapping that weights each block's decoupled cross-attention on its own.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Mapping

from torch import nn

from minipa.ip_adapter import DecoupledCrossAttention, cross_attention_layers


def _block_key(name: str) -> tuple[str, str | None]:
    """"down_blocks.2.attentions.1.…" → ("down", "block_2"); "mid_block.…" → ("mid", None)."""
    parts = name.split(".")
    return ("mid", None) if parts[0] == "mid_block" else (parts[0].removesuffix("_blocks"), f"block_{parts[1]}")


def _check_scale(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"ip_scale{where} must be a finite number >= 0 (0 = ignore the image prompt), got {value!r}")
    return float(value)


def layer_scales(unet: nn.Module, scale: float | Mapping) -> dict[str, float]:
    """λ for each cross-attention layer, by module name.

    `scale` is a number (every layer), or a mapping in InstantStyle's form, e.g.
    `{"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}}`: groups "down"/"mid"/"up";
    a group's value is a number, or per block ("block_i": a number, or a list with one number per
    attention layer in that block). Layers the mapping does not mention get λ = 0 (as diffusers does).
    """
    names = [name for _, name, _ in cross_attention_layers(unet)]
    if not isinstance(scale, Mapping):
        return dict.fromkeys(names, _check_scale(scale, ""))
    if set(scale) - {"down", "mid", "up"}:
        raise ValueError(f"ip_scale mapping: unknown group(s) {sorted(set(scale) - {'down', 'mid', 'up'})}; expected 'down', 'mid' and/or 'up'")
    per_block: dict[tuple[str, str | None], list[str]] = {}
    for name in names:
        per_block.setdefault(_block_key(name), []).append(name)
    for group, value in scale.items():
        blocks = {b for g, b in per_block if g == group}
        if isinstance(value, Mapping) and set(value) - blocks:
            raise ValueError(f"ip_scale[{group!r}]: no block(s) {sorted(set(value) - blocks)} with attention; the UNet has {sorted(blocks)}")

    scales = {}
    for (group, block), layers in per_block.items():
        value, where = scale.get(group, 0.0), f"[{group!r}]"
        if isinstance(value, Mapping):
            value, where = value.get(block, 0.0), f"{where}[{block!r}]"
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if len(values) not in (1, len(layers)):
            raise ValueError(f"ip_scale{where}: expected one value or {len(layers)} (one per attention layer), got {len(values)}")
        values = values * len(layers) if len(values) == 1 else values
        scales.update({name: _check_scale(v, where) for name, v in zip(layers, values)})
    return scales


def set_ip_scale(unet: nn.Module, scale: float | Mapping) -> None:
    """Set λ on every decoupled cross-attention layer (a number, or InstantStyle's per-block mapping)."""
    modules = dict(unet.named_modules())
    for name, value in layer_scales(unet, scale).items():
        if not isinstance(modules[name], DecoupledCrossAttention):
            raise ValueError("set_ip_scale: no IP-Adapter is attached to this UNet (attach_ip_adapter first)")
        modules[name].scale = value


def set_ip_masks(unet: nn.Module, masks) -> None:
    """Give every decoupled cross-attention layer the region masks (n_prompts, H, W) from
    `image_prompt.load_masks`, or None for no regions; each layer resizes them to its own grid."""
    for _, _, attn in cross_attention_layers(unet):
        if not isinstance(attn, DecoupledCrossAttention):
            raise ValueError("set_ip_masks: no IP-Adapter is attached to this UNet (attach_ip_adapter first)")
        attn.masks = masks
