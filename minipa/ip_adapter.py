"""IP-Adapter (paper §3.2): image prompts through decoupled cross-attention.

Two small pieces are added to a frozen SD UNet:
1. `ImageProjection` (paper §3.2.1): the CLIP image encoder's global embedding → a Linear layer →
   N = 4 tokens of the text-token width → LayerNorm. These are the "image tokens" c_i.
2. `DecoupledCrossAttention` (paper §3.2.2): every cross-attention layer of the UNet keeps its
   text branch and gains an image branch with its own key/value weights Wk′, Wv′ (`to_k_ip`,
   `to_v_ip`); the query Q = Z·Wq is shared. The two attention outputs are added:
       Z_new = Softmax(QKᵀ/√d)V + λ·Softmax(QK′ᵀ/√d)V′,   K′ = c_i·Wk′, V′ = c_i·Wv′
   where λ (`scale`) is 1 in the paper's training and chosen by the user at inference.

`MLPProjection` puts a hidden layer into piece 1 (the layout of IP-Adapter FaceID's image_proj).
IP-Adapter Plus swaps piece 1 for a `Resampler`: 16 learned queries attend to the encoder's
penultimate hidden states (every patch), so the tokens can carry detail the global embedding drops.

`IPAdapter` holds both, with the official file layout (`image_proj.*`, `ip_adapter.{1,3,…,31}.*`);
`attach_ip_adapter` swaps each `attn2` of a UNet for a decoupled one that *shares* the original
projections (nothing is copied), `detach_ip_adapter` puts plain attention back.
"""

from __future__ import annotations

import math
from numbers import Real
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from minipa.attention import Attention, attention
from minipa.weights import Checkpoint, WeightsError, build_and_load


