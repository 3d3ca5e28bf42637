"""Choosing a sampler by name and loading its schedule from a diffusers `scheduler_config.json`."""

from __future__ import annotations

from pathlib import Path

from minipa.config import read_config
from minipa.ddim import DDIMScheduler
from minipa.ddpm import DDPMScheduler, NoiseSchedule, ScheduleConfig
from minipa.dpm_solver import DPMSolverMultistepScheduler

SCHEDULERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "dpm++": DPMSolverMultistepScheduler}


def make_scheduler(name: str = "ddim", config: ScheduleConfig | str | Path | None = None) -> NoiseSchedule:
    """A fresh sampler `name` ("ddim", "ddpm" or "dpm++", i.e. DPM-Solver++(2M)) over `config` (a ScheduleConfig, a JSON path, or SD 1.5's)."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; expected one of {', '.join(map(repr, SCHEDULERS))}")
    if isinstance(config, (str, Path)):
        config = read_config(config, ScheduleConfig)
    return SCHEDULERS[name](config)
