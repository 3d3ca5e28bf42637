"""The convolutional pieces: ResnetBlock2D (the UNet's injects the timestep; the VAE's has none), Downsample2D, Upsample2D.

Names match diffusers, so a diffusers checkpoint loads by identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResnetBlock2D(nn.Module):
    """GroupNorm → SiLU → 3×3 conv, add the projected time embedding, GroupNorm → SiLU → 3×3 conv, add the input.

    out = shortcut(x) + conv2(SiLU(norm2(conv1(SiLU(norm1(x))) + W·SiLU(temb))))
    When the channel count changes, `conv_shortcut` (a 1×1 conv) brings x to the new width.
    With `temb_channels=None` (the VAE's blocks) there is no time embedding and that term is left out.
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None, groups: int = 32, eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.time_emb_proj = None if temb_channels is None else nn.Linear(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C_in, H, W), temb: (B, T) or None → (B, C_out, H, W)"""
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]  # the timestep, broadcast over H, W
        h = self.conv2(F.silu(self.norm2(h)))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h


class Downsample2D(nn.Module):
    """Halve H and W with a stride-2 3×3 conv: (B, C, H, W) → (B, C, ⌈H/2⌉, ⌈W/2⌉)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour upsampling to `size` (by default 2× H and W), then a 3×3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """x: (B, C, H, W) → (B, C, 2H, 2W), or (B, C, *size) to match an odd-sized skip connection."""
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)
