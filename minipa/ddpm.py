"""The forward (noising) process of paper eq. 1, its training loss, and the ancestral DDPM sampler.

Notation. The paper (IP-Adapter §3.1) writes x_t = √α_t·x0 + √(1−α_t)·ε; its α_t is the
*cumulative* product that DDPM papers and diffusers call ᾱ_t (`alphas_cumprod`):
    β_t          the noise added at step t                (`betas`)
    α_t = 1 − β_t                                        (`alphas`)
    ᾱ_t = α_0·α_1·…·α_t                                 (`alphas_cumprod`)
Everything here is plain torch: no model is imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

BETA_SCHEDULES = ("linear", "scaled_linear")
PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@dataclass(frozen=True)
class ScheduleConfig:
    """The noise schedule and sampling conventions. Defaults are Stable Diffusion 1.5's."""

    num_train_timesteps: int = 1000  # T: training draws t uniformly from [0, T)
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"  # β_t = (linspace(√β_start, √β_end, T))²
    prediction_type: str = "epsilon"  # the UNet predicts ε ("v_prediction": v = √ᾱ·ε − √(1−ᾱ)·x0)
    timestep_spacing: str = "leading"  # how inference steps are picked out of [0, T)
    steps_offset: int = 1  # SD 1.5 shifts the "leading" timesteps by one: 981, 961, …, 1
    set_alpha_to_one: bool = False  # DDIM's ᾱ after the last step: ᾱ_0 (False) or 1 (True)
    clip_sample: bool = False  # clamp the predicted x0 to ±clip_sample_range (SD: off)
    clip_sample_range: float = 1.0

    def __post_init__(self):
        for field, value, allowed in (
            ("beta_schedule", self.beta_schedule, BETA_SCHEDULES),
            ("prediction_type", self.prediction_type, PREDICTION_TYPES),
            ("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS),
        ):
            if value not in allowed:
                raise ValueError(f"{field}={value!r} is not supported; expected one of {', '.join(map(repr, allowed))}")
        if not (isinstance(self.num_train_timesteps, int) and self.num_train_timesteps >= 1):
            raise ValueError(f"num_train_timesteps must be a positive integer, got {self.num_train_timesteps!r}")
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise ValueError(f"expected 0 < beta_start <= beta_end < 1, got {self.beta_start} and {self.beta_end}")

    @classmethod
    def sd15(cls) -> "ScheduleConfig":
        return cls()


def make_betas(config: ScheduleConfig) -> torch.Tensor:
    """β_1…β_T as float32, (T,)."""
    T = config.num_train_timesteps
    if config.beta_schedule == "linear":
        return torch.linspace(config.beta_start, config.beta_end, T, dtype=torch.float32)
    # "scaled_linear": linear in √β, the schedule latent diffusion was trained with
    return torch.linspace(config.beta_start**0.5, config.beta_end**0.5, T, dtype=torch.float32) ** 2


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Sample x_t ~ q(x_t | x0) in one jump; `t` is (B,) integer timesteps, x0/noise are (B, …)."""
    # BEGIN ASSIGNMENT 1
    abar = alphas_cumprod.to(device=x0.device, dtype=x0.dtype)[t.to(x0.device)]
    abar = abar.reshape(-1, *([1] * (x0.ndim - 1)))  # (B, 1, 1, 1) broadcasts over C, H, W
    # x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε   (paper eq. 1; the paper's α_t is this ᾱ_t)
    return abar**0.5 * x0 + (1 - abar) ** 0.5 * noise
    # END ASSIGNMENT 1


def velocity(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The v-prediction target v = √ᾱ_t·ε − √(1−ᾱ_t)·x0 (for models trained with prediction_type "v_prediction")."""
    abar = alphas_cumprod.to(device=x0.device, dtype=x0.dtype)[t.to(x0.device)]
    abar = abar.reshape(-1, *([1] * (x0.ndim - 1)))
    return abar**0.5 * noise - (1 - abar) ** 0.5 * x0


def diffusion_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L = E_{x0,c,t,ε} ‖ε − ε_θ(x_t, c, t)‖²   (paper eq. 1): the mean over batch and pixels.

    `target` is the ε that `add_noise` used (or v, for v-prediction models).
    """
    # BEGIN ASSIGNMENT 2
    return ((target.float() - prediction.float()) ** 2).mean()
    # END ASSIGNMENT 2


class StepOutput(NamedTuple):
    prev_sample: torch.Tensor  # x_{t−Δ}, the next, less noisy sample
    pred_original_sample: torch.Tensor  # the model's current estimate of x0


def trailing_timesteps(T: int, n: int) -> np.ndarray:
    """n timesteps counted back from T, noisiest first: n=50 gives 999, 979, …, 19 (always includes the last
    training step). Computed with numpy's float arange, whose rounding at exact halves we must reproduce."""
    return np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1


class NoiseSchedule:
    """What every sampler of this family shares: β, ᾱ, the inference timesteps, and x0/ε from the model."""

    def __init__(self, config: ScheduleConfig | None = None):
        self.config = config or ScheduleConfig()
        self.betas = make_betas(self.config)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # ᾱ_t
        self.timesteps: torch.Tensor | None = None
        self.num_inference_steps: int | None = None

    def set_timesteps(self, num_steps: int, device: str | torch.device | None = None) -> torch.Tensor:
        """Pick `num_steps` of the T training timesteps, from noisiest to cleanest."""
        self._check_num_steps(num_steps)
        T = self.config.num_train_timesteps
        spacing = self.config.timestep_spacing
        if spacing == "leading":
            # every (T // n)-th step counted from 0, then shifted: SD 1.5 with n=50 gives 981, 961, …, 21, 1
            timesteps = torch.arange(num_steps, dtype=torch.int64) * (T // num_steps) + self.config.steps_offset
        elif spacing == "trailing":
            timesteps = torch.from_numpy(trailing_timesteps(T, num_steps)[::-1].copy())
        else:  # "linspace": evenly spread over [0, T−1], rounded half to even (numpy, as above)
            timesteps = torch.from_numpy(np.linspace(0, T - 1, num_steps).round().astype(np.int64))
        self.timesteps = timesteps.flip(0).to(device)
        self.num_inference_steps = num_steps
        return self.timesteps

    def _check_num_steps(self, num_steps) -> None:
        T = self.config.num_train_timesteps
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= T:
            raise ValueError(f"num_steps must be an integer from 1 to num_train_timesteps={T}, got {num_steps!r}")

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return add_noise(x0, noise, t, self.alphas_cumprod)

    def _check_step(self, t) -> int:
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_steps) before step(): the step size depends on it")
        t = int(t)
        T = self.config.num_train_timesteps
        if not 0 <= t < T:
            raise ValueError(
                f"timestep {t} is outside the training schedule [0, {T - 1}]"
                + (" (leading spacing with steps_offset reaches T when num_steps == T; use fewer steps)" if t == T else "")
            )
        return t

    def _prev_timestep(self, t: int) -> int:
        # one inference step back: T // n for every spacing, as diffusers' DDIM (DDPM overrides it)
        return t - self.config.num_train_timesteps // self.num_inference_steps

    def _x0_and_eps(self, model_output: torch.Tensor, x_t: torch.Tensor, abar_t: torch.Tensor):
        """The model's output read as (predicted x0, predicted ε), by prediction type."""
        x0, eps = x0_and_eps(model_output, x_t, abar_t**0.5, (1 - abar_t) ** 0.5, self.config.prediction_type)
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        return x0, eps


def x0_and_eps(model_output: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, prediction_type: str):
    """(x̂0, ε̂) from the model's output at x_t = α·x0 + σ·ε, with α = √ᾱ_t and σ = √(1−ᾱ_t): what every sampler
    steps with (DDIM, DDPM, DPM-Solver++). ε-prediction: the output is ε̂; v-prediction: it is v̂ = α·ε − σ·x0."""
    # BEGIN ASSIGNMENT 5
    if prediction_type == "epsilon":
        return (x_t - sigma * model_output) / alpha, model_output  # paper eq. 1 solved for x0
    # "v_prediction": v = α·ε − σ·x0, so x0 = α·x_t − σ·v and ε = α·v + σ·x_t (using α² + σ² = 1)
    return alpha * x_t - sigma * model_output, alpha * model_output + sigma * x_t
    # END ASSIGNMENT 5


def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like x, drawn on the generator's device (so CPU seeds repeat on GPU)."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


class DDPMScheduler(NoiseSchedule):
    """Ancestral sampling from p(x_{t−1} | x_t), with the "fixed_small" posterior variance."""

    def _prev_timestep(self, t: int) -> int:
        """The next of this schedule's timesteps (−1 after the last), where diffusers' DDPM steps to; with "leading"
        spacing that is t − T // n, DDIM's step, but "linspace" and "trailing" timesteps are not evenly spaced."""
        index = (self.timesteps.cpu() == t).nonzero()
        if len(index) == 0:
            raise ValueError(f"timestep {t} is not one of this schedule's timesteps {self.timesteps.tolist()}")
        i = int(index[0])
        return int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1

    def step(self, model_output: torch.Tensor, t, x_t: torch.Tensor, generator: torch.Generator | None = None) -> StepOutput:
        t = self._check_step(t)
        prev_t = self._prev_timestep(t)
        # BEGIN ASSIGNMENT 6
        abar_t = self.alphas_cumprod[t]
        abar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else torch.tensor(1.0)  # ᾱ before step 0 is 1
        alpha_t = abar_t / abar_prev  # the α of this (possibly skipped-over) stretch of steps
        beta_t = 1 - alpha_t  # and its β

        x0, _ = self._x0_and_eps(model_output, x_t, abar_t)
        # posterior mean  μ̃ = √ᾱ_prev·β_t/(1−ᾱ_t)·x0 + √α_t·(1−ᾱ_prev)/(1−ᾱ_t)·x_t   (DDPM eq. 7)
        mean = (abar_prev**0.5 * beta_t) / (1 - abar_t) * x0 + alpha_t**0.5 * (1 - abar_prev) / (1 - abar_t) * x_t
        if t > 0:
            # "fixed_small" variance  σ² = β̃_t = (1−ᾱ_prev)/(1−ᾱ_t)·β_t
            variance = ((1 - abar_prev) / (1 - abar_t) * beta_t).clamp(min=1e-20)
            mean = mean + variance**0.5 * _noise_like(model_output, generator)
        return StepOutput(mean, x0)
        # END ASSIGNMENT 6
