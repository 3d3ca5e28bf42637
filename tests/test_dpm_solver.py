"""DPM-Solver++(2M) against diffusers' DPMSolverMultistepScheduler (its defaults: dpmsolver++, order 2,
midpoint, final sigma 0): timesteps, σ, and every step of whole sampling loops."""

import dataclasses

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler as Reference

from minipa.ddpm import ScheduleConfig
from minipa.dpm_solver import DPMSolverMultistepScheduler
from minipa.schedulers import make_scheduler

pytestmark = pytest.mark.usefixtures("lend_x0_and_eps")  # x̂0/ε are another assignment (conftest.py)

SPACINGS = ("leading", "linspace", "trailing")


def pair(**settings):
    config = ScheduleConfig(**{**dataclasses.asdict(ScheduleConfig.sd15()), **settings})
    return DPMSolverMultistepScheduler(config), Reference.from_config(dataclasses.asdict(config))


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("n", [1, 2, 10, 14, 15, 25, 50, 500, 1000])
def test_timesteps_and_sigmas_equal_diffusers(spacing, n):
    ours, ref = pair(timestep_spacing=spacing)
    ours.set_timesteps(n)
    ref.set_timesteps(n)
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert torch.equal(ours.sigmas, ref.sigmas)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("n", [10, 25])  # below 15 steps diffusers switches on its lower-order final steps
def test_every_step_of_a_loop_equals_diffusers(prediction_type, spacing, n):
    ours, ref = pair(timestep_spacing=spacing, prediction_type=prediction_type)
    ours.set_timesteps(n)
    ref.set_timesteps(n)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    x_ref = x.clone()
    for t in ours.timesteps:
        model_output = torch.randn(2, 4, 8, 8, generator=g)  # stands in for the UNet: the same for both
        out, expected = ours.step(model_output, t, x), ref.step(model_output, t, x_ref)
        torch.testing.assert_close(out.prev_sample, expected.prev_sample, atol=1e-6, rtol=1e-5)
        x, x_ref = out.prev_sample, expected.prev_sample
    assert x.abs().max() > 0


def test_out_of_order_steps_are_a_clear_error():
    sampler = make_scheduler("dpm++")
    with pytest.raises(ValueError, match="set_timesteps"):
        sampler.step(torch.zeros(1, 4, 8, 8), 981, torch.zeros(1, 4, 8, 8))
    sampler.set_timesteps(10)
    with pytest.raises(ValueError, match="not one of this schedule's timesteps"):
        sampler.step(torch.zeros(1, 4, 8, 8), 500, torch.zeros(1, 4, 8, 8))
    first, second = sampler.timesteps[:2]
    sampler.step(torch.zeros(1, 4, 8, 8), first, torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match=f"in order; got t={int(first)}, expected {int(second)}"):
        sampler.step(torch.zeros(1, 4, 8, 8), first, torch.zeros(1, 4, 8, 8))


def test_finished_schedule_and_dtypes():
    sampler = make_scheduler("dpm++")
    sampler.set_timesteps(2)
    assert sampler.timesteps.dtype == torch.int64
    x = torch.randn(1, 4, 8, 8).to(torch.float16)
    for t in sampler.timesteps:
        out = sampler.step(torch.randn(1, 4, 8, 8).to(torch.float16), t, x)
        assert out.prev_sample.dtype == out.pred_original_sample.dtype == torch.float16
        x = out.prev_sample
    with pytest.raises(ValueError) as err:
        sampler.step(torch.zeros(1, 4, 8, 8), sampler.timesteps[-1], torch.zeros(1, 4, 8, 8))
    assert "expected none: the schedule is finished (set_timesteps starts over)" in str(err.value)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_predicted_x0_equals_diffusers(prediction_type):
    ours, ref = pair(prediction_type=prediction_type)
    ours.set_timesteps(5)
    ref.set_timesteps(5)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 4, 8, 8, generator=g)
    for t in ours.timesteps:
        out = torch.randn(1, 4, 8, 8, generator=g)
        x0 = ours.step(out, t, x).pred_original_sample
        if ref.step_index is None:
            ref._init_step_index(t)  # diffusers sets it in its first step(); convert_model_output reads it
        torch.testing.assert_close(x0, ref.convert_model_output(out, sample=x), atol=1e-5, rtol=1e-5)
        x = ref.step(out, t, x).prev_sample
