"""The image projections beyond the paper's Linear + LayerNorm (§3.2.1), for the adapter variants people use.

- `MLPProjection`: a hidden layer before the tokens (the image_proj layout of IP-Adapter FaceID);
- `Resampler`: IP-Adapter Plus's Perceiver, N learned queries reading every patch of the image encoder's
  penultimate hidden states, so the tokens can carry detail the global embedding drops.
Both make (…, N, D) image tokens that the decoupled cross-attention of `ip_adapter.py` reads unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from minipa.attention import attention, merge_heads, split_heads
from minipa.ip_adapter import ImageProjection


class MLPProjection(ImageProjection):
    """image embedding (B, E) → N image tokens (B, N, D) through a two-layer MLP, then LayerNorm.

    The paper's `ImageProjection` with a hidden layer: Linear(E, m·E) → GELU → Linear(m·E, N·D) → LayerNorm(D).
    This is the image_proj layout of the official IP-Adapter FaceID (keys `proj.0`, `proj.2`, `norm`;
    diffusers calls it `IPAdapterFaceIDImageProjection`), which reads a face-recognition embedding;
    here it reads the same CLIP global embedding as the base adapter. A linear map can only read what
    is linearly laid out in the embedding; the hidden layer lets the tokens depend on it non-linearly.
    """

    def __init__(self, image_embed_dim: int, cross_attention_dim: int, num_tokens: int = 4, mult: int = 2):
        super().__init__(image_embed_dim, cross_attention_dim, num_tokens)  # `forward` stays ImageProjection's
        hidden = mult * image_embed_dim
        self.proj = nn.Sequential(nn.Linear(image_embed_dim, hidden), nn.GELU(), nn.Linear(hidden, num_tokens * cross_attention_dim))


class PerceiverAttention(nn.Module):
    """The Resampler's attention: learned queries (latents) read the image features and themselves.

    Keys and values come from [features; latents] (the latents see each other too); one `to_kv`
    holds Wk and Wv stacked, as in the official files. No biases.
    """

    def __init__(self, dim: int, heads: int, head_dim: int = 64):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)  # for the image features
        self.norm2 = nn.LayerNorm(dim)  # for the latents
        self.to_q = nn.Linear(dim, heads * head_dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * head_dim, bias=False)
        self.to_out = nn.Linear(heads * head_dim, dim, bias=False)

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """features: (B, L, dim), latents: (B, Q, dim) → (B, Q, dim), the update to add to the latents."""
        features, latents = self.norm1(features), self.norm2(latents)
        q = split_heads(self.to_q(latents), self.heads)
        k, v = self.to_kv(torch.cat([features, latents], dim=1)).chunk(2, dim=-1)  # (B, L + Q, inner) each
        out = attention(q, split_heads(k, self.heads), split_heads(v, self.heads))  # (B, heads, Q, d)
        return self.to_out(merge_heads(out))


class Resampler(nn.Module):
    """IP-Adapter Plus's image projection: patch features (B, L, E) → N image tokens (B, N, D).

    A Perceiver resampler: N learned queries (`latents`) go through `depth` blocks of attention over
    the CLIP image encoder's penultimate hidden states (every patch, not just the class token) and a
    feed-forward layer, both residual; then a Linear to the text-token width D and a LayerNorm.
    The global embedding keeps *what* is in the image; the patches also keep *where* and *how*
    (shape outlines, textures), which is the fine detail the Plus variant exists for.
    """

    reads_patches = True  # IP-Adapter Plus: it reads every patch's features, not the global embedding

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


def image_projection(image_embed_dim: int, cross_attention_dim: int, num_tokens: int = 4, *, mlp: int | None = None,
                     resampler: dict | None = None) -> nn.Module:
    """An adapter variant's image_proj: the paper's `ImageProjection`, an `MLPProjection` with a hidden layer
    mlp·E wide, or (a dict of options, may be empty) the `Resampler` of IP-Adapter Plus."""
    if resampler is not None and mlp is not None:
        raise ValueError("image_projection: pass resampler= (Plus) or mlp= (an MLP image projection), not both")
    if resampler is not None:
        return Resampler(image_embed_dim, cross_attention_dim, num_tokens=num_tokens, **resampler)
    if mlp is not None:
        return MLPProjection(image_embed_dim, cross_attention_dim, num_tokens, mult=mlp)
    return ImageProjection(image_embed_dim, cross_attention_dim, num_tokens)
