"""The SD 1.5 UNet: ε_θ(x_t, c, t), the noise predictor of paper eq. 1, conditioned on text c by cross-attention.

Reading order: `UNetConfig` → the three block kinds (down, mid, up) → `UNet2DConditionModel`.

    x_t (B,4,h,w) → conv_in → down 0 → down 1 → down 2 → down 3 → mid → up 0 → up 1 → up 2 → up 3 → conv_out → ε
                                │        │        │        │              ▲      ▲      ▲      ▲
                                └────────┴────────┴────────┴─ skips (LIFO) ┴──────┴──────┴──────┘
Every resnet sees the timestep embedding; every attention level sees the text tokens (and, with
IP-Adapter, image tokens). Module names mirror diffusers, so a diffusers checkpoint loads by identity.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .embeddings import TimestepEmbedding, timestep_embedding
from .resnet import Downsample2D, ResnetBlock2D, Upsample2D
from .transformer import Transformer2DModel

# ─── Config ─────────────────────────────────────────────────────────────────────────────────────

DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")

@dataclass(frozen=True)
class UNetConfig:
    """Shape of an SD 1.x UNet; field names are those of diffusers' `unet/config.json`."""

    in_channels: int = 4
    out_channels: int = 4
    sample_size: int | None = 64  # latent side the model was trained at (512 px / 8); informative only
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    layers_per_block: int = 2
    attention_head_dim: int | tuple[int, ...] = 8  # legacy diffusers naming: the number of heads per level
    cross_attention_dim: int = 768  # width of the text tokens (CLIP ViT-L/14: 768)
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0

    def __post_init__(self):
        levels = len(self.block_out_channels)
        for field, allowed in (("down_block_types", DOWN_TYPES), ("up_block_types", UP_TYPES)):
            types = getattr(self, field)
            if len(types) != levels:
                raise ValueError(f"{field} has {len(types)} entries but block_out_channels has {levels}")
            if any(t not in allowed for t in types):
                raise ValueError(f"{field}={types} is not supported (each must be one of {allowed})")
        if not isinstance(self.attention_head_dim, int) and len(self.attention_head_dim) != levels:
            raise ValueError(f"attention_head_dim={self.attention_head_dim} needs one entry per level ({levels})")
        for ch, heads in zip(self.block_out_channels, self.heads):
            if ch % self.norm_num_groups or ch % heads:
                raise ValueError(
                    f"block_out_channels entry {ch} must be divisible by norm_num_groups={self.norm_num_groups} and by {heads} heads"
                )

    @property
    def heads(self) -> tuple[int, ...]:
        """Attention heads at each level (down order)."""
        if isinstance(self.attention_head_dim, int):
            return (self.attention_head_dim,) * len(self.block_out_channels)
        return tuple(self.attention_head_dim)

    @classmethod
    def sd15(cls) -> UNetConfig:
        return cls()

    @classmethod
    def tiny(cls, **changes) -> UNetConfig:
        """SD 1.5's layout at toy width: the model of the tiny world and of the parity tests."""
        base = cls(
            block_out_channels=(32, 64, 64, 64), attention_head_dim=4, cross_attention_dim=32, norm_num_groups=8, sample_size=16
        )
        return dataclasses.replace(base, **changes)


# ─── Blocks ─────────────────────────────────────────────────────────────────────────────────────


class DownBlock(nn.Module):
    """One encoder level: `layers` × (ResnetBlock2D [→ Transformer2DModel]), then a stride-2 Downsample2D.

    With attention this is diffusers' CrossAttnDownBlock2D, without it DownBlock2D. Every intermediate
    result is kept as a skip connection for the matching up level.
    """

    def __init__(self, in_ch, out_ch, temb_ch, layers, heads, context_dim, groups, eps, attention: bool, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb_ch, groups, eps) for i in range(layers)]
        )
        self.attentions = None
        if attention:
            self.attentions = nn.ModuleList([Transformer2DModel(out_ch, heads, context_dim, groups) for _ in range(layers)])
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch)]) if downsample else None

    def forward(self, h, temb, context, image_tokens, skips: list):
        """h: (B, C_in, H, W) → (B, C_out, H/2, W/2) (H, W if it does not downsample); appends each result to `skips`."""
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, temb)
            if self.attentions is not None:
                h = self.attentions[i](h, context, image_tokens)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h


class MidBlock(nn.Module):
    """The bottleneck (diffusers' UNetMidBlock2DCrossAttn): resnet → attention → resnet at the lowest resolution."""

    def __init__(self, ch, temb_ch, heads, context_dim, groups, eps):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(ch, ch, temb_ch, groups, eps) for _ in range(2)])
        self.attentions = nn.ModuleList([Transformer2DModel(ch, heads, context_dim, groups)])

    def forward(self, h, temb, context, image_tokens):
        h = self.resnets[0](h, temb)
        h = self.attentions[0](h, context, image_tokens)
        return self.resnets[1](h, temb)


