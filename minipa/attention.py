"""Multi-head attention: the `softmax(QKᵀ/√d)V` at the heart of every transformer in minipa.

Two ways to compute the same thing:
- the *explicit* path writes the equation out (paper §3.2.2: Attention(Q,K,V) = Softmax(QKᵀ/√d)V),
  so a reader can step through it and see the attention weights;
- the *sdpa* path calls `torch.nn.functional.scaled_dot_product_attention`, which fuses the same
  math into one kernel: faster and lighter on memory. It is the default.

`set_attention_backend("explicit")` (or the `attention_backend("explicit")` context manager)
switches every attention in minipa; `attention(..., explicit=True)` switches one call.
A test proves the two paths agree.

`Attention` is the module used by the UNet (self- and cross-attention) and the VAE (one head over the
channels). Its steps are plain functions (`split_heads`, `attention`, `merge_heads`) because CLIP, the
Resampler and the IP-Adapter's decoupled cross-attention (a second key/value pair) reuse them.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

BACKENDS = ("sdpa", "explicit")
_backend = "sdpa"


def set_attention_backend(name: str) -> None:
    """Choose how every `attention()` call computes: "sdpa" (fused kernel, default) or "explicit"."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {name!r}")
    _backend = name


def get_attention_backend() -> str:
    return _backend


@contextmanager
def attention_backend(name: str):
    """`with attention_backend("explicit"): …` runs the block with that backend, then restores the old one."""
    previous = _backend
    set_attention_backend(name)
    try:
        yield
    finally:
        set_attention_backend(previous)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    explicit: bool | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention over heads.

    q: (B, heads, Lq, d); k, v: (B, heads, Lk, d) → (B, heads, Lq, d).
    `mask`: None, or a bool tensor broadcastable to (B, heads, Lq, Lk), True = may attend
    (CLIP's causal mask). `explicit` overrides the module-level backend for this call.
    """
    if mask is not None and mask.dtype != torch.bool:
        raise ValueError(f"attention mask must be a bool tensor (True = may attend), got dtype {mask.dtype}")
    if explicit is None:
        explicit = _backend == "explicit"
    if not explicit:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    # BEGIN ASSIGNMENT 10
    d = q.shape[-1]
    scores = q @ k.transpose(-2, -1) / math.sqrt(d)  # QKᵀ/√d: (B, heads, Lq, Lk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1)  # each query's weights over the keys sum to 1
    return weights @ v  # Softmax(QKᵀ/√d)V: (B, heads, Lq, d)
    # END ASSIGNMENT 10


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, heads·d) → (B, heads, L, d)"""
    return rearrange(t, "b l (heads d) -> b heads l d", heads=heads)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    """(B, heads, L, d) → (B, L, heads·d)"""
    return rearrange(t, "b heads l d -> b l (heads d)")


class Attention(nn.Module):
    """Multi-head attention with learned projections; self-attention when `context` is None.

    query_dim: channels of x; context_dim: channels of the context (default query_dim);
    head_dim: size of one head (default query_dim // heads). Inner width = heads · head_dim.
    Parameter names match diffusers (`to_q`, `to_k`, `to_v`, `to_out.0`).
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        head_dim: int | None = None,
        qkv_bias: bool = False,
    ):
        super().__init__()
        context_dim = context_dim or query_dim
        if head_dim is None:
            if query_dim % heads:
                raise ValueError(f"query_dim={query_dim} is not divisible by heads={heads}; pass head_dim explicitly")
            head_dim = query_dim // heads
        self.heads = heads
        self.head_dim = head_dim
        inner = heads * head_dim
        self.to_q = nn.Linear(query_dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim, inner, bias=qkv_bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, Lq, query_dim); context: (B, Lk, context_dim) or None → (B, Lq, query_dim)."""
        context = x if context is None else context
        q = split_heads(self.to_q(x), self.heads)  # Q = x·Wq        (B, heads, Lq, d)
        k = split_heads(self.to_k(context), self.heads)  # K = c·Wk  (B, heads, Lk, d)
        v = split_heads(self.to_v(context), self.heads)  # V = c·Wv  (B, heads, Lk, d)
        out = attention(q, k, v)  # (B, heads, Lq, d)
        return self.to_out[0](merge_heads(out))  # (B, Lq, query_dim)
