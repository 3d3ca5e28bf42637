"""Image-prompt controls beyond the paper: combining several images, a step range, regions, a negative
image prompt, and image features saved once and reused.

The paper (§3.2.3) gives one knob, λ. What IP-Adapter users built on top, and what this module adds:
- **combining** n image prompts into one (`combine`): add, subtract, average, norm-average, each a
  pure function below with its formula. For the base adapter the CLIP image embeddings are combined
  (as ComfyUI_IPAdapter_plus does: CLIP's embedding space is where image arithmetic is known to work);
  for IP-Adapter Plus the *tokens* are, because token j of every image answers the same learned
  Resampler query, while the patch features it reads are spatial (averaging them blends positions).
  "concat" (the default, and diffusers' only way) keeps every image's tokens side by side in one attention;
- **a step range** (`ip_steps`): the image branch only while i/T is in [start, end] (step i of T,
  from 0). With start = 0 this is diffusers' `IPAdapterScaleCutoffCallback(cutoff_step_ratio=end)`;
- **regions** (`load_masks`): one mask per image prompt; each prompt's attention output is weighted per
  query by its mask, resized to each attention layer's grid (`ip_adapter.mask_weights`, diffusers' rule);
- **a negative image prompt**: the unconditional branch's image tokens come from an image instead of
  "no image" (a zero embedding), the negative `ip_adapter_image_embeds` of diffusers;
- **saved features** (`ImagePrompt.save`/`load`): the image encoder's output for the prompts and the
  negatives, in a .safetensors file whose metadata records what made them, checked when it is used.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

COMBINE_MODES = ("concat", "add", "subtract", "average", "norm_average")
FEATURE_KINDS = ("image_embeds", "penultimate_hidden_states")  # base adapters, IP-Adapter Plus
FORMAT = "minipa.image_prompt/1"


# ─── Combining several image prompts: (n, …) → (1, …), weights w_k (default 1) ─────────────────────


def add(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Σ_k w_k·x_k"""
    return (w * x).sum(0, keepdim=True)