class UpBlock(nn.Module):
    """One decoder level: (layers+1) × (concat a skip → ResnetBlock2D [→ Transformer2DModel]), then Upsample2D.

    With attention this is diffusers' CrossAttnUpBlock2D, without it UpBlock2D. The skips are consumed
    last-in first-out, so each level meets the encoder features of its own resolution.
    """

    def __init__(self, prev_ch, out_ch, skip_ch, temb_ch, layers, heads, context_dim, groups, eps, attention, upsample):
        super().__init__()
        # resnet i sees [h, skip]: h is prev_ch wide for the first resnet and out_ch after it;
        # the skips are out_ch wide, except the last one, which comes from the level below (skip_ch)
        widths_in = [(prev_ch if i == 0 else out_ch) + (skip_ch if i == layers else out_ch) for i in range(layers + 1)]
        self.resnets = nn.ModuleList([ResnetBlock2D(w, out_ch, temb_ch, groups, eps) for w in widths_in])
        self.attentions = None
        if attention:
            self.attentions = nn.ModuleList([Transformer2DModel(out_ch, heads, context_dim, groups) for _ in widths_in])
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)]) if upsample else None

    def forward(self, h, temb, context, image_tokens, skips: list):
        """h: (B, C_prev, H, W) → (B, C_out, 2H, 2W) (H, W if it does not upsample); pops one skip per resnet."""
        for i, resnet in enumerate(self.resnets):
            h = torch.cat([h, skips.pop()], dim=1)  # (B, C_h + C_skip, H, W)
            h = resnet(h, temb)
            if self.attentions is not None:
                h = self.attentions[i](h, context, image_tokens)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h, size=skips[-1].shape[-2:])  # the size of the next skip (odd sizes included)
        return h


# ─── The model ──────────────────────────────────────────────────────────────────────────────────


class UNet2DConditionModel(nn.Module):
    """ε_θ(x_t, c, t): predicts the noise in latent x_t at timestep t, given text tokens c (paper eq. 1)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        ch, heads, n = config.block_out_channels, config.heads, len(config.block_out_channels)
        temb_ch = 4 * ch[0]
        common = dict(
            layers=config.layers_per_block, context_dim=config.cross_attention_dim, groups=config.norm_num_groups, eps=config.norm_eps
        )

        self.conv_in = nn.Conv2d(config.in_channels, ch[0], kernel_size=3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb_ch)
        self.down_blocks = nn.ModuleList(
            [
                DownBlock(
                    in_ch=ch[max(i - 1, 0)], out_ch=ch[i], temb_ch=temb_ch, heads=heads[i],
                    attention=kind == "CrossAttnDownBlock2D", downsample=i < n - 1, **common,
                )
                for i, kind in enumerate(config.down_block_types)
            ]
        )
        self.mid_block = MidBlock(
            ch[-1], temb_ch, heads[-1], config.cross_attention_dim, config.norm_num_groups, config.norm_eps
        )
        up_ch, up_heads = ch[::-1], heads[::-1]  # the decoder walks the levels back up
        self.up_blocks = nn.ModuleList(
            [
                UpBlock(
                    prev_ch=up_ch[max(i - 1, 0)], out_ch=up_ch[i], skip_ch=up_ch[min(i + 1, n - 1)], temb_ch=temb_ch,
                    heads=up_heads[i], attention=kind == "CrossAttnUpBlock2D", upsample=i < n - 1, **common,
                )
                for i, kind in enumerate(config.up_block_types)
            ]
        )
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, ch[0], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], config.out_channels, kernel_size=3, padding=1)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int | float,
        encoder_hidden_states: torch.Tensor,
        image_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """sample: x_t (B, C_in, H, W); timestep: a number, a 0-d tensor or (B,); encoder_hidden_states:
        text tokens (B, L, cross_attention_dim); image_tokens: IP-Adapter tokens (B, N, cross_attention_dim)
        or None. Returns ε (B, C_out, H, W)."""
        t = self._timesteps(timestep, sample)
        cfg = self.config
        t_code = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)  # (B, C₀)
        temb = self.time_embedding(t_code.to(sample.dtype))  # (B, 4·C₀)
        context = encoder_hidden_states

        h = self.conv_in(sample)  # (B, C₀, H, W)
        skips = [h]
        for block in self.down_blocks:
            h = block(h, temb, context, image_tokens, skips)  # each level halves H, W (except the last)
        h = self.mid_block(h, temb, context, image_tokens)  # (B, C₃, H/8, W/8)
        for block in self.up_blocks:
            h = block(h, temb, context, image_tokens, skips)  # each level doubles H, W (except the last)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, C_out, H, W)

    @staticmethod
    def _timesteps(timestep, sample: torch.Tensor) -> torch.Tensor:
        """A number, 0-d tensor, (1,) or (B,) tensor → a (B,) tensor on the sample's device."""
        batch = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device)
        if t.ndim == 0 or t.shape == (1,):
            return t.reshape(1).expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"timestep must be a number, a 0-d tensor or shaped (B,) = ({batch},); got {tuple(t.shape)}")
        return t
