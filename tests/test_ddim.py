"""DDIM with SD 1.5's conventions, step by step and over a whole trajectory, against diffusers."""

import math

import pytest
import torch
from diffusers import DDIMScheduler as RefDDIM

from minipa.config import read_config
from minipa.ddim import DDIMScheduler
from minipa.ddpm import ScheduleConfig
from minipa.schedulers import make_scheduler

pytestmark = pytest.mark.usefixtures("lend_x0_and_eps")  # x̂0/ε are another assignment (conftest.py)

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


# ─── The DDIM step (a course assignment): one test per term of DDIM eq. 12, then the proof ─────
# Each test reads the coefficients of the step's output back by least squares over the sample's elements
# (x̂0 = c_x·x_t + c_ε·ε; x_prev = a·x̂0 + b·ε + c·z), so that a message can say which term is wrong.


def fit(y: torch.Tensor, *terms: torch.Tensor) -> tuple[list[float], float]:
    """Coefficients of y as a combination of `terms` (least squares over all elements), and the relative residual."""
    A = torch.stack([term.flatten().double() for term in terms], dim=1)
    b = y.flatten().double()
    if not b.isfinite().all():
        return [math.nan] * len(terms), math.inf
    coefficients = torch.linalg.lstsq(A, b[:, None]).solution[:, 0]
    return coefficients.tolist(), float((A @ coefficients - b).norm() / b.norm())


def what_abar(s: DDIMScheduler, value: float, t: int | None = None) -> str:
    """Name a number a learner used in place of an ᾱ: 1, the ᾱ of some timestep, or a one-step α."""
    if abs(value - 1) < 1e-5:
        return " = 1"
    abar, alphas = s.alphas_cumprod.double(), s.alphas.double()
    near = lambda table: [i for i in range(len(table)) if abs(float(table[i]) - value) < 1e-5 * value]  # noqa: E731
    if near(abar):
        i = near(abar)[0]
        extra = ": one training step back (t − 1), not one inference step (t − T/n)" if t is not None and i == t - 1 else ""
        return f" = ᾱ at t = {i}{extra}"
    if near(alphas):
        return f" = α_{near(alphas)[0]} = 1 − β: one step's α, not the cumulative product ᾱ (alphas_cumprod)"
    return ""


def sd15_ddim(n: int = 50, **overrides) -> DDIMScheduler:
    s = DDIMScheduler(ScheduleConfig(**overrides))
    s.set_timesteps(n)
    return s


def where(s: DDIMScheduler, i: int, t) -> str:
    return f"DDIM step {i + 1} of {len(s.timesteps)} (t = {int(t)})"


def test_ddim_step_reads_x0_at_abar_t():
    """x̂0 = (x_t − √(1−ᾱ_t)·ε)/√ᾱ_t with ᾱ_t = alphas_cumprod[t]: what self._x0_and_eps computes from ᾱ_t."""
    s, g = sd15_ddim(), torch.Generator().manual_seed(0)
    for i, t in enumerate(s.timesteps):
        x, eps = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
        (c_x, _), _ = fit(s.step(eps, t, x).pred_original_sample, x, eps)
        abar, used = float(s.alphas_cumprod[t]), 1 / c_x**2
        assert abs(used - abar) < 1e-4 * abar, (
            f"{where(s, i, t)}: x̂0 must be read at ᾱ_t = alphas_cumprod[t] = {abar:.5f} (self._x0_and_eps(model_output, "
            f"x_t, ᾱ_t)); yours used {used:.5f}{what_abar(s, used, int(t))}")


def test_ddim_step_goes_back_one_inference_step():
    """x_prev's x̂0 term is √ᾱ_prev·x̂0 with t_prev = t − T/n, the previous of the n inference timesteps."""
    s, g = sd15_ddim(), torch.Generator().manual_seed(1)
    for i, t in enumerate(s.timesteps[:-1]):
        x, eps = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
        out = s.step(eps, t, x, generator=torch.Generator().manual_seed(i))
        z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(i))  # in case noise is added at η = 0
        (a, _, _), _ = fit(out.prev_sample, out.pred_original_sample, eps, z)
        prev = int(t) - 1000 // 50
        want = float(s.alphas_cumprod[prev])
        assert abs(a**2 - want) < 1e-4 * want, (
            f"{where(s, i, t)}: x_prev = √ᾱ_prev·x̂0 + …, with ᾱ_prev at the previous inference timestep t − T/n = {prev} "
            f"(self._prev_timestep(t)): {want:.5f}; yours used {a**2:.5f}{what_abar(s, a**2, int(t))}")


