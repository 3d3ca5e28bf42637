"""Choosing a sampler by name. (A diffusers `scheduler_config.json` is read by `config.read_config(path, ScheduleConfig)`.)"""

from __future__ import annotations

from minipa.ddim import DDIMScheduler
from minipa.ddpm import DDPMScheduler, NoiseSchedule, ScheduleConfig
from minipa.dpm_solver import DPMSolverMultistepScheduler

SCHEDULERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "dpm++": DPMSolverMultistepScheduler}


def make_scheduler(name: str = "ddim", config: ScheduleConfig | None = None) -> NoiseSchedule:
    """A fresh sampler `name` ("ddim", "ddpm" or "dpm++", i.e. DPM-Solver++(2M)) over `config` (SD 1.5's by default)."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; expected one of {', '.join(map(repr, SCHEDULERS))}")
    return SCHEDULERS[name](config)
