"""The noise schedule, paper eq. 1 (add_noise, loss) and the DDPM sampler, against diffusers."""

import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler as RefDDPM

from minipa.config import ConfigError, read_config
from minipa.ddpm import DDPMScheduler, ScheduleConfig, add_noise, diffusion_loss, make_betas, velocity

pytestmark = pytest.mark.usefixtures("lend_x0_and_eps")  # x̂0/ε are another assignment (conftest.py)

SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, clip_sample=False)


def reference(prediction_type="epsilon", **overrides):
    return RefDDPM(**{**SD15, "prediction_type": prediction_type, **overrides})


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear"])
def test_betas_and_alphas_cumprod_equal_diffusers(schedule):
    ref = RefDDPM(beta_schedule=schedule, beta_start=0.0001, beta_end=0.02)
    ours = DDPMScheduler(ScheduleConfig(beta_schedule=schedule, beta_start=0.0001, beta_end=0.02))
    assert torch.equal(ours.betas, ref.betas)
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)


# ─── Paper eq. 1, the forward process (a course assignment): one test per property, then the proof ──────


def which(value: float, candidates: dict[str, float]) -> str:
    """Name the quantity a wrong number equals, if it is one a learner might have computed instead."""
    return next((f" = {name}" for name, c in candidates.items() if abs(value - c) < 1e-4 * max(1.0, abs(c))), "")


def coefficients(abar):
    """What a learner might put in front of x0 or ε instead of √ᾱ_t and √(1−ᾱ_t)."""
    return {"√ᾱ_t": abar**0.5, "√(1−ᾱ_t)": (1 - abar) ** 0.5, "ᾱ_t: the square root is missing": abar,
            "1−ᾱ_t: the square root is missing": 1 - abar, "1 − √ᾱ_t, not √(1−ᾱ_t)": 1 - abar**0.5}


def test_add_noise_uses_each_samples_own_timestep():
    """Sample i is noised with ᾱ at its own t_i: a batch gives what each sample gives alone."""
    abar = DDPMScheduler().alphas_cumprod
    x0, eps, t = torch.randn(4, 2, 4, 4), torch.randn(4, 2, 4, 4), torch.tensor([999, 10, 500, 250])  # B = W: no shape error
    advice = "index alphas_cumprod with the (B,) timesteps and reshape ᾱ_t to (B, 1, 1, 1), so that it broadcasts over (C, H, W)"
    try:
        batch = add_noise(x0, eps, t, abar)
    except RuntimeError as error:
        pytest.fail(f"each sample needs its own ᾱ_t: {advice} ({error})")
    for i in range(4):
        alone = add_noise(x0[i : i + 1], eps[i : i + 1], t[i : i + 1], abar)[0]
        assert torch.allclose(batch[i], alone, atol=1e-6), (
            f"each sample needs its own ᾱ_t: sample {i} (t = {int(t[i])}) came out differently in a batch than alone; {advice}")


