"""SD's autoencoder (`AutoencoderKL`): 512×512×3 pixels ↔ a 64×64×4 latent, where the diffusion happens.

encode: x → Encoder → quant_conv → (mean, logvar) of a diagonal Gaussian q(z|x)   (paper §3.1: LDM)
decode: z → post_quant_conv → Decoder → x
The Encoder halves the resolution at each level but the last (3 times in SD: ×1/8); the Decoder
mirrors it. Each level is a few ResNet blocks; the lowest resolution also has one self-attention.

Latent scale: SD trains its UNet on z·scaling_factor (0.18215 for SD 1.x), so that the latents have
roughly unit variance. The pipeline multiplies by `vae.scaling_factor` after `encode(x).sample()`
and divides by it before `decode` — this module itself works on unscaled latents, like diffusers.

Names follow diffusers (`encoder.down_blocks.N.resnets.M`, `quant_conv`, …); LDM's names
(`first_stage_model.encoder.down.N.block.M`, …) go through the rule table in `keymap.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention import Attention
from .resnet import ResnetBlock2D, Upsample2D

EPS = 1e-6  # every GroupNorm in SD's VAE


@dataclass
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    sample_size: int = 512  # the training resolution; informative only
    force_upcast: bool = True  # diffusers runs this VAE in fp32 under fp16 pipelines; informative only
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4

    def __post_init__(self):
        n = len(self.block_out_channels)
        for field, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            if tuple(getattr(self, field)) != (kind,) * n:
                raise ValueError(f"{field} must be {n} × {kind!r} (one per block_out_channels entry), got {getattr(self, field)}")

    @classmethod
    def sd15(cls) -> "VAEConfig":
        return cls()

    @classmethod
    def tiny(cls) -> "VAEConfig":
        return cls(block_out_channels=(32, 64), norm_num_groups=8, sample_size=64,
                   down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))), from the encoder's 2·latent_channels output."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)  # (B, 2C, h, w) → 2 × (B, C, h, w)
        self.logvar = logvar.clamp(-30.0, 20.0)  # as LDM: keeps exp() finite
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std·ε, ε ~ N(0, I) drawn from `generator` (same draw as diffusers for the same seed): the
        reparameterisation trick, so that gradients reach the encoder's mean and log-variance through z."""
        # BEGIN ASSIGNMENT 11
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)  # ε (B, C, h, w)
        return self.mean + self.std * noise  # z = μ + σ·ε, σ = exp(½·logvar)
        # END ASSIGNMENT 11

    def mode(self) -> torch.Tensor:
        return self.mean


# ─── Building blocks ─────────────────────────────────────────────────────────────────────────────


def resnet(in_channels: int, out_channels: int, groups: int) -> ResnetBlock2D:
    """The UNet's residual block without a timestep: shortcut(x) + conv2(SiLU(norm2(conv1(SiLU(norm1(x))))))."""
    return ResnetBlock2D(in_channels, out_channels, None, groups, EPS)


class Downsample(nn.Module):
    """Stride-2 3×3 conv after padding one pixel on the right and bottom only (LDM's VAE; the UNet pads all sides)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H, W) → (B, C, H/2, W/2)


class VAEAttention(Attention):
    """One-head self-attention over all pixels, with its own GroupNorm and a residual connection."""

    def __init__(self, channels: int, groups: int):
        super().__init__(channels, heads=1, head_dim=channels, qkv_bias=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        tokens = rearrange(self.group_norm(x), "b c h w -> b (h w) c")  # every pixel is a token
        out = super().forward(tokens)  # (B, HW, C)
        return x + rearrange(out, "b (h w) c -> b c h w", h=h, w=w)


class MidBlock(nn.Module):
    """resnet → attention → resnet, at the lowest resolution."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([resnet(channels, channels, groups), resnet(channels, channels, groups)])
        self.attentions = nn.ModuleList([VAEAttention(channels, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class VAEBlock(nn.Module):
    """One level: resnets, then a 2× resampler — diffusers' DownEncoderBlock2D (`downsamplers`) or UpDecoderBlock2D (`upsamplers`)."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, resample: str | None):
        super().__init__()
        self.resnets = nn.ModuleList(resnet(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(layers))
        self.downsamplers = nn.ModuleList([Downsample(out_channels)]) if resample == "down" else None
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if resample == "up" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in [*self.resnets, *(self.downsamplers or self.upsamplers or [])]:
            x = layer(x)
        return x


class Encoder(nn.Module):
    """(B, 3, H, W) → (B, 2·latent, H/2^(levels−1), W/2^(levels−1)): the Gaussian's mean and logvar."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, groups, levels = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList(
            VAEBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, groups, "down" if i < levels - 1 else None) for i in range(levels)
        )
        self.mid_block = MidBlock(ch[-1], groups)
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class Decoder(nn.Module):
    """(B, latent, h, w) → (B, 3, h·2^(levels−1), w·2^(levels−1)); each up block has layers + 1 resnets."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, groups, levels = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], kernel_size=3, padding=1)
        self.mid_block = MidBlock(ch[0], groups)
        self.up_blocks = nn.ModuleList(
            VAEBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, groups, "up" if i < levels - 1 else None) for i in range(levels)
        )
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class AutoencoderKL(nn.Module):
    """SD's VAE. `encode(x)` → DiagonalGaussian; `decode(z)` → x. x in [-1, 1]; z unscaled (see module doc)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.scaling_factor = config.scaling_factor
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, kernel_size=1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x: (B, 3, H, W) in [-1, 1] → q(z|x) over (B, 4, H/8, W/8) latents (SD 1.5)."""
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, 4, h, w), unscaled (divide the UNet's latents by scaling_factor first) → (B, 3, 8h, 8w)."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reconstruction: decode(a sample of encode(x))."""
        return self.decode(self.encode(x).sample(generator))
