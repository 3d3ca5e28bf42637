"""CLIP's two transformers: the text tower SD 1.5 is conditioned on, and the image tower IP-Adapter reads.

Both are the same pre-LayerNorm transformer encoder (`CLIPEncoderLayer` below):
    h = h + SelfAttention(LayerNorm₁(h))
    h = h + MLP(LayerNorm₂(h)),   MLP = fc2(act(fc1(·)))
- text (ViT-L/14's text tower, SD 1.5): token + position embeddings → 12 layers with a *causal*
  mask (token i sees tokens ≤ i) and quick_gelu → `final_layer_norm`. SD uses every position
  of that last hidden state, (B, 77, 768), as the UNet's cross-attention context (paper §3.1).
- vision (OpenCLIP ViT-H/14, IP-Adapter SD 1.5): 14×14 patches → a class token in front →
  position embeddings → `pre_layrnorm` → 32 layers, no mask, gelu → `post_layernorm` on the
  class token → `visual_projection` = the global image embedding (B, 1024) of paper §3.2.1.
  IP-Adapter Plus reads the penultimate hidden state instead, so all hidden states are returned.

Parameter names are transformers' own, so a transformers checkpoint loads by identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention, merge_heads, split_heads

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # OpenAI CLIP's cheap GELU approximation
    "gelu": F.gelu,  # exact: x·Φ(x) (OpenCLIP ViT-H)
}


@dataclass
class CLIPTowerConfig:
    """What both towers share: a pre-LayerNorm transformer encoder (defaults: ViT-L/14's text tower)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768  # the width CLIP's contrastive projection maps a tower's pooled feature to

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported (minipa implements {' and '.join(ACTIVATIONS)})")

    @classmethod
    def tiny(cls):
        """The same kind of tower at toy width: for tests."""
        return cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)


@dataclass
class CLIPTextConfig(CLIPTowerConfig):
    vocab_size: int = 49408
    max_position_embeddings: int = 77
    eos_token_id: int = 2  # SD 1.5's file says 2, the legacy value: pool at the highest id (<|endoftext|>)

    @classmethod
    def sd15(cls) -> "CLIPTextConfig":
        """OpenAI CLIP ViT-L/14's text tower, as in SD 1.5's `text_encoder/` (its projection_dim is used only by
        CLIPTextModelWithProjection, and kept so that configs round-trip)."""
        return cls()


@dataclass
class CLIPVisionConfig(CLIPTowerConfig):
    hidden_size: int = 1280  # the defaults are OpenCLIP ViT-H/14's
    intermediate_size: int = 5120
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    hidden_act: str = "gelu"
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    projection_dim: int = 1024

    def __post_init__(self):
        super().__post_init__()
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1  # the patches + the class token (257 for ViT-H/14)

    @classmethod
    def vit_h14(cls) -> "CLIPVisionConfig":
        """OpenCLIP ViT-H/14 (LAION-2B), the image encoder of ip-adapter_sd15."""
        return cls()


# ─── The shared transformer layer ────────────────────────────────────────────────────────────────


class CLIPAttention(nn.Module):
    """Multi-head self-attention with transformers' names (q_proj, k_proj, v_proj, out_proj)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, L, D) → (B, L, D); mask: bool (L, L), True = may attend."""
        q, k, v = (split_heads(p(x), self.heads) for p in (self.q_proj, self.k_proj, self.v_proj))  # (B, heads, L, d) each
        out = attention(q, k, v, mask=mask)  # Softmax(QKᵀ/√d)V: (B, heads, L, d)
        return self.out_proj(merge_heads(out))  # (B, L, D)


class CLIPMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(dim, hidden), nn.Linear(hidden, dim), ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int, act: str, eps: float):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.self_attn = CLIPAttention(dim, heads)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = CLIPMLP(dim, mlp_dim, act)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = h + self.self_attn(self.layer_norm1(h), mask)  # pre-LayerNorm residual attention
        return h + self.mlp(self.layer_norm2(h))  # pre-LayerNorm residual MLP


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPTowerConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            CLIPEncoderLayer(cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, cfg.hidden_act, cfg.layer_norm_eps)
            for _ in range(cfg.num_hidden_layers)
        )

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Every hidden state: the input, then the output of each layer (num_layers + 1 tensors)."""
        states = [h]
        for layer in self.layers:
            states.append(layer(states[-1], mask))
        return states


# ─── Text tower ──────────────────────────────────────────────────────────────────────────────────


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # computed here: no buffers
        return self.token_embedding(input_ids) + self.position_embedding(positions)  # (B, L, D)


class CLIPTextTransformer(nn.Module):
    """Token ids (B, L) → embeddings → encoder with a causal mask → final LayerNorm → (B, L, D)."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embeddings(input_ids)  # (B, L, D)
        L = input_ids.shape[1]
        causal = torch.ones(L, L, dtype=torch.bool, device=h.device).tril()  # token i attends to tokens 0..i
        return self.final_layer_norm(self.encoder(h, causal)[-1])  # (B, L, D)


class CLIPTextModel(nn.Module):
    """Token ids (B, L ≤ 77) → last hidden state (B, L, D): the UNet's text context."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"input_ids has {input_ids.shape[1]} tokens; the model has {self.config.max_position_embeddings} positions")
        return self.text_model(input_ids)

    def end_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B,) where each sequence's <|endoftext|> is: the first one (legacy configs, eos_token_id 2:
        the highest id, which is <|endoftext|> too)."""
        if self.config.eos_token_id == 2:
            return input_ids.argmax(dim=-1)
        return (input_ids == self.config.eos_token_id).int().argmax(dim=-1)

    def pool(self, input_ids: torch.Tensor, last_hidden_state: torch.Tensor) -> torch.Tensor:
        """CLIP's sentence feature (B, D): the hidden state at the <|endoftext|> token."""
        return last_hidden_state[torch.arange(len(input_ids), device=input_ids.device), self.end_positions(input_ids)]


# ─── Vision tower ────────────────────────────────────────────────────────────────────────────────


class CLIPVisionOutput(NamedTuple):
    image_embeds: torch.Tensor  # (B, projection_dim): projected class token, IP-Adapter's image embedding
    last_hidden_state: torch.Tensor  # (B, 257, D), before post_layernorm
    hidden_states: tuple[torch.Tensor, ...]  # num_layers + 1 tensors (B, 257, D); [-2] feeds IP-Adapter Plus


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.randn(cfg.hidden_size))  # as transformers initialises it
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.num_positions, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # (B, 3, H, W) → (B, HW/p², D)
        cls = self.class_embedding.expand(len(patches), 1, -1)  # (B, 1, D)
        h = torch.cat([cls, patches], dim=1)  # (B, 1 + HW/p², D)
        return h + self.position_embedding.weight  # one learned position per token


class CLIPVisionTransformer(nn.Module):
    """Pixels → patch and class embeddings → LayerNorm → encoder (no mask): every hidden state, and the class token
    after `post_layernorm`."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic: transformers' spelling
        self.encoder = CLIPEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        states = self.encoder(self.pre_layrnorm(self.embeddings(pixel_values)))  # num_layers + 1 × (B, 257, D)
        return self.post_layernorm(states[-1][:, 0]), states  # the class token (B, D), and every hidden state


class CLIPVisionModelWithProjection(nn.Module):
    """Pixels (B, 3, 224, 224), normalised by `preprocess.preprocess_image` → image embedding + hidden states."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.config = config
        self.vision_model = CLIPVisionTransformer(config)
        self.visual_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> CLIPVisionOutput:
        size = self.config.image_size
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != (self.config.num_channels, size, size):
            raise ValueError(f"pixel_values should be (B, {self.config.num_channels}, {size}, {size}), got {tuple(pixel_values.shape)}")
        pooled, states = self.vision_model(pixel_values.to(self.visual_projection.weight.dtype))
        return CLIPVisionOutput(self.visual_projection(pooled), states[-1], tuple(states))