@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_ddim_last_step_uses_the_final_alpha(set_alpha_to_one):
    """After the last timestep there is none: ᾱ_prev is ᾱ_0 (SD 1.5, set_alpha_to_one=False) or 1 (set_alpha_to_one=True)."""
    s = sd15_ddim(set_alpha_to_one=set_alpha_to_one)
    x, eps, t = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), s.timesteps[-1]
    out = s.step(eps, t, x, generator=torch.Generator().manual_seed(0))
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    (a, _, _), _ = fit(out.prev_sample, out.pred_original_sample, eps, z)
    want = 1.0 if set_alpha_to_one else float(s.alphas_cumprod[0])
    rule = (f"the last DDIM step (t = {int(t)}) has no earlier timestep (t − T/n < 0): with set_alpha_to_one={set_alpha_to_one} "
            f"ᾱ_prev must be {'1' if set_alpha_to_one else 'ᾱ_0 = alphas_cumprod[0]'} = {want:.5f}")
    negative = "alphas_cumprod[t − T/n] is a negative index, which reads the end of the schedule"
    assert not math.isnan(a), f"{rule}; yours gave NaN (√ of a negative number: 1 − ᾱ_t/ᾱ_prev < 0 when ᾱ_prev < ᾱ_t; {negative})"
    used = f": {negative}" if abs(a**2 - float(s.alphas_cumprod[t - 20])) < 1e-6 else what_abar(s, a**2)
    assert abs(a**2 - want) < 1e-6, f"{rule}; yours used {a**2:.5f}{used}"


def test_ddim_step_with_eta_has_the_direction_and_noise_terms_of_ddim_eq12():
    """x_prev = √ᾱ_prev·x̂0 + √(1−ᾱ_prev−σ²)·ε + σ·z, σ = η·√((1−ᾱ_prev)/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_prev), z from the generator."""
    s, g = sd15_ddim(), torch.Generator().manual_seed(2)
    for eta in (0.0, 0.5, 1.0):
        for i, t in enumerate(s.timesteps):
            x, eps = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
            z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(i))
            out = s.step(eps, t, x, eta=eta, generator=torch.Generator().manual_seed(i))
            (a, b, c), residual = fit(out.prev_sample, out.pred_original_sample, eps, z)
            abar_t = float(s.alphas_cumprod[t])
            abar_prev = float(s.alphas_cumprod[t - 20]) if t >= 20 else float(s.alphas_cumprod[0])
            sigma_1 = ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)) ** 0.5  # σ at η = 1
            sigma = eta * sigma_1
            here = f"{where(s, i, t)}, η = {eta}: x_prev differs;"
            assert residual < 1e-5, f"{here} it is not a sum of x̂0, ε and the generator's noise z (_noise_like(model_output, generator)) times numbers"
            assert abs(a - abar_prev**0.5) < 1e-4, f"{here} the x̂0 term should be √ᾱ_prev·x̂0 = {abar_prev**0.5:.5f}·x̂0, yours is {a:.5f}·x̂0"
            named = {"σ without η: η is missing": sigma_1, "σ²": sigma**2}
            assert abs(c - sigma) < 1e-4, (
                f"{here} the x̂0 term is right, the noise term is not: σ·z with σ = η·√((1−ᾱ_prev)/(1−ᾱ_t))·"
                f"√(1−ᾱ_t/ᾱ_prev) = {sigma:.5f}, yours has {c:.5f}·z{which(c, named)}")
            direction = (1 - abar_prev - sigma**2) ** 0.5
            named = {"√(1−ᾱ_prev): σ² is missing": (1 - abar_prev) ** 0.5, "√(1−ᾱ_prev−σ): σ where σ² belongs": (1 - abar_prev - sigma) ** 0.5,
                     "√(1−ᾱ_prev−σ²) with σ at η = 1: η is missing from σ": (1 - abar_prev - sigma_1**2) ** 0.5}
            assert abs(b - direction) < 1e-4, (
                f"{here} the x̂0 and noise terms are right, the direction term is not: √(1−ᾱ_prev−σ²) = {direction:.5f}, yours is {b:.5f}"
                f"{which(b, named)}")


def which(value: float, candidates: dict[str, float]) -> str:
    return next((f" = {name}" for name, c in candidates.items() if abs(value - c) < 1e-4 * max(1.0, abs(c))), "")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_every_step_equals_diffusers(prediction_type, eta, set_alpha_to_one):
    ours, ref = pair(prediction_type=prediction_type, set_alpha_to_one=set_alpha_to_one)
    ours.set_timesteps(20)
    ref.set_timesteps(20)
    g = torch.Generator().manual_seed(0)
    for i, t in enumerate(ours.timesteps):
        x = torch.randn(2, 4, 8, 8, generator=g)
        out = torch.randn(2, 4, 8, 8, generator=g)
        a = ours.step(out, t, x, eta=eta, generator=torch.Generator().manual_seed(int(t)))
        b = ref.step(out, t, x, eta=eta, generator=torch.Generator().manual_seed(int(t)))
        here = f"{where(ours, i, t)}, η = {eta}, {prediction_type}, set_alpha_to_one={set_alpha_to_one}"
        torch.testing.assert_close(a.pred_original_sample, b.pred_original_sample, rtol=0, atol=1e-6,
                                   msg=lambda m: f"{here}: x̂0 differs from diffusers' DDIMScheduler: {m}")
        torch.testing.assert_close(a.prev_sample, b.prev_sample, rtol=0, atol=1e-6,
                                   msg=lambda m: f"{here}: x_prev differs from diffusers' DDIMScheduler (x̂0 is right): {m}")


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
