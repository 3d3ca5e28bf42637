"""IP-Adapter (paper §3.2): image prompts through decoupled cross-attention.

Two small pieces are added to a frozen SD UNet:
1. `ImageProjection` (§3.2.1): the CLIP image encoder's global embedding → a Linear layer →
   N = 4 tokens of the text-token width → LayerNorm. These are the "image tokens" c_i.
2. `DecoupledCrossAttention` (§3.2.2): every cross-attention layer of the UNet keeps its
   text branch and gains an image branch with its own key/value weights Wk′, Wv′ (`to_k_ip`,
   `to_v_ip`); the query Q = Z·Wq is shared. The two attention outputs are added:
       Z_new = Softmax(QKᵀ/√d)V + λ·Softmax(QK′ᵀ/√d)V′,   K′ = c_i·Wk′, V′ = c_i·Wv′
   λ (`scale`) is 1 in training; §3.2.3 makes it the user's knob at inference (λ = 0: plain SD).

`IPAdapter` holds both (`image_proj`, and `layers`: one Wk′/Wv′ pair per cross-attention layer, numbered
as the official files number them); `attach_ip_adapter` swaps each `attn2` of a UNet for a decoupled one
that *shares* the original projections (nothing is copied), `detach_ip_adapter` puts plain attention back.
The variants that swap piece 1 for something bigger (FaceID's MLP, Plus's Resampler) are in `projections.py`;
λ per block (InstantStyle) in `ip_scale.py`; reading the official files in `loading.py`.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from minipa.attention import Attention, attention, merge_heads, split_heads


class ImageProjection(nn.Module):
    """image embedding (B, E) → N image tokens (B, N, D)   (paper §3.2.1: Linear + LayerNorm)."""

    def __init__(self, image_embed_dim: int, cross_attention_dim: int, num_tokens: int = 4):
        super().__init__()
        self.num_tokens = num_tokens
        self.proj = nn.Linear(image_embed_dim, num_tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        # BEGIN ASSIGNMENT 13
        tokens = self.proj(image_embeds)  # (B, N·D)
        tokens = tokens.reshape(*image_embeds.shape[:-1], self.num_tokens, -1)  # (B, N, D)
        return self.norm(tokens)
        # END ASSIGNMENT 13


class ImageKeyValue(nn.Module):
    """The only new weights in a cross-attention layer: Wk′ and Wv′ (paper §3.2.2), no biases."""

    def __init__(self, cross_attention_dim: int, inner_dim: int):
        super().__init__()
        self.to_k_ip = nn.Linear(cross_attention_dim, inner_dim, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, inner_dim, bias=False)


def decoupled_attention(q, k, v, k_ip, v_ip, scale: float) -> torch.Tensor:
    """Softmax(QKᵀ/√d)V + λ·Softmax(QK′ᵀ/√d)V′   (paper §3.2.2, λ from §3.2.3). All (B, heads, L, d); λ = 0 is plain attention."""
    # BEGIN ASSIGNMENT 14
    text = attention(q, k, v)
    if scale == 0:
        return text  # skip the image branch: λ = 0 is exactly plain SD
    return text + scale * attention(q, k_ip, v_ip)
    # END ASSIGNMENT 14


class DecoupledCrossAttention(nn.Module):
    """A UNet cross-attention with an image branch. `to_q/to_k/to_v/to_out` are the original layer's own modules."""

    def __init__(self, base: nn.Module, kv: ImageKeyValue, scale: float = 1.0):
        super().__init__()
        self.heads, self.head_dim = base.heads, base.head_dim
        self.to_q, self.to_k, self.to_v, self.to_out = base.to_q, base.to_k, base.to_v, base.to_out  # shared, not copied
        self.to_k_ip, self.to_v_ip = kv.to_k_ip, kv.to_v_ip
        self.scale = scale  # λ
        self.masks = None  # regions: (n_prompts, H, W) in 0/1, or None (see `ip_scale.set_ip_masks`)

    def forward(self, x, context, image_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, HW, C); context: text tokens (B, 77, D); image_tokens: (B, N, D) or None → (B, HW, C)."""
        q = split_heads(self.to_q(x), self.heads)  # Q = Z·Wq, shared by both branches
        k, v = split_heads(self.to_k(context), self.heads), split_heads(self.to_v(context), self.heads)  # K = c_t·Wk, V = c_t·Wv
        if image_tokens is None:
            return self.to_out[0](merge_heads(attention(q, k, v)))  # no image prompt: the text branch alone
        k_ip = split_heads(self.to_k_ip(image_tokens), self.heads)  # K′ = c_i·Wk′  (B, heads, N, d)
        v_ip = split_heads(self.to_v_ip(image_tokens), self.heads)  # V′ = c_i·Wv′
        if self.masks is None:
            out = decoupled_attention(q, k, v, k_ip, v_ip, self.scale)  # (B, heads, HW, d)
        else:  # regions: each image prompt attended on its own, its output weighted per query by its mask
            weights = mask_weights(self.masks, q.shape[2]).to(q.dtype)  # (n, HW)
            parts = zip(k_ip.chunk(len(weights), dim=2), v_ip.chunk(len(weights), dim=2), weights)
            out = attention(q, k, v) + self.scale * sum(attention(q, kj, vj) * m[:, None] for kj, vj, m in parts)
        return self.to_out[0](merge_heads(out))

    def plain(self) -> Attention:
        """The original cross-attention again, built around the same (shared) projections."""
        with torch.device("meta"):
            attn = Attention(self.to_q.in_features, self.to_k.in_features, heads=self.heads, head_dim=self.head_dim)
        attn.to_q, attn.to_k, attn.to_v, attn.to_out = self.to_q, self.to_k, self.to_v, self.to_out
        return attn


def mask_weights(masks: torch.Tensor, num_queries: int) -> torch.Tensor:
    """Region masks (n, H, W) → (n, num_queries): each resized (bicubic) to a layer's h×w grid of queries,
    h·w = num_queries with the masks' aspect ratio: the rule of diffusers' `IPAdapterMaskProcessor.downsample`."""
    h = int(math.sqrt(num_queries / (masks.shape[2] / masks.shape[1])))
    h += num_queries % h != 0
    return F.interpolate(masks[None], size=(h, num_queries // h), mode="bicubic")[0].flatten(1)


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
    modules = dict(unet.named_modules())
    names = [name for name in modules if name.endswith(".attn2")]
    names.sort(key=lambda name: UNET_ORDER.index(name.split(".")[0]))  # stable: keeps order within a group
    return [(2 * i + 1, name, modules[name]) for i, name in enumerate(names)]


class IPAdapter(nn.Module):
    """image_proj + one `ImageKeyValue` per cross-attention layer, in `layers` under its official number.

    `image_proj` is the paper's `ImageProjection` over the global embedding (E = its width) unless given:
    `MLPProjection` (FaceID's layout) or `Resampler` (Plus, over patch features: E = the encoder's hidden width).
    """

    def __init__(self, image_embed_dim: int, cross_attention_dim: int, inner_dims: Mapping[int, int], num_tokens: int = 4,
                 image_proj: nn.Module | None = None):
        super().__init__()
        self.image_embed_dim = image_embed_dim  # E: what image_proj reads (embedding width, or hidden width for Plus)
        self.image_proj = image_proj or ImageProjection(image_embed_dim, cross_attention_dim, num_tokens)
        self.layers = nn.ModuleDict({str(i): ImageKeyValue(cross_attention_dim, dim) for i, dim in inner_dims.items()})

    @classmethod
    def for_unet(cls, unet: nn.Module, image_embed_dim: int, num_tokens: int = 4, image_proj: nn.Module | None = None):
        """An adapter shaped for `unet` (randomly initialised; see `init_from_text_attention`)."""
        dims = {i: attn.to_k.out_features for i, _, attn in cross_attention_layers(unet)}
        return cls(image_embed_dim, unet.config.cross_attention_dim, dims, num_tokens, image_proj)

    @torch.no_grad()
    def init_from_text_attention(self, unet: nn.Module) -> None:
        """Wk′ ← Wk, Wv′ ← Wv for every layer (paper §3.2.2): at the start the image branch reads its tokens as the
        text branch reads text, which speeds up training. Copies, not shared tensors: only Wk′, Wv′ train."""
        # BEGIN ASSIGNMENT 15
        for i, _, attn in cross_attention_layers(unet):  # i: the official number of the layer, the key of self.layers
            self.layers[str(i)].to_k_ip.weight.copy_(attn.to_k.weight)  # Wk′ ← Wk
            self.layers[str(i)].to_v_ip.weight.copy_(attn.to_v.weight)  # Wv′ ← Wv
        # END ASSIGNMENT 15

    @property
    def plus(self) -> bool:
        """True for IP-Adapter Plus: a `Resampler` over patch features instead of a Linear over the embedding."""
        return getattr(self.image_proj, "reads_patches", False)

    def image_tokens(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Image tokens (B, n_images·N, D) from (B, E) or (B, n_images, E) embeddings, or, for Plus, from
        (B, L, E) or (B, n_images, L, E) patch features: several images share one attention."""
        if image_embeds.ndim == (3 if self.plus else 2):
            image_embeds = image_embeds.unsqueeze(1)
        return self.image_proj(image_embeds).flatten(1, 2)  # (B, n_images, N, D) → (B, n_images·N, D)


