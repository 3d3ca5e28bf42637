"""The UNet's attention layers: where the text (and, with IP-Adapter, the image) enters the image features.

Transformer2DModel flattens a feature map into a sequence of H·W tokens and runs
BasicTransformerBlocks on it: self-attention among pixels, cross-attention from pixels to the
text tokens (paper §3.1: "the UNet attends to the CLIP text features"), then a GEGLU feed-forward.
IP-Adapter (paper §3.2.2) later replaces each block's `attn2` by a decoupled cross-attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention import Attention


class GEGLU(nn.Module):
    """GELU-gated linear unit: GEGLU(x) = (x·W + b) ⊙ GELU(x·V + c), with W and V stacked in one Linear `proj`."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)  # (B, L, inner) each
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """FF(x) = W₂·GEGLU(x) + b₂, inner width 4·dim.

    `net` is indexed like diffusers (`net.0.proj`, `net.2`); slot 1 is diffusers' dropout,
    which is a no-op at inference and kept as an Identity so the key names line up.
    """

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm block: x += SelfAttn(LN(x)); x += CrossAttn(LN(x), text); x += FF(LN(x))."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads=heads, head_dim=head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, context_dim=context_dim, heads=heads, head_dim=head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, image_tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: (B, HW, dim); context: text tokens (B, 77, context_dim); image_tokens: (B, N, context_dim) or None."""
        x = x + self.attn1(self.norm1(x))  # pixels attend to pixels
        if image_tokens is None:
            x = x + self.attn2(self.norm2(x), context)  # pixels attend to the text tokens
        else:  # only an IP-Adapter attention (swapped in for attn2) knows what to do with image tokens
            x = x + self.attn2(self.norm2(x), context, image_tokens=image_tokens)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """Attention over a feature map: GroupNorm → 1×1 conv → transformer blocks on H·W tokens → 1×1 conv, plus residual.

    SD 1.5 uses 1×1 convolutions for proj_in/proj_out (`use_linear_projection=False`) and one block per layer.
    """

    def __init__(self, channels: int, heads: int, context_dim: int, groups: int = 32):
        super().__init__()
        if channels % heads:
            raise ValueError(f"{channels} channels cannot be split into {heads} attention heads")
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, kernel_size=1)
        # a list, as in diffusers (`transformer_blocks.0.…`); SD 1.x has one block per Transformer2DModel
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(channels, heads, channels // heads, context_dim)])
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, image_tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: (B, C, H, W); context: (B, L, context_dim) → (B, C, H, W)"""
        height, width = x.shape[-2:]
        h = self.proj_in(self.norm(x))  # (B, C, H, W)
        h = rearrange(h, "b c h w -> b (h w) c")  # one token per pixel: (B, HW, C)
        for block in self.transformer_blocks:
            h = block(h, context, image_tokens)
        h = rearrange(h, "b (h w) c -> b c h w", h=height, w=width)  # (B, C, H, W)
        return x + self.proj_out(h)
