"""Timestep embedding: how the UNet is told which noise level t it is looking at (paper §3.1, ε_θ(x_t, c, t)).

Two steps, as in the Transformer paper and DDPM:
1. a fixed sinusoidal code of t (no parameters), one frequency per pair of channels;
2. a small MLP (Linear → SiLU → Linear) that turns the code into the vector every ResnetBlock2D
   adds to its features.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(
    timesteps: torch.Tensor,
    dim: int,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> torch.Tensor:
    """Sinusoidal code of the timesteps: (B,) → (B, dim), float32.

    ω_i = max_period^(−i / (dim/2 − freq_shift)),  i = 0 … dim/2 − 1
    emb(t) = [cos(t·ω), sin(t·ω)]   (SD 1.5: flip_sin_to_cos=True, freq_shift=0; otherwise [sin, cos])
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be 1-D (B,), got shape {tuple(timesteps.shape)}")
    # BEGIN ASSIGNMENT 3
    half = dim // 2
    i = torch.arange(half, dtype=torch.float32, device=timesteps.device)
    omega = torch.exp(-math.log(max_period) * i / (half - freq_shift))  # ω_i = max_period^(−i/(half − shift)): (half,)
    angles = timesteps.float()[:, None] * omega[None, :]  # t·ω: (B, half)
    sin, cos = torch.sin(angles), torch.cos(angles)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)  # (B, 2·half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))  # odd width: one zero channel at the end
    return emb
    # END ASSIGNMENT 3


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal code: (B, in_dim) → (B, time_dim). Names match diffusers (`linear_1`, `linear_2`)."""

    def __init__(self, in_dim: int, time_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, time_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(time_dim, time_dim)

    def forward(self, t_code: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(t_code)))  # W₂·SiLU(W₁·code + b₁) + b₂