@pytest.mark.parametrize("term", ["x0", "ε"])
def test_add_noise_scales_x0_and_noise_by_the_square_roots_of_paper_eq1(term):
    """With ε = 0, x_t = √ᾱ_t·x0; with x0 = 0, x_t = √(1−ᾱ_t)·ε (ᾱ_t = alphas_cumprod[t], the paper's α_t)."""
    abar = DDPMScheduler().alphas_cumprod
    ones, zeros = torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)
    for t in (10, 250, 500, 999):
        a = float(abar[t])
        x_t = add_noise(ones, zeros, torch.tensor([t]), abar) if term == "x0" else add_noise(zeros, ones, torch.tensor([t]), abar)
        got, want = float(x_t.mean()), (a**0.5 if term == "x0" else (1 - a) ** 0.5)
        if term == "x0" and abs(got - (1 - a) ** 0.5) < 1e-4:
            pytest.fail(f"x0 and ε are swapped: x0 must be scaled by √ᾱ_t = {want:.4f} at t = {t}, ε by √(1−ᾱ_t) = {got:.4f}")
        assert abs(got - want) < 1e-5, (
            f"{term} must be scaled by {'√ᾱ_t' if term == 'x0' else '√(1−ᾱ_t)'} (paper eq. 1, ᾱ_t = alphas_cumprod[t]): "
            f"at t = {t} that is {want:.4f}, yours scaled it by {got:.4f}{which(got, coefficients(a))}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_add_noise_and_velocity_keep_the_sample_dtype(dtype):
    """ᾱ is kept in float32; the noisy sample and the v target come out in the sample's own dtype, as in diffusers."""
    x0, eps, t = torch.randn(2, 4, 8, 8).to(dtype), torch.randn(2, 4, 8, 8).to(dtype), torch.tensor([3, 700])
    abar = DDPMScheduler().alphas_cumprod
    x_t = add_noise(x0, eps, t, abar)
    assert x_t.dtype == dtype, f"x_t must keep x0's dtype ({dtype}), got {x_t.dtype}: cast ᾱ_t to x0's dtype before multiplying"
    assert velocity(x0, eps, t, abar).dtype == dtype and reference().add_noise(x0, eps, t).dtype == dtype


def test_add_noise_equals_diffusers_and_paper_eq1():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    ref = reference()
    ours = DDPMScheduler()
    torch.testing.assert_close(ours.add_noise(x0, eps, t), ref.add_noise(x0, eps, t), rtol=0, atol=1e-6,
                               msg=lambda m: f"x_t differs from diffusers' DDPMScheduler.add_noise (paper eq. 1): {m}")
    abar = ours.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(add_noise(x0, eps, t, ours.alphas_cumprod), abar.sqrt() * x0 + (1 - abar).sqrt() * eps)


def test_velocity_equals_diffusers():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([1, 400, 998])
    ref = reference("v_prediction")
    torch.testing.assert_close(velocity(x0, eps, t, DDPMScheduler().alphas_cumprod), ref.get_velocity(x0, eps, t), rtol=0, atol=1e-6)


# ─── The training loss of paper eq. 1 (a course assignment) ────────────────────────────────────


def test_loss_can_be_backpropagated():
    """Training differentiates the loss: it stays a 0-dim tensor connected to ε_θ."""
    eps, prediction = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8, requires_grad=True)
    loss = diffusion_loss(prediction, eps)
    assert isinstance(loss, torch.Tensor) and loss.requires_grad and loss.shape == (), (
        "the loss must stay a 0-dim tensor connected to ε_θ, so that training can backpropagate through it "
        f"(no .item(), .detach() or torch.tensor(…)); yours is a {type(loss).__name__} {tuple(getattr(loss, 'shape', ()))}")


def test_loss_is_a_mean_not_a_sum():
    """The same error everywhere gives the same loss whatever the batch and image size."""
    small, big = torch.randn(2, 4, 8, 8), torch.randn(8, 4, 16, 16)
    ratio = float(diffusion_loss(big + 0.5, big)) / float(diffusion_loss(small + 0.5, small))
    named = {"the sum over every element": big.numel() / small.numel(), "a mean per sample, summed over the batch": 4.0}
    assert abs(ratio - 1) < 1e-5, (
        f"the loss must be the mean over batch and pixels: the same error everywhere must give the same loss for a "
        f"(2, 4, 8, 8) and an (8, 4, 16, 16) batch; yours grew {ratio:g}×{which(ratio, named)}")


