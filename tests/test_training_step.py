"""The UNet's training step (a course assignment, minipa/train/unet.py `UNetTraining.denoising_loss`), paper eq. 1:

    z = s·(μ + σ·ε_z),   x_t = √ᾱ_t·z + √(1−ᾱ_t)·ε,   L = ‖ε − ε_θ(x_t, c, t)‖².

The step runs the forward process and the loss, assignments of their own: the tests lend it theirs
(`lend_add_noise_and_loss` in conftest.py), which also record what the step called them with. The diagnostic
tests put a spy in the UNet's place, so that each looks at one quantity (the latent sample, its scale, the noise
and t of x_t, the UNet's inputs, the loss's target) and names the mistake there; the last test assembles the
same step from diffusers (DDPMScheduler.add_noise with SD 1.5's schedule, diffusers' UNet with the same weights,
F.mse_loss) and compares the loss and every gradient.
"""

import pytest
import torch
from conftest import TINY_UNET, add_noise_of_the_tests, randomize

from minipa.train.trainer import step_generator
from minipa.train.unet import DiffusionData, UNetTraining

SCALE = 0.18215  # SD 1.5's VAE scaling_factor
B = 6


class SpyUNet(torch.nn.Module):
    """Stands in for the UNet: records what it is given and returns a fixed prediction."""

    def __init__(self, shape):
        super().__init__()
        self.prediction = torch.randn(shape, generator=torch.Generator().manual_seed(7))
        self.calls = []

    def forward(self, sample, timestep, encoder_hidden_states, image_tokens=None):
        self.calls.append({"sample": sample, "timestep": timestep, "context": encoder_hidden_states, "image_tokens": image_tokens})
        return self.prediction


def diffusion_data(latent=(4, 4, 4), width=8, n=10, seed=0) -> DiffusionData:
    g = torch.Generator().manual_seed(seed)
    return DiffusionData(
        latent_mean=torch.randn(n, *latent, generator=g),
        latent_std=0.2 + 0.5 * torch.rand(n, *latent, generator=g),  # σ varies, so that σ and σ² differ
        scaling_factor=SCALE,
        text=torch.randn(5, 77, width, generator=g),
        caption_index=torch.randint(0, 4, (n,), generator=g),
    )


def spied_step(image_tokens=None):
    """One step with the spy for a UNet: (module, batch, the batch's latent posterior (μ, σ), text, loss)."""
    data = diffusion_data()
    module = UNetTraining(SpyUNet((B, *data.latent_shape)), data)
    b = module.batch(step_generator(0, 0), B)
    assert len(set(b["t"].tolist())) == B  # every sample its own t
    mean, std, text, _ = data.rows(b["index"], b["caption"])
    loss = module.denoising_loss(b, mean, std, text, image_tokens=image_tokens)
    return module, b, mean, std, text, loss


def close(a, b) -> bool:
    return torch.is_tensor(a) and a.shape == torch.as_tensor(b).shape and torch.allclose(a.float(), torch.as_tensor(b).float(), atol=1e-5, rtol=1e-5)


def the_latent(calls, module, b, spy) -> torch.Tensor:
    """The z the step noised: what it gave add_noise, or, if it wrote eq. 1 out itself, z read back from the x_t the UNet
    saw (eq. 1 solved for z, with the batch's ε and t)."""
    if calls["add_noise"]:
        return calls["add_noise"][0]["x0"]
    assert spy.calls, "the UNet was never called: ε_θ = self.unet(x_t, t, text, image_tokens=image_tokens)"
    abar = module.alphas_cumprod[b["t"]].view(-1, 1, 1, 1)
    return (spy.calls[0]["sample"] - (1 - abar).sqrt() * b["noise"]) / abar.sqrt()


def test_the_latent_is_a_fresh_sample_of_the_posterior_not_its_mean(lend_add_noise_and_loss):
    module, b, mean, std, _, _ = spied_step()
    z = the_latent(lend_add_noise_and_loss, module, b, module.unet)
    scales = (SCALE, 1.0, 1 / SCALE)  # the scale is the next test's question
    if any(close(z, c * (mean + std * b["latent_noise"])) for c in scales):
        return
    if any(close(z, c * mean) for c in scales):
        pytest.fail("z must be a fresh sample of q(z|x), z = μ + σ·ε_z with ε_z = b[\"latent_noise\"], not the mean μ: "
                    "the mean alone never shows the UNet the spread of latents an image can have")
    if any(close(z, c * (mean + std * b["noise"])) for c in scales):
        pytest.fail("the latent's sample uses ε_z = b[\"latent_noise\"]; b[\"noise\"] is ε, the noise of x_t and the loss's "
                    "target: two different noises")
    if any(close(z, c * (mean + std**2 * b["latent_noise"])) for c in scales):
        pytest.fail("z = μ + σ·ε_z with σ = std, the standard deviation; you scaled ε_z by the variance σ²")
    pytest.fail("z must be s·(μ + σ·ε_z), a fresh sample of q(z|x) with ε_z = b[\"latent_noise\"], μ = mean, σ = std; yours "
                f"differs from it by up to {(z - SCALE * (mean + std * b['latent_noise'])).abs().max():.3g}")


