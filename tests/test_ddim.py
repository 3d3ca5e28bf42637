"""DDIM with SD 1.5's conventions, step by step and over a whole trajectory, against diffusers."""

import pytest
import torch
from diffusers import DDIMScheduler as RefDDIM

from minipa.config import read_config
from minipa.ddim import DDIMScheduler
from minipa.ddpm import ScheduleConfig
from minipa.schedulers import make_scheduler

SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
            clip_sample=False, set_alpha_to_one=False)


def pair(**overrides):
    return DDIMScheduler(ScheduleConfig(**overrides)), RefDDIM(**{**SD15, **overrides})


@pytest.mark.parametrize("n", [1, 10, 25, 50, 1000])
def test_timesteps_equal_diffusers_for_sd15(n):
    ours, ref = pair()
    ours.set_timesteps(n)
    ref.set_timesteps(n)
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert ours.timesteps.dtype == torch.int64


def test_sd15_leading_spacing_with_offset():
    s = DDIMScheduler()
    s.set_timesteps(50)
    assert s.timesteps[0] == 981 and s.timesteps[-1] == 1 and len(s.timesteps) == 50


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_every_step_equals_diffusers(prediction_type, eta, set_alpha_to_one):
    ours, ref = pair(prediction_type=prediction_type, set_alpha_to_one=set_alpha_to_one)
    ours.set_timesteps(20)
    ref.set_timesteps(20)
    g = torch.Generator().manual_seed(0)
    for t in ours.timesteps:
        x = torch.randn(2, 4, 8, 8, generator=g)
        out = torch.randn(2, 4, 8, 8, generator=g)
        a = ours.step(out, t, x, eta=eta, generator=torch.Generator().manual_seed(int(t)))
        b = ref.step(out, t, x, eta=eta, generator=torch.Generator().manual_seed(int(t)))
        torch.testing.assert_close(a.prev_sample, b.prev_sample, rtol=0, atol=1e-6)
        torch.testing.assert_close(a.pred_original_sample, b.pred_original_sample, rtol=0, atol=1e-6)


def analytic_eps(x, t):
    """A fixed, smooth stand-in for a UNet: depends on the sample and the timestep."""
    return torch.tanh(0.7 * x) * (t / 1000.0) + 0.1 * torch.sin(x + t / 100.0)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_full_50_step_loop_equals_diffusers(eta):
    ours, ref = pair()
    ours.set_timesteps(50)
    ref.set_timesteps(50)
    x0 = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(42))
    ga, gb = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    xa, xb = x0.clone(), x0.clone()
    for t in ours.timesteps:
        xa = ours.step(analytic_eps(xa, t), t, xa, eta=eta, generator=ga).prev_sample
        xb = ref.step(analytic_eps(xb, t), t, xb, eta=eta, generator=gb).prev_sample
    assert (xa - xb).abs().max() <= 1e-5


def test_eta_zero_is_deterministic_and_eta_one_uses_generator():
    s = DDIMScheduler()
    s.set_timesteps(10)
    x, out = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    t = s.timesteps[3]
    assert torch.equal(s.step(out, t, x).prev_sample, s.step(out, t, x).prev_sample)
    a = s.step(out, t, x, eta=1.0, generator=torch.Generator().manual_seed(1)).prev_sample
    b = s.step(out, t, x, eta=1.0, generator=torch.Generator().manual_seed(2)).prev_sample
    assert not torch.equal(a, b)


def test_bad_input_is_a_clear_error():
    s = DDIMScheduler()
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(x, 1, x)
    s.set_timesteps(1000)
    with pytest.raises(ValueError, match="outside the training schedule.*use fewer steps"):
        s.step(x, s.timesteps[0], x)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        s.step(x, 1, x, eta=-1)
    with pytest.raises(ValueError, match="beta_schedule='cosine' is not supported"):
        ScheduleConfig(beta_schedule="cosine")
    with pytest.raises(ValueError, match="unknown scheduler 'euler'"):
        make_scheduler("euler")


def test_make_scheduler_from_a_diffusers_config(tmp_path):
    RefDDIM(**SD15).save_config(tmp_path)
    s = make_scheduler("ddim", read_config(tmp_path / "scheduler_config.json", ScheduleConfig))
    assert isinstance(s, DDIMScheduler) and s.config == ScheduleConfig.sd15()


@pytest.mark.parametrize("settings", [dict(set_alpha_to_one=True, steps_offset=0), dict(clip_sample=True),
                                      dict(clip_sample=True, prediction_type="v_prediction")])
def test_steps_to_t_zero_and_clipped_samples_equal_diffusers(settings):
    """A step that lands exactly on t = 0 (ᾱ_0, not the final ᾱ = 1), and x̂0 clipped to ±clip_sample_range."""
    ours, ref = pair(**{"clip_sample_range": 0.5, **settings})
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    g = torch.Generator().manual_seed(3)
    for t in ours.timesteps:
        x, out = torch.randn(1, 4, 8, 8, generator=g), 2 * torch.randn(1, 4, 8, 8, generator=g)
        a, b = ours.step(out, t, x), ref.step(out, t, x)
        torch.testing.assert_close(a.prev_sample, b.prev_sample, rtol=0, atol=1e-6)
        torch.testing.assert_close(a.pred_original_sample, b.pred_original_sample, rtol=0, atol=1e-6)