class ImageProjection(nn.Module):
    """image embedding (B, E) → N image tokens (B, N, D)   (paper §3.2.1: Linear + LayerNorm)."""

    def __init__(self, image_embed_dim: int, cross_attention_dim: int, num_tokens: int = 4):
        super().__init__()
        self.num_tokens = num_tokens
        self.proj = nn.Linear(image_embed_dim, num_tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        # BEGIN ASSIGNMENT 7
        tokens = self.proj(image_embeds)  # (B, N·D)
        tokens = tokens.reshape(*image_embeds.shape[:-1], self.num_tokens, -1)  # (B, N, D)
        return self.norm(tokens)
        # END ASSIGNMENT 7


class MLPProjection(ImageProjection):
    """image embedding (B, E) → N image tokens (B, N, D) through a two-layer MLP, then LayerNorm.

    `ImageProjection` with a hidden layer: Linear(E, m·E) → GELU → Linear(m·E, N·D) → LayerNorm(D).
    This is the image_proj layout of the official IP-Adapter FaceID (keys `proj.0`, `proj.2`, `norm`;
    diffusers calls it `IPAdapterFaceIDImageProjection`), which reads a face-recognition embedding;
    here it reads the same CLIP global embedding as the base adapter. A linear map can only read what
    is linearly laid out in the embedding; the hidden layer lets the tokens depend on it non-linearly.
    """

    def __init__(self, image_embed_dim: int, cross_attention_dim: int, num_tokens: int = 4, mult: int = 2):
        nn.Module.__init__(self)  # `forward` is ImageProjection's (proj → N tokens → norm); only `proj` differs
        self.num_tokens = num_tokens
        hidden = mult * image_embed_dim
        self.proj = nn.Sequential(nn.Linear(image_embed_dim, hidden), nn.GELU(), nn.Linear(hidden, num_tokens * cross_attention_dim))
        self.norm = nn.LayerNorm(cross_attention_dim)


class PerceiverAttention(Attention):
    """The Resampler's attention: learned queries (latents) read the image features and themselves.

    Keys and values come from [features; latents] (the latents see each other too); one `to_kv`
    holds Wk and Wv stacked, as in the official files. No biases. Only `split_heads`/`merge_heads`
    come from `Attention`; the projections are its own.
    """

    def __init__(self, dim: int, heads: int, head_dim: int = 64):
        nn.Module.__init__(self)
        self.heads, self.head_dim = heads, head_dim
        self.norm1 = nn.LayerNorm(dim)  # for the image features
        self.norm2 = nn.LayerNorm(dim)  # for the latents
        self.to_q = nn.Linear(dim, heads * head_dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * head_dim, bias=False)
        self.to_out = nn.Linear(heads * head_dim, dim, bias=False)

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """features: (B, L, dim), latents: (B, Q, dim) → (B, Q, dim), the update to add to the latents."""
        features, latents = self.norm1(features), self.norm2(latents)
        q = self.split_heads(self.to_q(latents))
        k, v = self.to_kv(torch.cat([features, latents], dim=1)).chunk(2, dim=-1)  # (B, L + Q, inner) each
        out = attention(q, self.split_heads(k), self.split_heads(v))  # (B, heads, Q, d)
        return self.to_out(self.merge_heads(out))


class Resampler(nn.Module):
    """IP-Adapter Plus's image projection: patch features (B, L, E) → N image tokens (B, N, D).

    A Perceiver resampler: N learned queries (`latents`) go through `depth` blocks of attention over
    the CLIP image encoder's penultimate hidden states (every patch, not just the class token) and a
    feed-forward layer, both residual; then a Linear to the text-token width D and a LayerNorm.
    The global embedding keeps *what* is in the image; the patches also keep *where* and *how*
    (shape outlines, textures), which is the fine detail the Plus variant exists for.
    """

    def __init__(self, embed_dim: int, output_dim: int, *, hidden_dim: int | None = None, num_tokens: int = 16, depth: int = 4,
                 heads: int | None = None, head_dim: int = 64, ff_mult: int = 4):
        """Defaults are the official SD 1.5 Plus: hidden = output width, 4 blocks, heads of 64, 16 tokens."""
        super().__init__()
        self.num_tokens = num_tokens
        hidden_dim = hidden_dim or output_dim
        heads = heads or max(1, hidden_dim // head_dim)
        self.latents = nn.Parameter(torch.randn(1, num_tokens, hidden_dim) / hidden_dim**0.5)
        self.proj_in = nn.Linear(embed_dim, hidden_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([
                PerceiverAttention(hidden_dim, heads, head_dim),
                nn.Sequential(nn.LayerNorm(hidden_dim), nn.Linear(hidden_dim, ff_mult * hidden_dim, bias=False), nn.GELU(),
                              nn.Linear(ff_mult * hidden_dim, hidden_dim, bias=False)),
            ])
            for _ in range(depth)
        )
        self.proj_out = nn.Linear(hidden_dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features: (…, L, E), e.g. CLIP's hidden_states[-2] → (…, N, D)."""
        lead = features.shape[:-2]
        x = self.proj_in(features.reshape(-1, *features.shape[-2:]))  # (B, L, hidden)
        latents = self.latents.expand(len(x), -1, -1)
        for attn, ff in self.layers:
            latents = latents + attn(x, latents)
            latents = latents + ff(latents)
        tokens = self.norm_out(self.proj_out(latents))  # (B, N, D)
        return tokens.reshape(*lead, *tokens.shape[1:])


class ImageKeyValue(nn.Module):
    """The only new weights in a cross-attention layer: Wk′ and Wv′ (paper §3.2.2), no biases."""

    def __init__(self, cross_attention_dim: int, inner_dim: int):
        super().__init__()
        self.to_k_ip = nn.Linear(cross_attention_dim, inner_dim, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, inner_dim, bias=False)


def decoupled_attention(q, k, v, k_ip, v_ip, scale: float) -> torch.Tensor:
    """Softmax(QKᵀ/√d)V + λ·Softmax(QK′ᵀ/√d)V′   (paper §3.2.2). All (B, heads, L, d); λ = 0 is plain attention."""
    # BEGIN ASSIGNMENT 8
    text = attention(q, k, v)
    if scale == 0:
        return text  # skip the image branch: λ = 0 is exactly plain SD
    return text + scale * attention(q, k_ip, v_ip)
    # END ASSIGNMENT 8


class DecoupledCrossAttention(Attention):
    """A UNet cross-attention with an image branch. `to_q/to_k/to_v/to_out` are the original layer's own modules."""

    def __init__(self, base: Attention, kv: ImageKeyValue, scale: float = 1.0):
        nn.Module.__init__(self)  # no new text projections: we adopt the base layer's, below
        self.heads, self.head_dim = base.heads, base.head_dim
        self.to_q, self.to_k, self.to_v, self.to_out = base.to_q, base.to_k, base.to_v, base.to_out
        self.to_k_ip, self.to_v_ip = kv.to_k_ip, kv.to_v_ip
        self.scale = scale  # λ

    def forward(self, x, context, image_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, HW, C); context: text tokens (B, 77, D); image_tokens: (B, N, D) → (B, HW, C)."""
        if image_tokens is None:
            return super().forward(x, context)
        q = self.split_heads(self.to_q(x))  # Q = Z·Wq, shared by both branches
        k, v = self.split_heads(self.to_k(context)), self.split_heads(self.to_v(context))  # K = c_t·Wk, V = c_t·Wv
        k_ip = self.split_heads(self.to_k_ip(image_tokens))  # K′ = c_i·Wk′  (B, heads, N, d)
        v_ip = self.split_heads(self.to_v_ip(image_tokens))  # V′ = c_i·Wv′
        out = decoupled_attention(q, k, v, k_ip, v_ip, self.scale)  # (B, heads, HW, d)
        return self.to_out[0](self.merge_heads(out))

    def plain(self) -> Attention:
        """The original cross-attention again, built around the same (shared) projections."""
        with torch.device("meta"):
            attn = Attention(self.to_q.in_features, self.to_k.in_features, heads=self.heads, head_dim=self.head_dim)
        attn.to_q, attn.to_k, attn.to_v, attn.to_out = self.to_q, self.to_k, self.to_v, self.to_out
        return attn


# ─── Where the adapter plugs in ─────────────────────────────────────────────────────────────────

UNET_ORDER = ("down_blocks", "up_blocks", "mid_block")  # the official numbering walks the UNet in this order


def cross_attention_layers(unet: nn.Module) -> list[tuple[int, str, nn.Module]]:
    """The UNet's cross-attention layers as (official index, module name, module).

    The official IP-Adapter numbers all attention layers (self and cross) of the UNet in the order
    down blocks, up blocks, mid block; self-attention (`attn1`) takes the even numbers and
    cross-attention (`attn2`) the odd ones. For SD 1.5 this gives 16 layers:
        1, 3, …, 11   down_blocks.{0,1,2}.attentions.{0,1}
        13, 15, …, 29 up_blocks.{1,2,3}.attentions.{0,1,2}
        31            mid_block.attentions.0
    """
    names = [name for name, module in unet.named_modules() if name.endswith(".attn2")]
    names.sort(key=lambda name: UNET_ORDER.index(name.split(".")[0]))  # stable: keeps order within a group
    modules = dict(unet.named_modules())
    return [(2 * i + 1, name, modules[name]) for i, name in enumerate(names)]


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent), child, module)


class IPAdapter(nn.Module):
    """image_proj + one `ImageKeyValue` per cross-attention layer; state_dict keys are the official ones.

    `resampler=None` is the base adapter (`ImageProjection` over the global embedding, E = its width);
    `mlp=m` gives it an `MLPProjection` with a hidden layer m·E wide instead (FaceID's layout);
    a dict of `Resampler` options (may be empty) makes IP-Adapter Plus (E = the encoder's hidden width).
    """

    def __init__(self, image_embed_dim: int, cross_attention_dim: int, inner_dims: Mapping[int, int], num_tokens: int = 4,
                 *, resampler: Mapping | None = None, mlp: int | None = None):
        super().__init__()
        self.image_embed_dim = image_embed_dim  # E: what image_proj reads (embedding width, or hidden width for Plus)
        if resampler is not None and mlp is not None:
            raise ValueError("IPAdapter: pass resampler= (Plus) or mlp= (an MLP image projection), not both")
        if resampler is not None:
            self.image_proj = Resampler(image_embed_dim, cross_attention_dim, num_tokens=num_tokens, **resampler)
        else:
            self.image_proj = image_projection(image_embed_dim, cross_attention_dim, num_tokens, mlp)
        self.ip_adapter = nn.ModuleDict({str(i): ImageKeyValue(cross_attention_dim, dim) for i, dim in inner_dims.items()})

    @classmethod
    def for_unet(cls, unet: nn.Module, image_embed_dim: int, num_tokens: int = 4, *, resampler: Mapping | None = None,
                 mlp: int | None = None) -> "IPAdapter":
        """An adapter shaped for `unet` (randomly initialised; see `init_from_text_attention`)."""
        dims = {i: attn.to_k.out_features for i, _, attn in cross_attention_layers(unet)}
        return cls(image_embed_dim, unet.config.cross_attention_dim, dims, num_tokens, resampler=resampler, mlp=mlp)

    @torch.no_grad()
    def init_from_text_attention(self, unet: nn.Module) -> None:
        """Wk′ ← Wk, Wv′ ← Wv for every layer: the paper's initialisation, for faster convergence."""
        for i, _, attn in cross_attention_layers(unet):
            kv = self.ip_adapter[str(i)]
            kv.to_k_ip.weight.copy_(attn.to_k.weight)
            kv.to_v_ip.weight.copy_(attn.to_v.weight)

    @property
    def plus(self) -> bool:
        """True for IP-Adapter Plus: a `Resampler` over patch features instead of a Linear over the embedding."""
        return isinstance(self.image_proj, Resampler)

    def image_tokens(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Image tokens (B, n_images·N, D) from (B, E) or (B, n_images, E) embeddings, or, for Plus, from
        (B, L, E) or (B, n_images, L, E) patch features: several images share one attention."""
        if image_embeds.ndim == (3 if self.plus else 2):
            image_embeds = image_embeds.unsqueeze(1)
        tokens = self.image_proj(image_embeds)  # (B, n_images, N, D)
        return tokens.flatten(1, 2)


def attach_ip_adapter(unet: nn.Module, adapter: IPAdapter, scale: float = 1.0) -> None:
    """Give every cross-attention layer of `unet` its image branch (in place, sharing all weights)."""
    layers = cross_attention_layers(unet)
    if sorted(int(i) for i in adapter.ip_adapter.keys()) != [i for i, _, _ in layers]:
        raise ValueError(
            f"this IP-Adapter has layers {sorted(int(i) for i in adapter.ip_adapter.keys())}, "
            f"but the UNet's cross-attention layers are numbered {[i for i, _, _ in layers]}"
        )
    for i, name, attn in layers:
        base = attn.plain() if isinstance(attn, DecoupledCrossAttention) else attn
        _set_module(unet, name, DecoupledCrossAttention(base, adapter.ip_adapter[str(i)], scale))


def detach_ip_adapter(unet: nn.Module) -> None:
    """Plain cross-attention again everywhere: the UNet is exactly what it was before `attach`."""
    for _, name, attn in cross_attention_layers(unet):
        if isinstance(attn, DecoupledCrossAttention):
            _set_module(unet, name, attn.plain())


# ─── λ: one number, or one per block (InstantStyle) ─────────────────────────────────────────────


def _block_key(name: str) -> tuple[str, str | None, int | None]:
    """"down_blocks.2.attentions.1.…" → ("down", "block_2", 1); "mid_block.…" → ("mid", None, None)."""
    parts = name.split(".")
    if parts[0] == "mid_block":
        return "mid", None, None
    return parts[0].removesuffix("_blocks"), f"block_{parts[1]}", int(parts[3])


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
    layers = cross_attention_layers(unet)
    if not isinstance(scale, Mapping):
        value = _check_scale(scale, "")
        return {name: value for _, name, _ in layers}
    unknown = set(scale) - {"down", "mid", "up"}
    if unknown:
        raise ValueError(f"ip_scale mapping: unknown group(s) {sorted(unknown)}; expected 'down', 'mid' and/or 'up'")
    per_block: dict[tuple[str, str | None], list[str]] = {}
    for _, name, _ in layers:
        group, block, _ = _block_key(name)
        per_block.setdefault((group, block), []).append(name)
    for group, groups_value in scale.items():
        if isinstance(groups_value, Mapping):
            blocks = {b for g, b in per_block if g == group}
            if set(groups_value) - blocks:
                raise ValueError(f"ip_scale[{group!r}]: no block(s) {sorted(set(groups_value) - blocks)} with attention; the UNet has {sorted(blocks)}")

    scales = {}
    for (group, block), names in per_block.items():
        value = scale.get(group, 0.0)
        if isinstance(value, Mapping):
            value = value.get(block, 0.0)
        where = f"[{group!r}]" + (f"[{block!r}]" if isinstance(scale.get(group), Mapping) else "")
        if isinstance(value, (list, tuple)):
            if len(value) == 1:
                value = list(value) * len(names)
            if len(value) != len(names):
                raise ValueError(f"ip_scale{where}: expected one value or {len(names)} (one per attention layer), got {len(value)}")
        else:
            value = [value] * len(names)
        scales.update({name: _check_scale(v, where) for name, v in zip(names, value)})
    return scales


def set_ip_scale(unet: nn.Module, scale: float | Mapping) -> None:
    """Set λ on every decoupled cross-attention layer (a number, or InstantStyle's per-block mapping)."""
    scales = layer_scales(unet, scale)
    modules = dict(unet.named_modules())
    for name, value in scales.items():
        if not isinstance(modules[name], DecoupledCrossAttention):
            raise ValueError("set_ip_scale: no IP-Adapter is attached to this UNet (attach_ip_adapter first)")
        modules[name].scale = value


# ─── Loading the official checkpoints ───────────────────────────────────────────────────────────

FAMILY = ("an IP-Adapter for SD 1.x (base: image_proj = Linear + LayerNorm, or FaceID's MLP + LayerNorm; Plus: a Resampler; "
          "to_k_ip/to_v_ip per cross-attention layer)")


def describe_ip_adapter(shapes: Mapping[str, tuple]) -> str:
    """A guess at which IP-Adapter variant a file holds, from its key names and shapes."""
    keys = list(shapes)
    if any("perceiver" in k for k in keys):
        return "an IP-Adapter FaceID Plus (an MLP and a Resampler over face embeddings), which minipa does not support"
    if "image_proj.proj.3.weight" in shapes:
        return "an IP-Adapter Full (an MLP over every patch feature), which minipa does not support"
    if any("_lora." in k for k in keys):
        return "an IP-Adapter FaceID with LoRA weights for the UNet's attention, which minipa does not support"
    widths = {shape[1] for k, shape in shapes.items() if k.endswith("to_k_ip.weight")}
    if widths == {2048}:
        return "an IP-Adapter for SDXL (2048-wide text tokens)"
    if not any(k.startswith(("image_proj.", "ip_adapter.")) for k in keys):
        return "not an IP-Adapter (no image_proj./ip_adapter. keys)"
    variant = ("an IP-Adapter Plus (a Resampler in image_proj)" if "image_proj.latents" in shapes else
               "an IP-Adapter with an MLP image projection (FaceID's layout)" if "image_proj.proj.0.weight" in shapes else "an IP-Adapter")
    return f"{variant} whose image branch takes {sorted(widths)}-wide tokens"


def _resampler_options(shapes: Mapping[str, tuple], D: int) -> tuple[int, int, dict] | None:
    """(E, N, Resampler options) read from an IP-Adapter Plus file's shapes; None if they do not fit."""
    latents, proj_in, q, ff = (shapes.get(f"image_proj.{k}") for k in ("latents", "proj_in.weight", "layers.0.0.to_q.weight", "layers.0.1.1.weight"))
    if None in (latents, proj_in, q, ff) or len(latents) != 3 or shapes.get("image_proj.proj_out.weight", (None,))[0] != D:
        return None
    hidden = latents[2]
    depth = len({k.split(".")[2] for k in shapes if k.startswith("image_proj.layers.")})
    heads, head_dim = (q[0] // 64, 64) if q[0] % 64 == 0 else (1, q[0])  # the official heads are 64 wide
    return proj_in[1], latents[1], dict(hidden_dim=hidden, depth=depth, heads=heads, head_dim=head_dim, ff_mult=ff[0] // hidden)


def image_projection(image_embed_dim: int, cross_attention_dim: int, num_tokens: int, mlp: int | None = None) -> nn.Module:
    """The base adapter's image_proj: `ImageProjection`, or with `mlp=m` an `MLPProjection` (hidden layer m·E)."""
    if mlp is None:
        return ImageProjection(image_embed_dim, cross_attention_dim, num_tokens)
    return MLPProjection(image_embed_dim, cross_attention_dim, num_tokens, mult=mlp)


def projection_sizes(shapes: Mapping[str, tuple], D: int, prefix: str = "image_proj.") -> tuple[int, int, int | None] | None:
    """(E, N, m) of an `image_projection` read from its weights' shapes (m None for the Linear one), or None
    if the shapes under `prefix` are neither layout with D-wide tokens.
    Linear: `proj.weight` is (N·D, E). MLP: `proj.0.weight` is (m·E, E), `proj.2.weight` (N·D, m·E)."""
    proj, hidden, out = (shapes.get(f"{prefix}proj{k}.weight") for k in ("", ".0", ".2"))
    if proj is not None and len(proj) == 2 and proj[0] % D == 0:
        return proj[1], proj[0] // D, None
    if (hidden is not None and out is not None and len(hidden) == len(out) == 2 and hidden[0] % hidden[1] == 0
            and out[1] == hidden[0] and out[0] % D == 0):
        return hidden[1], out[0] // D, hidden[0] // hidden[1]
    return None


def load_ip_adapter(path: str | Path, unet: nn.Module, *, dtype=None, device="cpu") -> IPAdapter:
    """Load an official IP-Adapter for `unet`, `.bin` (nested) or `.safetensors` (flat); strict about every key.

    Base (`ip-adapter_sd15`): E and N are read from `image_proj.proj.weight` ((N·D, E)).
    MLP image projection (FaceID's layout): E and m from `proj.0.weight` ((m·E, E)), N from `proj.2.weight` ((N·D, m·E)).
    Plus (`ip-adapter-plus_sd15`): the Resampler's sizes from its `latents` ((1, N, hidden)), `proj_in`
    ((hidden, E)) and layers. D must be the UNet's text-token width.
    """
    checkpoint = Checkpoint(path)
    shapes = checkpoint.shapes
    D = unet.config.cross_attention_dim
    resampler = mlp = None
    if "image_proj.latents" in shapes and (plus := _resampler_options(shapes, D)) is not None:
        image_embed_dim, num_tokens, resampler = plus
    elif (sizes := projection_sizes(shapes, D)) is not None:
        image_embed_dim, num_tokens, mlp = sizes
    else:
        raise WeightsError(
            f"{checkpoint.path}: does not match {FAMILY} with {D}-wide tokens.\n"
            f"This file looks like: {describe_ip_adapter(shapes)}."
        )
    names = {k: k for k in checkpoint.keys()}
    build = lambda: IPAdapter.for_unet(unet, image_embed_dim, num_tokens, resampler=resampler, mlp=mlp)  # noqa: E731
    return build_and_load(build, checkpoint, names, family=f"{FAMILY}, for this UNet", dtype=dtype, device=device,
                          describe=describe_ip_adapter)