def test_the_latent_is_scaled_by_the_vaes_scaling_factor_before_noising(lend_add_noise_and_loss):
    module, b, mean, std, _, _ = spied_step()
    z = the_latent(lend_add_noise_and_loss, module, b, module.unet)
    samples = (mean + std * b["latent_noise"], mean, mean + std * b["noise"], mean + std**2 * b["latent_noise"])
    if any(close(z, SCALE * x) for x in samples):
        return
    if any(close(z, x) for x in samples):
        pytest.fail(f"the latent must be scaled by the VAE's scaling_factor s = {SCALE} before noising, z = s·(μ + σ·ε_z): "
                    "yours is unscaled, so x_t mixes latents of a much larger variance than ε's with the noise")
    if any(close(z, x / SCALE) for x in samples):
        pytest.fail("multiply the latent by the VAE's scaling_factor s before noising, z = s·(μ + σ·ε_z); you divided by s "
                    "(decoding divides, to undo it)")
    # a z that is no sample of q(z|x) at all: the previous test names that


def test_x_t_is_noised_with_eps_at_each_samples_own_t(lend_add_noise_and_loss):
    module, b, mean, std, _, _ = spied_step()
    calls = lend_add_noise_and_loss["add_noise"]
    if not calls:  # eq. 1 written out: the x_t the UNet saw must be the batch's ε at the batch's t
        z = SCALE * (mean + std * b["latent_noise"])
        seen = module.unet.calls[0]["sample"] if module.unet.calls else None
        assert close(seen, add_noise_of_the_tests(z, b["noise"], b["t"], module.alphas_cumprod)), \
            "x_t must be add_noise(z, b[\"noise\"], b[\"t\"], self.alphas_cumprod) (paper eq. 1)"
        return
    assert len(calls) == 1, f"x_t is made once per step; you called add_noise {len(calls)} times"
    call = calls[0]
    if not close(call["noise"], b["noise"]):
        assert not close(call["noise"], b["latent_noise"]), (
            "x_t's noise ε is b[\"noise\"] (the loss's target); b[\"latent_noise\"] is ε_z, the latent sample's own noise: "
            "reusing it ties the noise to the latent")
        pytest.fail("x_t must be noised with ε = b[\"noise\"], the noise drawn for this step (and the loss's target)")
    t = torch.as_tensor(call["t"])
    if not torch.equal(t, b["t"]):
        assert t.numel() == B, f"x_t must be noised at each sample's own t, b[\"t\"] of shape ({B},); you gave add_noise t of shape {tuple(t.shape)}"
        pytest.fail(f"x_t must be noised at the batch's t, b[\"t\"] = {b['t'].tolist()} (drawn in `draw`, one per sample); "
                    f"you gave {t.tolist()}")
    assert close(call["alphas_cumprod"], module.alphas_cumprod), "noise with the schedule's ᾱ: self.alphas_cumprod (SD 1.5's)"


def test_the_unet_sees_x_t_its_t_the_caption_and_the_image_tokens(lend_add_noise_and_loss):
    tokens = torch.randn(B, 4, 8)
    module, b, mean, std, text, _ = spied_step(image_tokens=tokens)
    spy, made = module.unet, lend_add_noise_and_loss["add_noise"]
    assert len(spy.calls) == 1, f"the UNet runs once per step: ε_θ = self.unet(x_t, t, text, …); yours ran {len(spy.calls)} times"
    call = spy.calls[0]
    x_t = made[-1]["x_t"] if made else add_noise_of_the_tests(SCALE * (mean + std * b["latent_noise"]), b["noise"], b["t"], module.alphas_cumprod)
    if not close(call["sample"], x_t):
        z = made[-1]["x0"] if made else SCALE * (mean + std * b["latent_noise"])
        assert not close(call["sample"], z), "the UNet must see the noisy x_t, not the clean latent z: it learns to find the noise in x_t"
        pytest.fail("the UNet's input must be x_t, the latent noised by add_noise")
    t = torch.as_tensor(call["timestep"])
    assert t.numel() == B, f"the UNet must be told each sample's own t, b[\"t\"] of shape ({B},); you gave it t of shape {tuple(t.shape)}"
    assert torch.equal(t.to(b["t"].dtype), b["t"]), (f"the UNet must be told the t that x_t was noised at, b[\"t\"] = {b['t'].tolist()}; "
                                                     f"you gave it {t.tolist()}")
    assert close(call["context"], text), "the UNet's context c is the caption tokens `text` (ε_θ(x_t, c, t))"
    assert call["image_tokens"] is tokens, ("hand the image tokens to the UNet, self.unet(…, image_tokens=image_tokens): the "
                                            "adapter's stage trains through this same step")


