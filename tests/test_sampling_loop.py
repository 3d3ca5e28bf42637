"""The sampling loop `denoise` (a course assignment): the UNet on [x; x] with [unconditional; conditional] context,
classifier-free guidance (paper eq. 2), one scheduler step per timestep; then the whole loop against diffusers.

The loop calls other assignments' code: `classifier_free_guidance`, the scheduler's step and the UNet. These tests lend
it their own: the guidance formula written here, and a recording UNet and scheduler or diffusers' UNet and
DDIMScheduler; so they grade the loop alone. (The end-to-end tests in test_pipeline.py run the loop with minipa's own pieces.)"""

from types import SimpleNamespace

import pytest
import torch
from conftest import diffusers_pipeline

import minipa.pipeline
from minipa.pipeline import denoise

B, SHAPE = 2, (4, 8, 8)


@pytest.fixture(autouse=True)
def guidance_of_the_test(monkeypatch):
    """The loop's guidance is the test's: paper eq. 2 in the step form (what the guidance assignment computes)."""
    monkeypatch.setattr(minipa.pipeline, "classifier_free_guidance", lambda u, c, w: c if w == 1 else u + w * (c - u))


class RecordingUNet:
    """ε from x and the context (so the unconditional and conditional rows differ); records what it was asked."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, context, image_tokens=None):
        self.calls.append(SimpleNamespace(x=x.clone(), t=int(t), context=context, image_tokens=image_tokens))
        return 0.1 * x + context.mean(dim=(1, 2))[:, None, None, None]


class RecordingScheduler:
    """Three timesteps; a step moves x by the model output and says what it was given."""

    def __init__(self):
        self.timesteps, self.calls = torch.tensor([30, 20, 10]), []

    def step(self, model_output, t, x, generator=None):
        self.calls.append(SimpleNamespace(eps=model_output.clone(), t=int(t), x=x.clone()))
        return SimpleNamespace(prev_sample=x - 0.5 * model_output, pred_original_sample=torch.full_like(x, 99.0))


def run(guidance_scale=7.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, *SHAPE, generator=g)
    rows = 2 * B if guidance_scale != 1 else B
    context = torch.randn(rows, 5, 6, generator=g)
    unet, scheduler = RecordingUNet(), RecordingScheduler()
    out = denoise(unet, scheduler, x, context, guidance_scale=guidance_scale)
    return x, context, unet, scheduler, out


def test_the_loop_asks_the_unet_at_every_timestep():
    _, _, unet, scheduler, _ = run()
    asked = [call.t for call in unet.calls]
    assert asked == scheduler.timesteps.tolist(), \
        f"call the UNet once per timestep t of scheduler.timesteps, with t itself (not the step index i): it was asked at {asked}"
    assert [call.t for call in scheduler.calls] == scheduler.timesteps.tolist(), "step the scheduler once per timestep, with that t"


def test_with_guidance_the_unet_sees_x_twice_with_the_whole_context():
    x, context, unet, _, _ = run()
    first = unet.calls[0]
    assert first.x.shape[0] == 2 * B and torch.equal(first.x[:B], x) and torch.equal(first.x[B:], x), \
        (f"with guidance (w ≠ 1) run the UNet once on the batch [x; x] ({2 * B} rows), the unconditional and the conditional "
         f"prediction together; it got {first.x.shape[0]} rows")
    assert first.context is context, "pass the whole context [unconditional; conditional] to the UNet"


def test_the_scheduler_steps_with_the_guided_eps():
    x, context, unet, scheduler, _ = run(guidance_scale=7.5)
    eps = unet(torch.cat([x, x]), 30, context)
    uncond, cond = eps.chunk(2)
    got = scheduler.calls[0].eps
    if torch.allclose(got, uncond + 7.5 * (cond - uncond), atol=1e-5):
        return
    why = ("the batch is [unconditional; conditional]: eps.chunk(2) gives ε_u first, then ε_c" if torch.allclose(got, cond + 7.5 * (uncond - cond), atol=1e-5)
           else "you stepped with ε_c, not the guided ε̂" if torch.allclose(got, cond, atol=1e-5)
           else "you stepped with ε_u, not the guided ε̂" if torch.allclose(got, uncond, atol=1e-5)
           else "split the UNet's output into (ε_u, ε_c) and combine them with classifier_free_guidance")
    pytest.fail(f"at the first step (t = 30, w = 7.5) the scheduler must get ε̂ = ε_u + w·(ε_c − ε_u) (paper eq. 2): {why}")


def test_without_guidance_the_unet_runs_once_on_the_batch():
    x, context, unet, scheduler, _ = run(guidance_scale=1.0)
    first = unet.calls[0]
    assert first.x.shape[0] == B and torch.equal(first.x, x), \
        f"with w = 1 eq. 2 is the conditional prediction alone: run the UNet on x ({B} rows, context has {B}), no [x; x]"
    assert torch.allclose(scheduler.calls[0].eps, unet(x, 30, context)), "with w = 1 step with the UNet's ε as it is"


def test_each_step_starts_from_the_previous_steps_sample():
    x, _, unet, scheduler, out = run()
    starts = [call.x for call in scheduler.calls]
    assert torch.equal(starts[0], x), "the first step starts from the x you were given (x_T)"
    for k in range(1, len(starts)):
        expected = scheduler.calls[k - 1].x - 0.5 * scheduler.calls[k - 1].eps
        assert torch.allclose(starts[k], expected), \
            (f"step {k + 1} must start from step {k}'s prev_sample (x = scheduler.step(…).prev_sample), "
             "not from its pred_original_sample or the old x")
    assert torch.allclose(out, scheduler.calls[-1].x - 0.5 * scheduler.calls[-1].eps), "return the last step's prev_sample"


@torch.no_grad()
def test_the_loop_equals_diffusers_on_the_tiny_model(tiny_world):
    """diffusers' StableDiffusionPipeline from the same prompt embeddings and latents, 4 DDIM steps at w = 7.5: its final
    latents. Our loop runs with diffusers' own UNet and DDIMScheduler (the UNet's timestep embedding and the scheduler's
    step are other assignments): what differs can only be the loop."""
    theirs = diffusers_pipeline(tiny_world)
    g = torch.Generator().manual_seed(0)
    dim = theirs.unet.config.cross_attention_dim
    cond, uncond = torch.randn(1, 77, dim, generator=g), torch.randn(1, 77, dim, generator=g)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    expected = theirs(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=4, guidance_scale=7.5,
                      height=64, width=64, latents=latents.clone(), output_type="latent").images
    scheduler = type(theirs.scheduler).from_config(theirs.scheduler.config)
    scheduler.set_timesteps(4)
    unet = lambda x, t, context, image_tokens=None: theirs.unet(x, t, encoder_hidden_states=context).sample  # noqa: E731
    ours = denoise(unet, scheduler, latents.clone(), torch.cat([uncond, cond]), guidance_scale=7.5)
    error = float((ours - expected).abs().max())
    assert error < 1e-4, f"after 4 DDIM steps at w = 7.5 the latents differ from diffusers' pipeline by {error:.3g}"
