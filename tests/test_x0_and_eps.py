"""Reading the model's output (a course assignment): x̂0 and ε̂ from paper eq. 1, x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε, solved
for what the model did not predict; for ε-prediction (SD 1.5) and v-prediction (v = √ᾱ_t·ε − √(1−ᾱ_t)·x0). One test per
property, then both kinds at once (a mistake in either fails those), then diffusers."""

import pytest
import torch
from diffusers import DDIMScheduler as RefDDIM

from minipa.ddpm import ScheduleConfig, x0_and_eps

ABAR = 0.3  # ᾱ_t of some timestep: α = √ᾱ_t, σ = √(1−ᾱ_t)


def case(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    alpha, sigma = torch.tensor(ABAR) ** 0.5, torch.tensor(1 - ABAR) ** 0.5
    return x0, eps, alpha, sigma, alpha * x0 + sigma * eps  # x_t   (paper eq. 1)


def close(a, b) -> bool:
    return bool((a - b).abs().max() < 1e-5)


def test_eps_prediction_x0_solves_paper_eq1_for_x0():
    x0, eps, alpha, sigma, x_t = case()
    got, _ = x0_and_eps(eps, x_t, alpha, sigma, "epsilon")
    if close(got, x0):
        return
    why = ("divide by √ᾱ_t, do not multiply" if close(got, (x_t - sigma * eps) * alpha) else
           "subtract σ·ε = √(1−ᾱ_t)·ε, the noise as x_t holds it, not ε itself" if close(got, (x_t - eps) / alpha) else
           "divide by √ᾱ_t: x_t − σ·ε is √ᾱ_t·x0" if close(got, x_t - sigma * eps) else
           "divide by √ᾱ_t, not by ᾱ_t (α is already the square root)" if close(got, (x_t - sigma * eps) / alpha**2) else
           "solve x_t = α·x0 + σ·ε for x0")
    pytest.fail(f"ε-prediction at ᾱ_t = {ABAR}: x̂0 must be (x_t − σ·ε̂)/α, paper eq. 1 solved for x0: {why}")


def test_eps_prediction_eps_is_the_models_output():
    x0, eps, alpha, sigma, x_t = case()
    _, got = x0_and_eps(eps, x_t, alpha, sigma, "epsilon")
    assert torch.equal(got, eps), "with ε-prediction the model's output is ε̂ itself: return it unchanged"


def test_v_prediction_x0_is_alpha_x_t_minus_sigma_v():
    x0, eps, alpha, sigma, x_t = case()
    v = alpha * eps - sigma * x0
    got, _ = x0_and_eps(v, x_t, alpha, sigma, "v_prediction")
    if close(got, x0):
        return
    why = ("the model's output is v, not ε: reading it as ε gives (x_t − σ·v)/α" if close(got, (x_t - sigma * v) / alpha) else
           "the sign of σ·v: v = α·ε − σ·x0, so x0 = α·x_t − σ·v" if close(got, alpha * x_t + sigma * v) else
           "α and σ swapped: x0 = α·x_t − σ·v" if close(got, sigma * x_t - alpha * v) else
           "write x_t and v in x0 and ε and use α² + σ² = 1")
    pytest.fail(f"v-prediction at ᾱ_t = {ABAR}: x̂0 must be α·x_t − σ·v̂: {why}")


def test_v_prediction_eps_is_alpha_v_plus_sigma_x_t():
    x0, eps, alpha, sigma, x_t = case()
    v = alpha * eps - sigma * x0
    _, got = x0_and_eps(v, x_t, alpha, sigma, "v_prediction")
    if close(got, eps):
        return
    why = ("the model's output is v, not ε: do not return it as ε̂" if close(got, v) else
           "the sign of σ·x_t: ε = α·v + σ·x_t" if close(got, alpha * v - sigma * x_t) else
           "α and σ swapped: ε = α·v + σ·x_t" if close(got, sigma * v + alpha * x_t) else "write x_t and v in x0 and ε and use α² + σ² = 1")
    pytest.fail(f"v-prediction at ᾱ_t = {ABAR}: ε̂ must be α·v̂ + σ·x_t: {why}")


@pytest.mark.parametrize("abar", [0.999, 0.5, 0.01])
def test_x0_and_eps_put_back_together_give_x_t(abar):
    """For either kind of prediction, α·x̂0 + σ·ε̂ is x_t again (paper eq. 1), at every noise level."""
    g = torch.Generator().manual_seed(1)
    x_t, output = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    alpha, sigma = torch.tensor(abar) ** 0.5, torch.tensor(1 - abar) ** 0.5
    for kind in ("epsilon", "v_prediction"):
        x0, eps = x0_and_eps(output, x_t, alpha, sigma, kind)
        error = float((alpha * x0 + sigma * eps - x_t).abs().max())
        assert error < 1e-4, f"{kind} at ᾱ_t = {abar}: α·x̂0 + σ·ε̂ must give x_t back (paper eq. 1), it is off by {error:.3g}"


def test_predicted_x0_equals_diffusers_for_both_kinds_of_prediction():
    """diffusers' DDIM step returns x̂0 as pred_original_sample: ours equals it at every timestep of a 10-step schedule."""
    g = torch.Generator().manual_seed(2)
    for kind in ("epsilon", "v_prediction"):
        config = ScheduleConfig.sd15()
        reference = RefDDIM(beta_start=config.beta_start, beta_end=config.beta_end, beta_schedule=config.beta_schedule,
                            steps_offset=1, clip_sample=False, set_alpha_to_one=False, prediction_type=kind)
        reference.set_timesteps(10)
        for t in reference.timesteps:
            x_t, output = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
            abar = reference.alphas_cumprod[t]
            expected = reference.step(output, t, x_t).pred_original_sample
            got, _ = x0_and_eps(output, x_t, abar**0.5, (1 - abar) ** 0.5, kind)
            error = float((got - expected).abs().max())
            assert error < 1e-4, f"{kind}, t = {int(t)}: x̂0 differs from diffusers' pred_original_sample by {error:.3g}"