def test_loss_squares_the_error():
    """‖ε − ε_θ‖²: errors of ±1 and ±3 give 5 times the loss of errors of ±1 alone."""
    eps = torch.zeros(4, 4, 2, 2)
    mixed = torch.tensor([1.0, -1.0, 3.0, -3.0]).view(4, 1, 1, 1).expand(4, 4, 2, 2)
    ratio = float(diffusion_loss(eps + mixed, eps)) / float(diffusion_loss(eps + mixed.sign(), eps))
    named = {"the mean absolute error: square each error instead": 2.0, "a root of the mean square: drop the square root": 5**0.5}
    assert abs(ratio - 5) < 1e-5, (
        f"the loss squares each error (‖ε − ε_θ‖²): errors of ±1 and ±3 must give 5 times the loss of errors of ±1, "
        f"yours gives {ratio:g} times{which(ratio, named)}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_loss_is_computed_in_float32(dtype):
    """Half-precision training still computes the loss in float32: in float16 an error of 300 squared overflows."""
    eps = torch.zeros(2, 4, 8, 8)
    loss, want = diffusion_loss((eps + 300).to(dtype), eps.to(dtype)), diffusion_loss(eps + 300, eps)
    assert getattr(loss, "dtype", None) == torch.float32 and float(loss) == float(want), (
        f"compute the loss in float32 (.float() on both tensors first): {dtype} inputs with an error of 300 must give "
        f"what float32 inputs give, {float(want):g}; yours gives {float(loss):g} as {getattr(loss, 'dtype', type(loss).__name__)}")


def test_loss_is_mean_squared_noise_error():
    """The loss diffusers' training scripts use: F.mse_loss(ε_θ.float(), ε.float()) (mean), for any input dtype."""
    g = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        eps, prediction = torch.randn(3, 4, 8, 8, generator=g).to(dtype), torch.randn(3, 4, 8, 8, generator=g).to(dtype)
        assert diffusion_loss(eps, eps) == 0
        torch.testing.assert_close(diffusion_loss(prediction, eps), F.mse_loss(prediction.float(), eps.float()),
                                   msg=lambda m: f"the loss differs from F.mse_loss(ε_θ.float(), ε.float()) for {dtype} inputs: {m}")


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timesteps_equal_diffusers(spacing):
    ours, ref = DDPMScheduler(ScheduleConfig(timestep_spacing=spacing)), reference(timestep_spacing=spacing)
    for n in list(range(1, 60)) + [77, 100, 250, 333, 500, 999, 1000]:
        ours.set_timesteps(n)
        ref.set_timesteps(n)
        assert torch.equal(ours.timesteps, ref.timesteps), (spacing, n)


# ─── The DDPM step, DDPM eq. 7 (a course assignment): the mean, the noise, the last step, then diffusers ─────


def posterior(s: DDPMScheduler, t: int, prev_t: int, x_t: torch.Tensor, eps: torch.Tensor):
    """DDPM eq. 6–7 for a step from t to prev_t (ε-prediction): (μ̃, β̃), with α_t = ᾱ_t/ᾱ_prev for the whole stretch."""
    abar_t = s.alphas_cumprod[t]
    abar_prev = s.alphas_cumprod[prev_t] if prev_t >= 0 else torch.tensor(1.0)
    alpha_t = abar_t / abar_prev
    x0 = (x_t - (1 - abar_t) ** 0.5 * eps) / abar_t**0.5
    mean = abar_prev**0.5 * (1 - alpha_t) / (1 - abar_t) * x0 + alpha_t**0.5 * (1 - abar_prev) / (1 - abar_t) * x_t
    return mean, (1 - abar_prev) / (1 - abar_t) * (1 - alpha_t)


def mean_and_std_of_the_step(s: DDPMScheduler, t: int, x_t: torch.Tensor, eps: torch.Tensor):
    """Your step's μ and σ, read from two steps with z₁, z₂ drawn from generators seeded 1 and 2: x_prev = μ + σ·z."""
    z1, z2 = (torch.randn(eps.shape, generator=torch.Generator().manual_seed(seed)) for seed in (1, 2))
    out1, out2 = (s.step(eps, t, x_t, generator=torch.Generator().manual_seed(seed)).prev_sample for seed in (1, 2))
    std = float(((out1 - out2) / (z1 - z2)).median())
    return out1 - std * z1, std


def ddpm_case(seed=0, **settings):
    s = DDPMScheduler(ScheduleConfig(**settings))
    s.set_timesteps(10)  # leading: 901, 801, …, 1: each step spans 100 training steps
    g = torch.Generator().manual_seed(seed)
    return s, torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)


def test_ddpm_step_is_the_posterior_mean_of_ddpm_eq7():
    s, x_t, eps = ddpm_case()
    t, prev_t = 501, 401
    mean, _ = mean_and_std_of_the_step(s, t, x_t, eps)
    expected, _ = posterior(s, t, prev_t, x_t, eps)
    if (mean - expected).abs().max() < 1e-4:
        return
    abar_t, abar_prev, alpha_one = s.alphas_cumprod[t], s.alphas_cumprod[prev_t], s.alphas[t]  # α of one training step
    x0 = (x_t - (1 - abar_t) ** 0.5 * eps) / abar_t**0.5
    one_step = abar_prev**0.5 * (1 - alpha_one) / (1 - abar_t) * x0 + alpha_one**0.5 * (1 - abar_prev) / (1 - abar_t) * x_t
    why = ("you used α_t = alphas[t] of one training step, but this step spans t = 501 → 401: use α_t = ᾱ_t/ᾱ_prev and β_t = 1 − α_t"
           if (mean - one_step).abs().max() < 1e-3 else "check the coefficients of x̂0 (√ᾱ_prev·β_t/(1−ᾱ_t)) and of x_t (√α_t·(1−ᾱ_prev)/(1−ᾱ_t))")
    pytest.fail(f"DDPM step t = 501 → 401 of 10: the mean of x_prev is not the posterior mean μ̃ of DDPM eq. 7 "
                f"(off by {float((mean - expected).abs().max()):.3g}): {why}")