def subtract(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """w_1·x_1 − mean_{k≥2} w_k·x_k   (the first image, minus what the others have in common)"""
    rest = (w[1:] * x[1:]).mean(0, keepdim=True) if len(x) > 1 else 0
    return w[:1] * x[:1] - rest


def average(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Σ_k w_k·x_k / Σ_k w_k   (the weighted mean: one image is itself, whatever its weight)"""
    return add(x, w) / w.sum()


def norm_average(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """average(x_k/‖x_k‖) · mean_k ‖x_k‖   (each image counts by its weight alone, not its length; ‖·‖ over features;
    a zero x_k stays zero)"""
    norms = x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    return average(x / norms, w) * norms.mean(0, keepdim=True)


COMBINE = {"add": add, "subtract": subtract, "average": average, "norm_average": norm_average}


def combine(x: torch.Tensor, mode: str, weights: Sequence[float] | None = None) -> torch.Tensor:
    """n image prompts' features or tokens (n, …) → one (1, …) by `mode`; "concat" returns x as it is."""
    weights = check_combine(mode, weights, len(x))
    if mode == "concat":
        return x
    compute = torch.promote_types(x.dtype, torch.float32)  # at least float32, whatever the pipeline's dtype
    w = torch.tensor(weights, dtype=compute, device=x.device).reshape(-1, *[1] * (x.ndim - 1))
    return COMBINE[mode](x.to(compute), w).to(x.dtype)


def check_combine(mode: str, weights: Sequence[float] | None, n: int) -> list[float]:
    """The per-image weights (default 1), after checking `ip_combine` and `ip_weights` against n image prompts."""
    if mode not in COMBINE_MODES:
        raise ValueError(f"ip_combine: expected one of {', '.join(map(repr, COMBINE_MODES))}, got {mode!r}")
    if weights is None:
        return [1.0] * n
    weights = [float(v) for v in weights]
    if mode == "concat":
        raise ValueError("ip_weights: 'concat' puts every image in one attention, where a per-image weight has no "
                         "place; use ip_combine='average' (or 'add', …) to weight images, or ip_scale for all of them")
    if len(weights) != n:
        raise ValueError(f"ip_weights: expected {n} (one per image prompt), got {len(weights)}")
    if not all(math.isfinite(v) for v in weights) or (mode in ("average", "norm_average") and sum(weights) <= 0):
        raise ValueError(f"ip_weights: expected finite numbers{' with a positive sum' if 'average' in mode else ''}, got {weights}")
    return weights


# ─── A step range ──────────────────────────────────────────────────────────────────────────────────


def check_ip_steps(ip_steps) -> tuple[float, float]:
    """(start, end) fractions of the sampling schedule with 0 ≤ start ≤ end ≤ 1."""
    try:
        start, end = (float(v) for v in ip_steps)
    except (TypeError, ValueError):
        raise ValueError(f"ip_steps: expected (start, end), two fractions of the schedule, got {ip_steps!r}") from None
    if not 0 <= start <= end <= 1:
        raise ValueError(f"ip_steps: expected 0 ≤ start ≤ end ≤ 1, got ({start}, {end})")
    return start, end


def image_prompt_active(i: int, steps: int, ip_steps: tuple[float, float]) -> bool:
    """Is the image branch on at step i (from 0) of `steps`? When start ≤ i/steps ≤ end."""
    return ip_steps[0] <= i / steps <= ip_steps[1]


# ─── Regions ───────────────────────────────────────────────────────────────────────────────────────


def as_list(items) -> list:
    """One image, mask or path, or a list/tuple of them → a list."""
    return list(items) if isinstance(items, (list, tuple)) else [items]


def load_masks(masks, count: int, height: int, width: int) -> torch.Tensor:
    """One mask per image prompt → (count, height, width) of 0/1 floats, as diffusers' IPAdapterMaskProcessor
    makes them: a picture (PIL image or path) in grey levels, resized with Lanczos, or a 2-d array/tensor
    (resized to the nearest pixel); then ≥ 0.5 → 1, else 0. Another aspect ratio than the image's is refused
    (diffusers would stretch the mask without a word)."""
    masks = as_list(masks)
    if len(masks) != count:
        raise ValueError(f"ip_masks: expected {count} mask(s), one per image prompt, got {len(masks)}")
    return torch.stack([_load_mask(m, k, height, width) for k, m in enumerate(masks)])


def _load_mask(mask, k: int, height: int, width: int) -> torch.Tensor:
    if isinstance(mask, (str, Path)):
        mask = Image.open(mask)
    if isinstance(mask, Image.Image):
        size = (mask.height, mask.width)
    else:
        mask = torch.as_tensor(np.asarray(mask, dtype=np.float32))
        if mask.ndim != 2:
            raise ValueError(f"ip_masks[{k}]: expected a 2-d (height, width) array, got shape {tuple(mask.shape)}")
        size = tuple(mask.shape)
    if abs(size[1] * height - size[0] * width) > 0.01 * size[0] * width:
        raise ValueError(f"ip_masks[{k}]: a {size[1]}×{size[0]} mask does not have the image's aspect ratio "
                         f"({width}×{height}); crop or pad it to the same shape")
    if isinstance(mask, Image.Image):
        grey = mask.convert("L").resize((width, height), Image.Resampling.LANCZOS)
        mask = torch.from_numpy(np.asarray(grey, dtype=np.float32) / 255.0)
    elif size != (height, width):
        mask = torch.nn.functional.interpolate(mask[None, None], size=(height, width))[0, 0]
    return (mask >= 0.5).float()


# ─── Features saved once, used many times ──────────────────────────────────────────────────────────


def encoder_fingerprint(image_encoder) -> str:
    """A short name for an image encoder's weights: its size and two sums over its projection, rounded so
    that the same weights in float16, bfloat16 or float32 give the same name."""
    w, c = image_encoder.visual_projection.weight.detach().double(), image_encoder.config
    return f"CLIP vision h{c.hidden_size} p{c.projection_dim} l{c.num_hidden_layers} Σ|w|={w.abs().sum():.4g} Σw²={w.square().sum():.4g}"


@dataclass
class ImagePrompt:
    """What the IP-Adapter reads for n image prompts: their features (n, E), or for Plus (n, L, E), and the
    features of the unconditional branch (1 or n rows: a negative image, or "no image"), with what made them."""

    features: torch.Tensor
    negative: torch.Tensor
    kind: str  # one of FEATURE_KINDS
    encoder: str  # encoder_fingerprint of the image encoder that made them

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: image-prompt features are saved as .safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"features": self.features.contiguous().cpu(), "negative": self.negative.contiguous().cpu()}
        save_file(tensors, str(path), metadata={"format": FORMAT, "kind": self.kind, "encoder": self.encoder})
        return path

    @classmethod
    def load(cls, path: str | Path) -> ImagePrompt:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as err:
            raise ValueError(f"ip_embeds: {path} is not a readable .safetensors file ({err})") from None
        if meta.get("format") != FORMAT or set(tensors) != {"features", "negative"} or meta.get("kind") not in FEATURE_KINDS:
            raise ValueError(f"ip_embeds: {path} is not a minipa image-prompt file (made by `minipa encode-image`); "
                             f"found metadata {json.dumps(meta)} and tensors {sorted(tensors)}")
        return cls(tensors["features"], tensors["negative"], meta["kind"], meta.get("encoder", "?"))

    def check(self, adapter, image_encoder=None, where: str = "ip_embeds") -> None:
        """Refuse features the adapter cannot read, or that another image encoder made than the one loaded."""
        kind = FEATURE_KINDS[adapter.plus]
        if self.kind != kind:
            raise ValueError(f"{where}: these are {self.kind.replace('_', ' ')}, for "
                             f"{'IP-Adapter Plus' if self.kind == FEATURE_KINDS[1] else 'a base IP-Adapter'}; "
                             f"the loaded adapter reads {kind.replace('_', ' ')}")
        if self.features.shape[-1] != adapter.image_embed_dim:
            raise ValueError(f"{where}: {self.features.shape[-1]}-wide features, but the IP-Adapter reads "
                             f"{adapter.image_embed_dim}-wide ones: they were made with another image encoder")
        if image_encoder is not None and encoder_fingerprint(image_encoder) != self.encoder:
            raise ValueError(f"{where}: made with another image encoder ({self.encoder}) than the one loaded "
                             f"({encoder_fingerprint(image_encoder)}); encode the images again")
        if self.features.ndim != 2 + adapter.plus or len(self.negative) not in (1, len(self.features)):
            raise ValueError(f"{where}: expected features (n, …) and 1 or n negative rows, "
                             f"got {tuple(self.features.shape)} and {tuple(self.negative.shape)}")