def test_the_loss_compares_the_prediction_with_the_noise_that_was_added(lend_add_noise_and_loss):
    module, b, mean, std, _, loss = spied_step()
    prediction = module.unet.prediction
    mse = lambda target: ((prediction - target) ** 2).mean()  # noqa: E731
    assert torch.is_tensor(loss) and loss.ndim == 0, f"return the loss as a 0-d tensor (diffusion_loss's), not {type(loss).__name__}"
    if torch.allclose(loss.float(), mse(b["noise"])):
        return
    z = SCALE * (mean + std * b["latent_noise"])
    x_t = add_noise_of_the_tests(z, b["noise"], b["t"], module.alphas_cumprod)
    wrong = {"the latent z": z, "the unscaled latent": z / SCALE, "x_t": x_t, "ε_z (b[\"latent_noise\"])": b["latent_noise"]}
    for name, target in wrong.items():
        assert not torch.allclose(loss.float(), mse(target)), (
            f"the loss must compare the prediction ε_θ with the noise ε that was added (b[\"noise\"]), not with {name}: "
            "paper eq. 1 trains the UNet to predict ε")
    pytest.fail(f"the loss must be diffusion_loss(ε_θ, b[\"noise\"]) = {mse(b['noise']):.6f}; yours is {float(loss):.6f}")


@pytest.fixture(scope="module")
def unet_pair(tmp_path_factory):
    """diffusers' tiny UNet (every weight random) and minipa's, loaded from its files."""
    from diffusers import UNet2DConditionModel

    from minipa.loading import load_unet

    torch.manual_seed(0)
    reference = randomize(UNet2DConditionModel(**TINY_UNET), seed=3)
    folder = tmp_path_factory.mktemp("training_step_unet")
    reference.save_pretrained(folder)
    return load_unet(folder), reference


def test_the_training_step_equals_diffusers(unet_pair, lend_add_noise_and_loss, lend_timestep_embedding):
    """Loss and every gradient of one step agree with the step assembled from diffusers: DDPMScheduler.add_noise with SD 1.5's
    schedule, diffusers' UNet with the same weights, F.mse_loss."""
    from diffusers import DDPMScheduler

    ours, reference = unet_pair
    data = diffusion_data(latent=(4, 8, 8), width=TINY_UNET["cross_attention_dim"])
    module = UNetTraining(ours, data)
    ours.zero_grad(), reference.zero_grad()
    b = module.batch(step_generator(0, 3), B)
    loss = module(b)
    assert torch.is_tensor(loss) and loss.requires_grad, "the loss must be a tensor that backpropagates to the UNet's weights"
    loss.backward()

    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    mean, std, text, _ = data.rows(b["index"], b["caption"])
    z = (mean + std * b["latent_noise"]) * data.scaling_factor
    eps = reference(scheduler.add_noise(z, b["noise"], b["t"]), b["t"], encoder_hidden_states=text).sample
    expected = torch.nn.functional.mse_loss(eps.float(), b["noise"].float())
    expected.backward()
    assert abs(loss.item() - expected.item()) <= 1e-5 * (1 + expected.item()), (
        f"one training step (t = {b['t'].tolist()}): your loss {loss.item():.6f}, diffusers' step {expected.item():.6f} "
        "(z = s·(μ + σ·ε_z), DDPMScheduler.add_noise, the same UNet, F.mse_loss against ε)")
    grads = {name: p.grad for name, p in ours.named_parameters()}
    pairs = [(name, grads[name], p.grad) for name, p in reference.named_parameters() if p.grad is not None]
    assert all(g is not None for _, g, _ in pairs), "no gradient reached the UNet: is the loss computed under torch.no_grad()?"
    worst = max((float((g - r).abs().max() / (1 + r.abs().max())), name) for name, g, r in pairs)
    assert worst[0] <= 1e-5, f"the loss is diffusers' but its gradients are not: {worst[1]} differs by {worst[0]:.2e} (relative)"