def test_ddpm_step_noise_has_the_posterior_standard_deviation():
    s, x_t, eps = ddpm_case()
    t, prev_t = 501, 401
    _, std = mean_and_std_of_the_step(s, t, x_t, eps)
    _, variance = posterior(s, t, prev_t, x_t, eps)
    beta = 1 - s.alphas_cumprod[t] / s.alphas_cumprod[prev_t]
    if abs(std - float(variance) ** 0.5) < 1e-5:
        return
    why = ("you scaled z by the variance β̃_t; scale it by the standard deviation √β̃_t" if abs(std - float(variance)) < 1e-5 else
           "you used β_t (\"fixed_large\"); SD 1.5's DDPM uses the posterior variance β̃_t = (1−ᾱ_prev)/(1−ᾱ_t)·β_t" if abs(std - float(beta) ** 0.5) < 1e-5
           else "draw z from the generator (torch.randn(shape, generator=generator)) and add √β̃_t·z")
    pytest.fail(f"DDPM step t = 501 → 401: the noise is scaled by {std:.4g}, not √β̃_t = {float(variance) ** 0.5:.4g}: {why}")


def test_ddpm_last_step_to_t_zero_adds_no_noise():
    s, x_t, eps = ddpm_case(steps_offset=0)  # timesteps 900, 800, …, 0
    first, second = (s.step(eps, 0, x_t, generator=torch.Generator().manual_seed(seed)).prev_sample for seed in (1, 2))
    expected, _ = posterior(s, 0, -1, x_t, eps)
    assert torch.equal(first, second), "at t = 0, the last step, DDPM adds no noise: x_prev is the posterior mean, the same for any generator"
    assert (first - expected).abs().max() < 1e-4, "at t = 0 there is no earlier ᾱ: ᾱ_prev = 1, so x_prev is x̂0"


@pytest.mark.parametrize("settings, n", [
    (dict(prediction_type="epsilon"), 25), (dict(prediction_type="v_prediction"), 25),
    (dict(timestep_spacing="linspace"), 10), (dict(timestep_spacing="trailing"), 10), (dict(steps_offset=0), 10),
])
def test_ddpm_steps_equal_diffusers(settings, n):
    """Every step of a loop, for both prediction types and every spacing: "linspace" and "trailing" timesteps are not
    evenly spaced (DDPM steps to the next one, not to t − T // n); linspace ends at t = 0, where no noise is added;
    with steps_offset 0 a step lands exactly on t = 0 (ᾱ_prev = ᾱ_0)."""
    ours = DDPMScheduler(ScheduleConfig(**{"steps_offset": 1, **settings}))
    ref = reference(**settings)
    ours.set_timesteps(n)
    ref.set_timesteps(n)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    for t in ours.timesteps:
        out = torch.randn(2, 4, 8, 8, generator=g)
        a = ours.step(out, t, x, generator=torch.Generator().manual_seed(int(t)))
        b = ref.step(out, t, x, generator=torch.Generator().manual_seed(int(t)))
        torch.testing.assert_close(a.prev_sample, b.prev_sample, rtol=0, atol=1e-6)
        torch.testing.assert_close(a.pred_original_sample, b.pred_original_sample, rtol=0, atol=1e-6)
        x = b.prev_sample


def test_config_reads_sd15_scheduler_json(tmp_path):
    # SD 1.5 ships a PNDM config; its schedule is the DDIM/DDPM one
    sd15 = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
            "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
            "clip_sample": False}
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps(sd15))
    assert read_config(path, ScheduleConfig) == ScheduleConfig.sd15()


def test_config_round_trips_through_diffusers_save(tmp_path):
    reference(timestep_spacing="trailing").save_config(tmp_path)
    config = read_config(tmp_path / "scheduler_config.json", ScheduleConfig)
    assert config.timestep_spacing == "trailing" and config.beta_schedule == "scaled_linear"


