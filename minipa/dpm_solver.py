"""DPM-Solver++(2M) (Lu et al. 2022): the multistep sampler most SD front ends default to.

Sampling solves an ODE from noise to image. Written in ℓ = log(α_t/σ_t) (half the log signal-to-noise
ratio, Lu et al.'s λ; α_t = √ᾱ_t, σ_t = √(1−ᾱ_t)) and in terms of the model's estimate of x0, the ODE's linear part
integrates exactly; only x0's change along a step must be approximated. One step from t to t′, h = ℓ′ − ℓ:

    first order:   x′ = (σ′/σ)·x − α′·(e^(−h) − 1)·x0                 (DDIM's step, in this form)
    second order:  x′ = (σ′/σ)·x − α′·(e^(−h) − 1)·(x0 + ½·D),  D = (x0 − x0_prev)/r,  r = (ℓ − ℓ_prev)/h

"2M" is second order using the previous step's x0 (multistep): still one model call per step, so the
same budget as DDIM buys a more accurate path (the paper reports good guided samples in 15–20 steps).
The first step has no previous x0 and the last (to σ′ = 0, the clean image) takes the first-order form.

The sampler keeps its own schedule in σ/α (diffusers' `sigmas`, ending at 0) and timesteps chosen as
diffusers' `DPMSolverMultistepScheduler` chooses them (n + 1 points, the last dropped); the settings
are diffusers' defaults there: algorithm "dpmsolver++", solver_order 2, solver_type "midpoint",
final_sigmas_type "zero", no Karras sigmas.
"""

from __future__ import annotations

import numpy as np
import torch

from minipa.ddpm import NoiseSchedule, StepOutput, trailing_timesteps, x0_and_eps


class DPMSolverMultistepScheduler(NoiseSchedule):
    """`set_timesteps(n)`, then `step(model_output, t, x_t)` for each t in `timesteps`, in order (it is multistep)."""

    def set_timesteps(self, num_steps: int, device: str | torch.device | None = None) -> torch.Tensor:
        self._check_num_steps(num_steps)
        T, n = self.config.num_train_timesteps, num_steps
        spacing = self.config.timestep_spacing
        if spacing == "linspace":  # n + 1 points over [0, T − 1], the last (t = 0) dropped
            timesteps = np.linspace(0, T - 1, n + 1).round()[::-1][:-1]
        elif spacing == "leading":
            timesteps = (np.arange(n + 1) * (T // (n + 1))).round()[::-1][:-1] + self.config.steps_offset
        else:  # "trailing": as DDIM's
            timesteps = trailing_timesteps(T, n)
        self.timesteps = torch.from_numpy(timesteps.astype(np.int64)).to(device)
        sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()  # σ_t/α_t at every training step
        sigmas = np.interp(timesteps, np.arange(T), sigmas)  # at the timesteps (a t past T − 1 reads T − 1's, as diffusers)
        self.sigmas = torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))  # … down to 0: the clean image
        self.num_inference_steps = num_steps
        self._index = None  # which step comes next
        self._previous = None  # (x0, ℓ) of the step before
        return self.timesteps

    @staticmethod
    def _alpha_sigma(ratio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """σ/α → (α, σ) with α² + σ² = 1."""
        alpha = 1 / (ratio**2 + 1) ** 0.5
        return alpha, ratio * alpha

    def step(self, model_output: torch.Tensor, t, x_t: torch.Tensor, generator: torch.Generator | None = None) -> StepOutput:
        """One step; `generator` is accepted for the pipeline's sake and unused (the solver is deterministic)."""
        t = self._check_step(t)
        if self._index is None:  # the first call may start anywhere in the schedule (img2img-style)
            matches = (self.timesteps.cpu() == t).nonzero()
            if len(matches) == 0:
                raise ValueError(f"timestep {t} is not one of this schedule's timesteps {self.timesteps.tolist()}")
            self._index = int(matches[0])
        i = self._index
        if i >= len(self.timesteps) or int(self.timesteps[i]) != t:
            expected = "none: the schedule is finished" if i >= len(self.timesteps) else int(self.timesteps[i])
            raise ValueError(f"DPM-Solver++ is multistep: call step for each t of `timesteps` in order; got t={t}, expected {expected} "
                             "(set_timesteps starts over)")
        alpha, sigma = self._alpha_sigma(self.sigmas[i])
        alpha_next, sigma_next = self._alpha_sigma(self.sigmas[i + 1])
        x = x_t.float()
        x0, _ = x0_and_eps(model_output, x, alpha, sigma, self.config.prediction_type)
        log_snr, log_snr_next = torch.log(alpha) - torch.log(sigma), torch.log(alpha_next) - torch.log(sigma_next)  # ℓ, ℓ′
        h = log_snr_next - log_snr
        phi = alpha_next * (torch.exp(-h) - 1.0)
        last = i == len(self.timesteps) - 1
        if self._previous is None or last:
            x_next = (sigma_next / sigma) * x - phi * x0  # first order
        else:
            x0_prev, log_snr_prev = self._previous
            r = (log_snr - log_snr_prev) / h
            D = (1.0 / r) * (x0 - x0_prev)  # x0's change over the step, from the last two estimates
            x_next = (sigma_next / sigma) * x - phi * x0 - 0.5 * phi * D
        self._previous = (x0, log_snr)
        self._index = i + 1
        return StepOutput(x_next.to(model_output.dtype), x0.to(model_output.dtype))
