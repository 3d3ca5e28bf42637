"""Choosing a sampler by name. (A diffusers `scheduler_config.json` is read by `config.read_config(path, ScheduleConfig)`.)"""

from __future__ import annotations

import warnings
from pathlib import Path

from minipa.ddim import DDIMScheduler
from minipa.ddpm import DDPMScheduler, NoiseSchedule, ScheduleConfig
from minipa.dpm_solver import DPMSolverMultistepScheduler

SCHEDULERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "dpm++": DPMSolverMultistepScheduler}


def make_scheduler(name: str = "ddim", config: ScheduleConfig | None = None) -> NoiseSchedule:
    """A fresh sampler `name` ("ddim", "ddpm" or "dpm++", i.e. DPM-Solver++(2M)) over `config` (SD 1.5's by default)."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; expected one of {', '.join(map(repr, SCHEDULERS))}")
    if isinstance(config, (str, Path)):  # the old signature took a file; reading files is the loading layer's job now
        from minipa.config import read_config

        warnings.warn("make_scheduler(name, path) is deprecated: pass read_config(path, ScheduleConfig)", DeprecationWarning, stacklevel=2)
        config = read_config(config, ScheduleConfig)
    return SCHEDULERS[name](config)
