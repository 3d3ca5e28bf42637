"""DDIM (Song et al. 2021): the fast sampler SD 1.5 uses by default (paper §3.1, "fast samplers").

From x_t, the model's ε gives an estimate of x0; DDIM then jumps straight to an earlier timestep
t_prev on the same noise "direction", adding fresh noise only in proportion to η (η=0:
deterministic; η=1: as noisy as DDPM). SD 1.5's conventions, all from `ScheduleConfig.sd15()`:
"leading" timestep spacing, steps_offset 1, set_alpha_to_one False, no clipping, ε-prediction.
"""

from __future__ import annotations

import torch

from minipa.ddpm import NoiseSchedule, StepOutput, _noise_like


class DDIMScheduler(NoiseSchedule):
    """`set_timesteps(n)`, then `step(eps, t, x_t)` for each t in `timesteps`."""

    def step(
        self,
        model_output: torch.Tensor,
        t,
        x_t: torch.Tensor,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> StepOutput:
        t = self._check_step(t)
        if not eta >= 0:
            raise ValueError(f"eta must be >= 0 (0: deterministic DDIM, 1: DDPM-like), got {eta!r}")
        # BEGIN ASSIGNMENT 7
        prev_t = self._prev_timestep(t)
        abar_t = self.alphas_cumprod[t]
        # after the last step there is no ᾱ_prev: SD 1.5 uses ᾱ_0 (set_alpha_to_one=False), not 1
        final = torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]
        abar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else final

        x0, eps = self._x0_and_eps(model_output, x_t, abar_t)
        # σ_t = η·√((1−ᾱ_prev)/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_prev)   (DDIM eq. 16)
        variance = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
        sigma = eta * variance**0.5
        # x_prev = √ᾱ_prev·x0 + √(1−ᾱ_prev−σ²)·ε + σ·z   (DDIM eq. 12)
        x_prev = abar_prev**0.5 * x0 + (1 - abar_prev - sigma**2) ** 0.5 * eps
        if eta > 0:
            x_prev = x_prev + sigma * _noise_like(model_output, generator)
        return StepOutput(x_prev, x0)
        # END ASSIGNMENT 7