@pytest.mark.parametrize(
    "setting, words",
    [
        ({"beta_schedule": "squaredcos_cap_v2"}, ["beta_schedule", "squaredcos_cap_v2", "scaled_linear"]),
        ({"prediction_type": "sample"}, ["prediction_type", "'sample'", "epsilon"]),
        ({"timestep_spacing": "karras"}, ["timestep_spacing", "leading"]),
        ({"thresholding": True}, ["thresholding", "False"]),
        ({"trained_betas": [0.1, 0.2]}, ["trained_betas", "None"]),
        ({"use_karras_sigmas": True}, ["use_karras_sigmas"]),
    ],
)
def test_unsupported_config_names_the_key(tmp_path, setting, words):
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps({"beta_schedule": "scaled_linear", **setting}))
    with pytest.raises(ConfigError) as err:
        read_config(path, ScheduleConfig)
    for word in words + [str(path)]:
        assert word in str(err.value)


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        read_config(tmp_path / "nope.json", ScheduleConfig)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_config(tmp_path / "bad.json", ScheduleConfig)


@pytest.mark.parametrize("n", [0, -1, 1001, 2.5, "10", True])
def test_bad_step_counts(n):
    with pytest.raises(ValueError, match="num_steps must be an integer from 1 to"):
        DDPMScheduler().set_timesteps(n)


def test_step_before_set_timesteps_and_outside_schedule():
    s = DDPMScheduler()
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(x, 10, x)
    s.set_timesteps(10)
    for t in (-1, 1000, 5000):
        with pytest.raises(ValueError, match="outside the training schedule"):
            s.step(x, t, x)


def test_make_betas_is_monotone_and_in_range():
    betas = make_betas(ScheduleConfig())
    assert betas.shape == (1000,) and betas.dtype == torch.float32
    assert torch.all(betas[1:] > betas[:-1]) and 0 < betas[0] < betas[-1] < 1


@pytest.mark.parametrize("settings, words", [
    (dict(prediction_type="sample"), "prediction_type='sample' is not supported; expected one of 'epsilon', 'v_prediction'"),
    (dict(timestep_spacing="karras"), "timestep_spacing='karras' is not supported; expected one of 'leading', 'trailing'"),
    (dict(num_train_timesteps=0), "num_train_timesteps must be a positive integer, got 0"),
    (dict(num_train_timesteps=10.0), "num_train_timesteps must be a positive integer, got 10.0"),
    (dict(beta_start=0.0), "expected 0 < beta_start <= beta_end < 1, got 0.0 and 0.012"),
    (dict(beta_end=1.0), "expected 0 < beta_start <= beta_end < 1, got 0.00085 and 1.0"),
])
def test_impossible_schedules_are_refused_by_name(settings, words):
    with pytest.raises(ValueError) as err:
        ScheduleConfig(**settings)
    assert words in str(err.value)


def test_edge_schedules_are_allowed():
    """One training step, and a constant β (beta_start = beta_end), are odd but well defined."""
    assert DDPMScheduler(ScheduleConfig(num_train_timesteps=1)).betas.shape == (1,)
    assert torch.equal(make_betas(ScheduleConfig(beta_schedule="linear", beta_start=0.01, beta_end=0.01)), torch.full((1000,), 0.01))


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear"])
def test_betas_are_float32_whatever_the_default_dtype(schedule):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert make_betas(ScheduleConfig(beta_schedule=schedule)).dtype == torch.float32  # as diffusers' schedules
    finally:
        torch.set_default_dtype(previous)


def test_a_step_needs_a_timestep_of_the_schedule():
    s = DDPMScheduler()
    with pytest.raises(ValueError, match=r"^call set_timesteps\(num_steps\) before step\(\): the step size depends on it$"):
        s.step(torch.zeros(1), 981, torch.zeros(1))
    s.set_timesteps(1000)
    with pytest.raises(ValueError) as err:
        s.step(torch.zeros(1), 1000, torch.zeros(1))
    assert str(err.value) == ("timestep 1000 is outside the training schedule [0, 999] (leading spacing with steps_offset "
                              "reaches T when num_steps == T; use fewer steps)")
    with pytest.raises(ValueError) as err:
        s.step(torch.zeros(1), -1, torch.zeros(1))
    assert str(err.value) == "timestep -1 is outside the training schedule [0, 999]"
    s.set_timesteps(10)
    with pytest.raises(ValueError, match=r"timestep 500 is not one of this schedule's timesteps \[901, 801"):
        s.step(torch.zeros(1), 500, torch.zeros(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_ddpm_noise_has_the_sample_dtype(dtype):
    s = DDPMScheduler()
    s.set_timesteps(10)
    out = s.step(torch.randn(1, 4, 8, 8).to(dtype), 901, torch.randn(1, 4, 8, 8).to(dtype), generator=torch.Generator().manual_seed(0))
    assert out.prev_sample.dtype == dtype