def image_features(image_encoder, pixels: torch.Tensor, plus: bool = False) -> torch.Tensor:
    """What an IP-Adapter reads from CLIP-normalised pixels: the global image embeddings (n, E), or, for
    IP-Adapter Plus, the encoder's penultimate hidden states, every patch (n, L, E)."""
    out = image_encoder(pixels)
    return out.hidden_states[-2] if plus else out.image_embeds


def uncond_image_features(image_encoder, features: torch.Tensor, plus: bool = False) -> torch.Tensor:
    """"No image" for CFG's unconditional branch, as the official code and diffusers define it: a zero
    embedding (so the tokens are image_proj(0), not zeros); for Plus, the features of an all-zero (normalised) image."""
    if not plus:
        return torch.zeros_like(features)
    size = image_encoder.config.image_size
    zero_image = torch.zeros(1, 3, size, size, device=features.device, dtype=features.dtype)
    return image_features(image_encoder, zero_image, plus=True).expand_as(features)


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent), child, module)


def attach_ip_adapter(unet: nn.Module, adapter: IPAdapter, scale: float = 1.0) -> None:
    """Give every cross-attention layer of `unet` its image branch (in place, sharing all weights)."""
    layers = cross_attention_layers(unet)
    if sorted(map(int, adapter.layers)) != [i for i, _, _ in layers]:
        raise ValueError(f"this IP-Adapter has layers {sorted(map(int, adapter.layers))}, "
                         f"but the UNet's cross-attention layers are numbered {[i for i, _, _ in layers]}")
    for i, name, attn in layers:  # `attn` may already be decoupled: its text projections are taken, its image ones not
        _set_module(unet, name, DecoupledCrossAttention(attn, adapter.layers[str(i)], scale))


def detach_ip_adapter(unet: nn.Module) -> None:
    """Plain cross-attention again everywhere: the UNet is exactly what it was before `attach`."""
    for _, name, attn in cross_attention_layers(unet):
        if isinstance(attn, DecoupledCrossAttention):
            _set_module(unet, name, attn.plain())
