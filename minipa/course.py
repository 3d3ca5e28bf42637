"""Course assignments: student copies with the solutions cut out, and the test suite as the grader.

Where the learning is, the source marks a *region* with two comment lines,

    # BEGIN ASSIGNMENT <n>
    …the lines a student writes…
    # END ASSIGNMENT <n>

`make_student(out_dir)` copies the repository and replaces each region's lines with
`raise NotImplementedError("Assignment <n>: …")` (signature, docstring and markers stay), then writes
`assignments/README.md`, the course. `grade(dir)` runs each assignment's grading tests (tests that
already exist, against diffusers/transformers) and prints a score table with each failing assignment's
first failure.

Telling student work from the reference: make-student also writes `assignments/course.json`, the
SHA-256 of every region's reference text. `grade` compares each region of the copy with it (a folder
without that record, such as minipa's own repository, is compared with the regions of the minipa that
runs the grader), and when no graded region is blank or differs from the reference it says so, since
full marks there only prove that the reference passes. A fingerprint, not a comparison with minipa's
own files, because a copy is often graded by its own minipa (`pip install -e .` inside it), whose
regions are the copy's.

How tests are split (see also the README written into the student copy):
- a test that runs the code of exactly one region grades that assignment (`Assignment.tests`);
- a test that runs several regions (the end-to-end pipeline) grades none: it is listed in
  `NEEDS_EVERY_ASSIGNMENT` and skipped, with a reason, while any region still raises the stub;
- every other test runs no region, and passes in the student copy as in the full tree.
So putting back the solution of assignment k makes exactly assignment k pass (tests/test_course.py).
A new test that runs a region must join one of the two lists; tests/test_course.py (run by CI) names
any that has not.
"""

from __future__ import annotations

import ast
import hashlib
import json as _json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository this minipa was loaded from


class CourseError(ValueError):
    """Badly marked regions, an unusable output folder, or a grading run that produced no results."""


@dataclass(frozen=True)
class Assignment:
    number: int
    title: str
    file: str  # the file holding the region, relative to the repository root
    where: str  # the function the student completes
    task: str  # what to write, with the paper equation: the NotImplementedError message
    teaches: str
    hints: tuple[str, ...]
    tests: tuple[str, ...]  # pytest node ids; one without "[…]" stands for all its parametrizations
    points: int
    prerequisites: tuple[int, ...]
    minutes: int  # estimated time
    goal: str  # the challenge stub: what the code must do, the paper's section and equation, the shapes — no code hints
    # tests that weigh more (or less) than 1, by the name after "::": an assignment's points are shared among its
    # tests in proportion to their weights (a parametrized entry's weight among its cases), so that the parity
    # tests can outweigh the diagnostic ones and a solution wrong anywhere earns less than half
    weights: dict[str, float] = field(default_factory=dict)

    @property
    def message(self) -> str:
        return f"Assignment {self.number}: {self.task}"

    @property
    def challenge_message(self) -> str:
        tests = ", ".join(dict.fromkeys(t.split("::")[-1].split("[")[0] for t in self.tests))
        return f"Assignment {self.number}: {self.goal} Graded by {tests} (minipa course grade --assignment {self.number})."


# ─── The course, in order. To add one: mark a region in the source, add a row here. ──────────────

ASSIGNMENTS = (
    Assignment(
        1, "The forward process: add_noise", "minipa/ddpm.py", "add_noise",
        task="return x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε (paper eq. 1), with ᾱ_t = alphas_cumprod[t] "
             "reshaped to (B, 1, 1, 1) so that it broadcasts over x0's (B, C, H, W).",
        teaches="how a clean latent becomes a noisy one in a single jump, and what the schedule ᾱ_t means",
        hints=("`alphas_cumprod[t]` indexes a (T,) tensor with the (B,) timesteps; move it to x0's device and dtype first.",
               "`abar.reshape(-1, *([1] * (x0.ndim - 1)))` gives (B, 1, 1, 1) for 4-d x0.",
               "The paper writes α_t for the cumulative product that diffusers calls ᾱ_t (`alphas_cumprod`)."),
        tests=("tests/test_ddpm.py::test_add_noise_uses_each_samples_own_timestep",
               "tests/test_ddpm.py::test_add_noise_scales_x0_and_noise_by_the_square_roots_of_paper_eq1",
               "tests/test_ddpm.py::test_add_noise_and_velocity_keep_the_sample_dtype",
               "tests/test_ddpm.py::test_add_noise_equals_diffusers_and_paper_eq1"),
        points=10, prerequisites=(), minutes=20,
        goal="make x_t, a clean latent noised in one jump to timestep t: x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε (paper §3.1, eq. 1; the paper's α_t is ᾱ_t, alphas_cumprod). Shapes: x0, noise (B, C, H, W); t (B,) integer timesteps; alphas_cumprod (T,) float32 → x_t (B, C, H, W) in x0's dtype.",
        weights={"test_add_noise_scales_x0_and_noise_by_the_square_roots_of_paper_eq1": 2, "test_add_noise_equals_diffusers_and_paper_eq1": 4},
    ),
    Assignment(
        2, "The training loss", "minipa/ddpm.py", "diffusion_loss",
        task="return L = ‖ε − ε_θ(x_t, c, t)‖² (paper eq. 1), the mean over batch and pixels, computed in float32.",
        teaches="what the UNet is trained to predict, and why the loss is a plain mean squared error",
        hints=("`target` is the ε that `add_noise` used; `prediction` is the UNet's ε_θ.",
               "Cast both to float32 first: fp16 training computes the loss in full precision."),
        tests=("tests/test_ddpm.py::test_loss_can_be_backpropagated", "tests/test_ddpm.py::test_loss_is_a_mean_not_a_sum",
               "tests/test_ddpm.py::test_loss_squares_the_error", "tests/test_ddpm.py::test_loss_is_computed_in_float32",
               "tests/test_ddpm.py::test_loss_is_mean_squared_noise_error"),
        points=5, prerequisites=(1,), minutes=10,
        goal="the training loss of paper §3.1, eq. 1, ‖ε − ε_θ(x_t, c, t)‖², averaged over batch and pixels, as a float32 tensor that training can backpropagate. Shapes: prediction (ε_θ) and target (ε) (B, C, H, W), any float dtype → () float32.",
        weights={"test_loss_is_mean_squared_noise_error": 4},
    ),
    Assignment(
        3, "The sinusoidal timestep embedding", "minipa/embeddings.py", "timestep_embedding",
        task="return the (B, dim) float32 code of the timesteps: with half = dim // 2 frequencies ω_i = "
             "max_period^(−i/(half − freq_shift)), i = 0 … half − 1, the angles t·ω (B, half) give [cos, sin] when "
             "flip_sin_to_cos (SD 1.5), else [sin, cos], side by side; an odd dim gets one zero channel at the end.",
        teaches="how the UNet is told which noise level t it is looking at in ε_θ(x_t, c, t): a fixed code of sines and "
                "cosines at geometrically spaced frequencies, the Transformer's positional encoding with t for the position",
        hints=("`torch.exp(-math.log(max_period) * i / (half - freq_shift))` gives every ω_i at once, from 1 down to about 1/max_period.",
               "`timesteps.float()[:, None] * omega[None, :]` is the (B, half) table of angles t·ω.",
               "`torch.cat([cos, sin], dim=-1)`; `F.pad(emb, (0, 1))` adds the zero channel of an odd width."),
        tests=("tests/test_timestep_embedding.py::test_at_t_zero_the_code_is_cos_one_then_sin_zero",
               "tests/test_timestep_embedding.py::test_without_the_flip_the_code_is_sin_then_cos",
               "tests/test_timestep_embedding.py::test_the_frequencies_fall_geometrically_from_one",
               "tests/test_timestep_embedding.py::test_freq_shift_lowers_the_denominator_of_the_exponent",
               "tests/test_timestep_embedding.py::test_each_timestep_of_the_batch_gets_its_own_row",
               "tests/test_timestep_embedding.py::test_an_odd_width_ends_with_one_zero_channel",
               "tests/test_timestep_embedding.py::test_the_code_is_float32_whatever_the_timesteps",
               "tests/test_unet.py::test_timestep_embedding_matches_diffusers",
               "tests/test_unet.py::test_noise_prediction_matches_diffusers",
               "tests/test_unet.py::test_timestep_as_int_0d_tensor_or_batch_tensor"),
        points=10, prerequisites=(), minutes=25,
        goal="the sinusoidal code of the timesteps that tells the UNet the t of ε_θ(x_t, c, t) (paper §3.1), as diffusers' "
             "get_timestep_embedding computes it: cos and sin of t at dim // 2 frequencies falling geometrically from 1 "
             "towards 1/max_period (freq_shift lowers the exponent's denominator), [cos, sin] when flip_sin_to_cos (SD 1.5), "
             "an odd width padded with one zero. Shapes: timesteps (B,) int or float → (B, dim) float32.",
        # the whole UNet reads t through this code: the UNet's parity tests are its end-to-end check
        weights={"test_timestep_embedding_matches_diffusers": 3, "test_noise_prediction_matches_diffusers": 5},
    ),
    Assignment(
        4, "The training step: ε-prediction", "minipa/train/unet.py", "UNetTraining.denoising_loss",
        task="with s = self.data.scaling_factor, z = s·(mean + std·ε_z), a fresh sample of q(z|x) with ε_z = "
             "b[\"latent_noise\"]; x_t = add_noise(z, ε, t, self.alphas_cumprod) with ε = b[\"noise\"] and t = b[\"t\"] "
             "(paper eq. 1); ε_θ = self.unet(x_t, t, text, image_tokens=image_tokens); return diffusion_loss(ε_θ, ε).",
        teaches="what one step of Stable Diffusion's training is: the latent of an image noised to a random t, and the "
                "UNet asked for the noise that was added (paper eq. 1); every sampler undoes exactly this",
        hints=("`b` holds all of the step's randomness (ε_z, t, ε), drawn from one generator so that a run resumes bit for bit: draw nothing yourself.",
               "The VAE's latents are multiplied by scaling_factor s before diffusion (and divided by it before decoding): "
               "s brings them to about unit variance, the scale ε has.",
               "Two noises: `b[\"latent_noise\"]` is ε_z, for the latent's sample; `b[\"noise\"]` is ε, for x_t, and the loss's target.",
               "`add_noise` and `diffusion_loss` are assignments 1 and 2; here you call them."),
        tests=("tests/test_training_step.py::test_the_latent_is_a_fresh_sample_of_the_posterior_not_its_mean",
               "tests/test_training_step.py::test_the_latent_is_scaled_by_the_vaes_scaling_factor_before_noising",
               "tests/test_training_step.py::test_x_t_is_noised_with_eps_at_each_samples_own_t",
               "tests/test_training_step.py::test_the_unet_sees_x_t_its_t_the_caption_and_the_image_tokens",
               "tests/test_training_step.py::test_the_loss_compares_the_prediction_with_the_noise_that_was_added",
               "tests/test_training_step.py::test_the_training_step_equals_diffusers"),
        points=10, prerequisites=(1, 2), minutes=20,
        goal="the loss of one training step of the UNet (paper §3.1, eq. 1): a fresh sample of each image's latent "
             "posterior q(z|x), scaled by the VAE's scaling_factor, noised to the batch's t with the batch's ε, the UNet's "
             "prediction ε_θ(x_t, c, t) (with the image tokens when given), and the ε-loss against the noise that was added; "
             "b's \"latent_noise\", \"noise\" and \"t\" are the step's randomness. Shapes: mean, std (B, 4, h, w); text "
             "(B, 77, D); image_tokens None or (B, N, D); b[\"t\"] (B,) → a () float32 loss that backpropagates to the UNet.",
        # the diagnostic tests each look at one quantity, so that any one mistake passes the other four: diffusers' step outweighs them
        weights={"test_the_training_step_equals_diffusers": 5},
    ),
    Assignment(
        5, "Reading the model's output: x̂0 and ε̂", "minipa/ddpm.py", "x0_and_eps",
        task="return (x̂0, ε̂) from the model's output at x_t = α·x0 + σ·ε (α = √ᾱ_t, σ = √(1−ᾱ_t)): for \"epsilon\", "
             "x̂0 = (x_t − σ·ε̂)/α (paper eq. 1 solved for x0) and ε̂ the output itself; for \"v_prediction\" "
             "(v = α·ε − σ·x0), x̂0 = α·x_t − σ·v̂ and ε̂ = α·v̂ + σ·x_t.",
        teaches="what a noise prediction says about the clean image: every sampler here (DDIM, DDPM, DPM-Solver++) steps "
                "from the x̂0 and ε̂ read off paper eq. 1",
        hints=("`alpha` and `sigma` are already the square roots √ᾱ_t and √(1−ᾱ_t).",
               "For v-prediction write x_t and v in terms of x0 and ε and solve the two equations; α² + σ² = 1 makes it short.",
               "Check yourself: α·x̂0 + σ·ε̂ must give x_t back."),
        tests=("tests/test_x0_and_eps.py::test_eps_prediction_x0_solves_paper_eq1_for_x0",
               "tests/test_x0_and_eps.py::test_eps_prediction_eps_is_the_models_output",
               "tests/test_x0_and_eps.py::test_v_prediction_x0_is_alpha_x_t_minus_sigma_v",
               "tests/test_x0_and_eps.py::test_v_prediction_eps_is_alpha_v_plus_sigma_x_t",
               "tests/test_x0_and_eps.py::test_x0_and_eps_put_back_together_give_x_t",
               "tests/test_x0_and_eps.py::test_predicted_x0_equals_diffusers_for_both_kinds_of_prediction"),
        points=10, prerequisites=(1,), minutes=20,
        goal="the model's output read as (x̂0, ε̂) by inverting paper eq. 1 (§3.1), x_t = α·x0 + σ·ε with α = √ᾱ_t and "
             "σ = √(1−ᾱ_t), for ε-prediction (SD 1.5) and for v-prediction (v = α·ε − σ·x0). Shapes: model_output, x_t "
             "(B, C, H, W); alpha, sigma tensors that broadcast to them; prediction_type \"epsilon\" or \"v_prediction\" → "
             "(x̂0, ε̂), both (B, C, H, W).",
        # the two kinds of prediction are separate branches: only the tests that check both at once can fail either's mistake
        weights={"test_x0_and_eps_put_back_together_give_x_t": 2, "test_predicted_x0_equals_diffusers_for_both_kinds_of_prediction": 4},
    ),
    Assignment(
        6, "The DDPM step", "minipa/ddpm.py", "DDPMScheduler.step",
        task="with prev_t (computed above; −1 after the last step): ᾱ_t, ᾱ_prev (1 before step 0), α_t = ᾱ_t/ᾱ_prev, "
             "β_t = 1 − α_t; x0 from self._x0_and_eps; return StepOutput(x_prev, x0), x_prev = μ̃ + √β̃_t·z for t > 0 and μ̃ "
             "at t = 0, with μ̃ = √ᾱ_prev·β_t/(1−ᾱ_t)·x0 + √α_t·(1−ᾱ_prev)/(1−ᾱ_t)·x_t and β̃_t = (1−ᾱ_prev)/(1−ᾱ_t)·β_t "
             "(DDPM eq. 6–7).",
        teaches="how ancestral sampling walks back a step at a time, drawing x_prev from the Gaussian posterior q(x_prev | x_t, x0)",
        hints=("With n < T inference steps one step spans T/n training steps: α_t = ᾱ_t/ᾱ_prev, not alphas[t].",
               "`self._x0_and_eps(model_output, x_t, ᾱ_t)` reads the model output as (x0, ε).",
               "Draw z with `_noise_like(model_output, generator)` and scale it by the standard deviation √β̃_t "
               "(clamp β̃_t at 1e-20 first, as diffusers does)."),
        tests=("tests/test_ddpm.py::test_ddpm_step_is_the_posterior_mean_of_ddpm_eq7",
               "tests/test_ddpm.py::test_ddpm_step_noise_has_the_posterior_standard_deviation",
               "tests/test_ddpm.py::test_ddpm_last_step_to_t_zero_adds_no_noise",
               "tests/test_ddpm.py::test_ddpm_noise_has_the_sample_dtype",
               "tests/test_ddpm.py::test_ddpm_steps_equal_diffusers"),
        points=10, prerequisites=(1, 5), minutes=30,
        goal="one ancestral DDPM step from x_t to prev_t, the next of the inference timesteps (paper §3.1's sampler; DDPM eq. "
             "6–7): the posterior's mean plus its standard deviation times noise drawn from `generator`, over a stretch of "
             "T/n training steps, with no noise at t = 0. Shapes: model_output, x_t (B, C, H, W); t an int of self.timesteps, "
             "prev_t an int (−1 after the last) → StepOutput(prev_sample, pred_original_sample), both (B, C, H, W).",
        weights={"test_ddpm_step_is_the_posterior_mean_of_ddpm_eq7": 2, "test_ddpm_step_noise_has_the_posterior_standard_deviation": 2,
                 "test_ddpm_last_step_to_t_zero_adds_no_noise": 2, "test_ddpm_steps_equal_diffusers": 5},
    ),
    Assignment(
        7, "The DDIM step", "minipa/ddim.py", "DDIMScheduler.step",
        task="return StepOutput(x_prev, x0) with x_prev = √ᾱ_prev·x0 + √(1−ᾱ_prev−σ²)·ε + σ·z and "
             "σ = η·√((1−ᾱ_prev)/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_prev) (DDIM eq. 12 and 16); x0, ε from self._x0_and_eps.",
        teaches="how a fast sampler jumps from t to an earlier timestep, and SD 1.5's conventions for the last step",
        hints=("`self._prev_timestep(t)` is the timestep one inference step earlier; it is < 0 after the last step.",
               "After the last step SD 1.5 uses ᾱ_0 as ᾱ_prev (`set_alpha_to_one=False`), or 1.0 when that flag is set.",
               "`self._x0_and_eps(model_output, x_t, ᾱ_t)` reads the model output as (x0, ε) for ε- and v-prediction.",
               "Add fresh noise `_noise_like(model_output, generator)` only when η > 0."),
        tests=(
            "tests/test_ddim.py::test_ddim_step_reads_x0_at_abar_t",
            "tests/test_ddim.py::test_ddim_step_goes_back_one_inference_step",
            "tests/test_ddim.py::test_ddim_last_step_uses_the_final_alpha",
            "tests/test_ddim.py::test_ddim_step_with_eta_has_the_direction_and_noise_terms_of_ddim_eq12",
            "tests/test_ddim.py::test_eta_zero_is_deterministic_and_eta_one_uses_generator",
            "tests/test_ddim.py::test_every_step_equals_diffusers",
            "tests/test_ddim.py::test_steps_to_t_zero_and_clipped_samples_equal_diffusers",
            "tests/test_ddim.py::test_full_50_step_loop_equals_diffusers",
        ),
        points=15, prerequisites=(1, 5), minutes=45,
        goal="one DDIM step from x_t to the previous of the n inference timesteps, for any η ≥ 0 (paper §3.1's fast sampler; DDIM eq. 12 and 16), with SD 1.5's convention after the last step (set_alpha_to_one). Shapes: model_output, x_t (B, C, H, W); t an int of self.timesteps → StepOutput(prev_sample, pred_original_sample), both (B, C, H, W).",
        # η > 0 (the σ terms) is half of the step: its test outweighs the others, or σ's mistakes would pass at η = 0
        weights={"test_ddim_step_with_eta_has_the_direction_and_noise_terms_of_ddim_eq12": 7, "test_every_step_equals_diffusers": 4,
                 "test_full_50_step_loop_equals_diffusers": 2},
    ),
    Assignment(
        8, "Classifier-free guidance", "minipa/guidance.py", "classifier_free_guidance",
        task="return ε̂ = ε_u + w·(ε_c − ε_u), which is paper eq. 2 ε̂ = w·ε_c + (1−w)·ε_u; for w = 1 return eps_cond itself.",
        teaches="how one model trained with and without its prompt is pushed towards the prompt at sampling time",
        hints=("Both forms are equal; the step form (ε_u + w·Δ) is what diffusers computes, so it matches to the last bit.",
               "w = 1 must give ε_c exactly (the pipeline then skips the unconditional pass)."),
        tests=(
            "tests/test_guidance.py::test_guidance_steps_from_the_unconditional_towards_the_conditional",
            "tests/test_guidance.py::test_w_one_is_the_conditional_prediction",
            "tests/test_guidance.py::test_w_zero_is_the_unconditional_prediction",
            "tests/test_guidance.py::test_the_old_names_still_work_with_a_deprecation_warning",
            "tests/test_guidance.py::test_both_forms_of_paper_eq2_agree",
        ),
        points=5, prerequisites=(), minutes=15,
        goal="classifier-free guidance, paper §3.1, eq. 2: ε̂ = w·ε_θ(x_t, c, t) + (1−w)·ε_θ(x_t, t); w = 1 returns the conditional prediction exactly. Shapes: eps_uncond, eps_cond (B, C, H, W); w a float ≥ 0 → (B, C, H, W).",
        weights={"test_both_forms_of_paper_eq2_agree": 4},
    ),
    Assignment(
        9, "The sampling loop with guidance", "minipa/pipeline.py", "denoise",
        task="at this step's t: ε = unet(x, or [x; x] with guidance, t, context, image_tokens=tokens); with guidance "
             "split ε into (ε_u, ε_c), the batch being [unconditional; conditional], and combine them with "
             "classifier_free_guidance (paper eq. 2); then x = scheduler.step(ε̂, t, x, generator=generator, "
             "**step_options).prev_sample.",
        teaches="how the pieces meet at sampling time: one UNet pass gives both predictions, guidance combines them, the "
                "sampler takes the step, once per timestep",
        hints=("`use_cfg` says whether to guide; then `context` already holds 2B rows, [unconditional; conditional].",
               "`torch.cat([x, x])` doubles the batch; `eps.chunk(2)` splits the output back in the same order.",
               "The step returns an object: keep `.prev_sample` (x_prev), not `.pred_original_sample` (x̂0)."),
        tests=("tests/test_sampling_loop.py::test_the_loop_asks_the_unet_at_every_timestep",
               "tests/test_sampling_loop.py::test_with_guidance_the_unet_sees_x_twice_with_the_whole_context",
               "tests/test_sampling_loop.py::test_the_scheduler_steps_with_the_guided_eps",
               "tests/test_sampling_loop.py::test_without_guidance_the_unet_runs_once_on_the_batch",
               "tests/test_sampling_loop.py::test_each_step_starts_from_the_previous_steps_sample",
               "tests/test_sampling_loop.py::test_the_loop_equals_diffusers_on_the_tiny_model"),
        points=10, prerequisites=(7, 8), minutes=25,
        goal="one timestep t of the sampling loop (paper §3.1: classifier-free guidance, eq. 2, with a fast sampler): the "
             "unconditional and conditional predictions in one UNet pass when guiding (use_cfg), guided, then the "
             "scheduler's step to x_prev; `tokens` are this step's image tokens. Shapes: x (B, C, h, w); context ([2]B, 77, D); "
             "tokens None or ([2]B, n·N, D) → x for the next timestep, (B, C, h, w).",
        weights={"test_the_scheduler_steps_with_the_guided_eps": 2, "test_the_loop_equals_diffusers_on_the_tiny_model": 5},
    ),
    Assignment(
        10, "Scaled dot-product attention", "minipa/attention.py", "attention (explicit path)",
        task="return Softmax(QKᵀ/√d)·V over the last two axes (q: (B, heads, Lq, d), k, v: (B, heads, Lk, d)), "
             "with scores set to −inf where the bool mask is False.",
        teaches="the one equation inside every transformer here: the UNet, the VAE's middle, both CLIP towers",
        hints=("`k.transpose(-2, -1)` turns (…, Lk, d) into (…, d, Lk), so `q @ kᵀ` is (B, heads, Lq, Lk).",
               "`scores.masked_fill(~mask, float(\"-inf\"))` before the softmax; softmax over the last axis (the keys).",
               "The test compares with torch's fused `scaled_dot_product_attention`: same math, one kernel."),
        tests=(
            "tests/test_attention.py::test_attention_weights_over_the_keys_sum_to_one",
            "tests/test_attention.py::test_attention_divides_the_scores_by_sqrt_d",
            "tests/test_attention.py::test_masked_keys_get_no_weight",
            "tests/test_attention.py::test_explicit_and_sdpa_paths_agree",
            "tests/test_attention.py::test_explicit_and_sdpa_agree_with_causal_mask",
            "tests/test_attention.py::test_explicit_attention_is_the_softmax_equation",
            "tests/test_attention.py::test_the_backend_decides_which_path_runs",
            "tests/test_attention.py::test_attention_module_matches_diffusers[True-False]",
            "tests/test_attention.py::test_attention_module_matches_diffusers[True-True]",
            "tests/test_clip.py::test_text_encoder_causal_mask_explicit_and_sdpa_agree",
            "tests/test_unet.py::test_explicit_attention_agrees_with_sdpa_in_the_whole_unet",
            "tests/test_vae.py::test_explicit_and_sdpa_attention_agree",
            "tests/test_ip_adapter.py::test_resampler_equals_diffusers_plus_projection[explicit]",
        ),
        points=15, prerequisites=(), minutes=30,
        goal="scaled dot-product attention, Softmax(QKᵀ/√d)V (the attention of paper §3.2.2), honouring a bool mask (True = may attend). Shapes: q (B, heads, Lq, d); k, v (B, heads, Lk, d); mask None or bool broadcastable to (B, heads, Lq, Lk) → (B, heads, Lq, d).",
        # the mask is half of the assignment, and only the causal tests use one
        weights={"test_masked_keys_get_no_weight": 3, "test_explicit_and_sdpa_agree_with_causal_mask": 5,
                 "test_text_encoder_causal_mask_explicit_and_sdpa_agree": 4},
    ),
    Assignment(
        11, "The VAE's reparameterised sample", "minipa/vae.py", "DiagonalGaussian.sample",
        task="return z = μ + σ·ε with ε ~ N(0, I) drawn from `generator`, shaped like self.mean (B, C, h, w) on its device "
             "and dtype; μ = self.mean, σ = self.std = exp(½·logvar).",
        teaches="how the VAE's encoder gives a distribution rather than a point, and why z is written μ + σ·ε: so that "
                "gradients reach the encoder through the sample (the reparameterisation trick)",
        hints=("`torch.randn(self.mean.shape, generator=generator, device=…, dtype=…)` draws ε; diffusers draws the same numbers for the same seed.",
               "self.std is σ = exp(½·logvar), already computed; σ² would be the variance.",
               "torch.normal(μ, σ) draws the same numbers but no gradient reaches μ or σ through it."),
        tests=("tests/test_vae.py::test_sample_draws_its_noise_from_the_generator",
               "tests/test_vae.py::test_sample_scales_the_noise_by_the_standard_deviation",
               "tests/test_vae.py::test_each_latent_gets_its_own_noise",
               "tests/test_vae.py::test_gradients_reach_the_mean_and_the_log_variance_through_the_sample",
               "tests/test_vae.py::test_posterior_sample_equals_diffusers"),
        points=5, prerequisites=(), minutes=15,
        goal="a sample of the encoder's posterior q(z|x) = N(μ, diag σ²) that is a differentiable function of μ and logvar (the "
             "reparameterisation trick), its noise drawn from `generator` as diffusers draws it (paper §3.1: SD is latent "
             "diffusion over this autoencoder). Shapes: self.mean, self.std (B, C, h, w); generator a torch.Generator or None → "
             "z (B, C, h, w) in the mean's dtype.",
        # a sampler without the trick (torch.normal) gives the very same numbers: only the gradient test can tell
        weights={"test_gradients_reach_the_mean_and_the_log_variance_through_the_sample": 5},
    ),
    Assignment(
        12, "The BPE merge loop", "minipa/tokenizer.py", "CLIPTokenizer.bpe",
        task="repeatedly merge, everywhere in `symbols`, the adjacent pair with the lowest rank in self.ranks "
             "(merges.txt order), until one symbol is left or no adjacent pair has a rank.",
        teaches="how CLIP's byte-pair encoding turns a word into vocabulary entries, exactly as SD 1.5's tokenizer does",
        hints=("Pairs are `(symbols[k], symbols[k + 1])`; a pair not in `self.ranks` has rank ∞.",
               "Merge every occurrence of the best pair in one left-to-right pass, then look for the next best pair.",
               "Example: 'l o w e r</w>' with ranks (l,o) < (lo,w) < (e,r</w>) ends as ['low', 'er</w>']."),
        tests=(
            "tests/test_tokenizer.py::test_bpe_stops_when_no_pair_has_a_rank",
            "tests/test_tokenizer.py::test_bpe_keeps_merging_until_one_symbol_or_no_ranked_pair_is_left",
            "tests/test_tokenizer.py::test_bpe_merges_the_lowest_ranked_pair_first",
            "tests/test_tokenizer.py::test_ids_and_masks_equal_transformers_on_corpus",
            "tests/test_tokenizer.py::test_unpadded_encode_equals_transformers",
            "tests/test_tokenizer.py::test_call_returns_ids_padded_with_endoftext",
            "tests/test_tokenizer.py::test_long_prompt_is_truncated_with_a_warning_counting_dropped_tokens",
            "tests/test_tokenizer.py::test_model_max_length_in_tokenizer_config_sets_the_padded_length_as_in_transformers",
            "tests/test_tokenizer.py::test_known_prompts_have_clip_s_published_ids",
            "tests/test_data.py::test_tiny_tokenizer_makes_one_token_per_caption_word_and_handles_any_text",
            "tests/test_data.py::test_tiny_tokenizer_round_trips_and_matches_transformers",
            "tests/test_reliability.py::test_fuzz_tokenizer_never_crashes_and_stays_in_vocabulary",
        ),
        points=15, prerequisites=(), minutes=45,
        goal="CLIP's byte-pair encoding of one word, as SD 1.5's tokenizer does it: apply the merges of merges.txt (self.ranks: pair → rank, lower = earlier) to `symbols` until none applies. Shapes: symbols, a list of str (the word's characters, the last ending in '</w>') → symbols, the merged list.",
        weights={"test_ids_and_masks_equal_transformers_on_corpus": 4, "test_unpadded_encode_equals_transformers": 2},
    ),
    Assignment(
        13, "The image projection", "minipa/ip_adapter.py", "ImageProjection.forward",
        task="image embedding (B, E) → self.proj → (B, N·D) → reshape to (B, N, D) → self.norm: "
             "the N = 4 image tokens c_i of paper §3.2.1 (Linear + LayerNorm).",
        teaches="how one global CLIP image embedding becomes a few tokens the UNet's cross-attention can read",
        hints=("Keep any leading axes: `tokens.reshape(*image_embeds.shape[:-1], self.num_tokens, -1)`.",
               "LayerNorm normalises each token's D features, so a zero embedding gives LayerNorm(bias), not zeros."),
        tests=("tests/test_ip_adapter.py::test_image_tokens_are_layer_normalised",
               "tests/test_ip_adapter.py::test_image_token_j_is_the_jth_slice_of_the_projection",
               "tests/test_ip_adapter.py::test_image_projection_keeps_leading_axes",
               "tests/test_ip_adapter.py::test_image_projection_gives_n_tokens_and_concatenates_several_images",
               "tests/test_ip_adapter.py::test_without_image_tokens_an_attached_unet_is_plain_sd_and_a_second_adapter_replaces_the_first",
               "tests/test_ip_adapter.py::test_mlp_projection_equals_diffusers_faceid_projection",  # MLPProjection reuses forward
               "tests/test_ip_adapter.py::test_image_projection_equals_diffusers"),
        points=5, prerequisites=(), minutes=20,
        goal="the image projection of paper §3.2.1: the global CLIP image embedding → N image tokens of the text-feature width, with self.proj (Linear) and self.norm (LayerNorm). Shapes: image_embeds (…, E) → (…, N, D).",
        weights={"test_mlp_projection_equals_diffusers_faceid_projection": 2, "test_image_projection_equals_diffusers": 4},
    ),
    Assignment(
        14, "Decoupled cross-attention", "minipa/ip_adapter.py", "decoupled_attention",
        task="return Softmax(QKᵀ/√d)V + λ·Softmax(QK′ᵀ/√d)V′ (paper §3.2.2, with §3.2.3's inference weight λ = scale) using attention(); "
             "λ = 0 must return the text attention alone, exactly.",
        teaches="the IP-Adapter's one idea: a second attention over image tokens that shares the query",
        hints=("Call `attention(q, k, v)` for the text branch and `attention(q, k_ip, v_ip)` for the image branch.",
               "Skip the image branch when scale == 0, so that λ = 0 is plain SD bit for bit."),
        tests=(
            "tests/test_ip_adapter.py::test_each_branch_has_its_own_softmax",
            "tests/test_ip_adapter.py::test_lambda_scales_only_the_image_branch",
            "tests/test_ip_adapter.py::test_output_grows_with_lambda_by_the_image_attention",
            "tests/test_ip_adapter.py::test_scale_zero_is_exactly_plain_attention",
            "tests/test_ip_adapter.py::test_the_image_branch_is_added_with_weight_lambda",
            "tests/test_ip_adapter.py::test_decoupled_attention_layer_equals_diffusers_ip_processor[sdpa]",
        ),
        points=10, prerequisites=(10, 13), minutes=30,
        goal="decoupled cross-attention, paper §3.2.2: Z_new = Softmax(QKᵀ/√d)V + Softmax(QK′ᵀ/√d)V′, with §3.2.3's inference weight λ = scale on the image branch; λ = 0 is plain attention exactly. Shapes: q (B, heads, Lq, d); k, v (B, heads, 77, d); k_ip, v_ip (B, heads, N, d) → (B, heads, Lq, d).",
        weights={"test_the_image_branch_is_added_with_weight_lambda": 2, "test_decoupled_attention_layer_equals_diffusers_ip_processor[sdpa]": 4},
    ),
    Assignment(
        15, "W′ ← W: initialising the image keys and values", "minipa/ip_adapter.py", "IPAdapter.init_from_text_attention",
        task="for every (i, name, attn) of cross_attention_layers(unet), copy attn.to_k.weight into "
             "self.layers[str(i)].to_k_ip.weight and attn.to_v.weight into self.layers[str(i)].to_v_ip.weight "
             "(Wk′ ← Wk, Wv′ ← Wv, paper §3.2.2), in place: copies, not shared tensors.",
        teaches="why the image branch starts as a copy of the text branch, and why a copy, not a shared tensor, keeps the "
                "base UNet frozen while the adapter trains",
        hints=("`cross_attention_layers(unet)` gives (official number i, module name, attention module); self.layers is keyed by str(i).",
               "`param.copy_(other)` writes into the adapter's own parameter (the method runs under torch.no_grad()); "
               "`module.weight = other` would share the UNet's tensor.",
               "Only K and V have image twins: the query Wq is shared by both branches and is not copied."),
        tests=("tests/test_ip_adapter.py::test_init_copies_each_layers_wk_into_its_wk_prime",
               "tests/test_ip_adapter.py::test_init_copies_each_layers_wv_into_its_wv_prime",
               "tests/test_ip_adapter.py::test_init_copies_the_weights_and_does_not_share_them",
               "tests/test_ip_adapter.py::test_init_from_text_attention_copies_wk_and_wv"),
        points=5, prerequisites=(14,), minutes=15,
        goal="the paper's initialisation of the new weights (§3.2.2: only Wk′, Wv′ are new, initialised from Wk, Wv): every "
             "cross-attention layer's Wk′, Wv′ start equal to that layer's text Wk, Wv, as the adapter's own trainable copies, "
             "the UNet unchanged. Shapes: per layer, to_k_ip.weight and to_v_ip.weight (inner, D) ← to_k.weight and "
             "to_v.weight (inner, D); returns None.",
        weights={"test_init_copies_the_weights_and_does_not_share_them": 2, "test_init_from_text_attention_copies_wk_and_wv": 4},
    ),
    Assignment(
        16, "The IP-Adapter training step: dropping conditions", "minipa/train/ip_adapter.py", "IPAdapterTraining.batch",
        task="with u = b[\"u\"] ~ U[0, 1) and (p_i, p_t, p_b) = self.rates, drop the image where u < p_i, the text where "
             "p_i ≤ u < p_i + p_t, both where p_i + p_t ≤ u < p_i + p_t + p_b; set b[\"caption\"] (self.data.empty where "
             "the text is dropped, else the caption row already in b[\"caption\"]) and b[\"keep_image\"] (0.0 where the "
             "image is dropped, else 1.0); return b.",
        teaches="why the adapter is trained with the image, the text or both left out now and then (5% each in the "
                "paper): classifier-free guidance (assignment 8) needs an unconditional prediction for each at sampling time",
        hints=("One uniform number per sample decides, so the three cases never overlap: compare u with the running sums.",
               "`torch.where(drop_text, self.data.empty, b[\"caption\"])` empties the dropped rows and keeps the others.",
               "A dropped image is a zero embedding later (`forward` multiplies by keep_image), so keep_image is float."),
        tests=("tests/test_train.py::test_keep_image_is_a_float_one_or_zero",
               "tests/test_train.py::test_condition_dropping_follows_the_running_sums_of_the_rates",
               "tests/test_train.py::test_condition_dropping_rates"),
        points=10, prerequisites=(2, 8, 13), minutes=25,
        goal="decide which condition each training sample drops, from one uniform number per sample b[\"u\"]: the image, the text or both, never overlapping, with the rates (p_i, p_t, p_b) = self.rates (the paper's recipe, 5% each). Shapes: set b[\"caption\"] (B,) caption rows (self.data.empty where the text is dropped, else the sample's own, already in b[\"caption\"]) and b[\"keep_image\"] (B,) float (0 where the image is dropped); return b.",
        weights={"test_condition_dropping_rates": 4},
    ),
    Assignment(
        17, "A key-mapping rule: the VAE's levels", "minipa/keymap.py", "renumber_levels",
        task="map encoder.down.{i} ↔ encoder.down_blocks.{i} and decoder.up.{levels−1−i} ↔ decoder.up_blocks.{i} "
             "(LDM numbers the decoder from the bottom), both ways (`to_diffusers`); return other keys unchanged.",
        teaches="how one checkpoint format is read into another by a short rule instead of a 1,000-line dictionary",
        hints=("Split `key` after the level: `level, rest = key[len(head):].split(\".\", 1)`.",
               "The decoder rule is its own inverse: levels − 1 − (levels − 1 − i) = i.",
               "The tests write LDM files with minipa's rule and convert them back with diffusers' own converter."),
        tests=(
            "tests/test_vae.py::test_vae_encoder_levels_keep_their_numbers",
            "tests/test_vae.py::test_vae_decoder_levels_are_numbered_from_the_bottom",
            "tests/test_vae.py::test_renumber_levels_works_both_ways",
            "tests/test_vae.py::test_renumber_levels_leaves_other_keys_alone",
            "tests/test_vae.py::test_ldm_names_agree_with_diffusers_converter",
            "tests/test_vae.py::test_ldm_single_file_equals_diffusers",
            "tests/test_vae.py::test_standalone_ldm_vae_file_without_prefix",
            "tests/test_vae.py::test_full_size_ldm_keys_round_trip_and_match_diffusers_converter",
            "tests/test_vae.py::test_wrong_files_are_clear_errors",
            "tests/test_vae.py::test_text_encoder_file_given_as_vae_is_a_clear_error",
        ),
        points=10, prerequisites=(), minutes=30,
        goal="rename one VAE weight key between LDM's level numbering (encoder.down.{i}, decoder.up.{j}) and diffusers' (encoder.down_blocks.{i}, decoder.up_blocks.{j}), in the direction to_diffusers says, so that diffusers' converter agrees; other keys unchanged. Shapes: key a str; levels the number of resolution levels → a str.",
        # the file tests read back what minipa's own rule wrote: only diffusers' converter can tell a wrong rule
        weights={"test_ldm_names_agree_with_diffusers_converter": 4, "test_full_size_ldm_keys_round_trip_and_match_diffusers_converter": 4},
    ),
)

# Tests that run the code of several regions: graded by no assignment, skipped while any is blank.
NEEDS_EVERY_ASSIGNMENT = (
    "tests/test_ip_adapter.py::test_decoupled_attention_layer_equals_diffusers_ip_processor[explicit]",  # 10 and 14
    "tests/test_ip_adapter.py::test_attach_shares_weights_and_detach_restores_the_unet",  # 13 and 14
    # the end-to-end pipeline: tokenizer, guidance, DDIM/DDPM, IP-Adapter (and LDM keys for single files);
    # the error tests among them reach the tokenizer before what they check
    *(f"tests/test_pipeline.py::test_{name}" for name in (
        "text_only_equals_diffusers", "text_and_image_prompt_equals_diffusers",
        "image_prompt_without_guidance_equals_diffusers", "two_image_prompts_equal_diffusers",
        "per_block_scale_equals_diffusers", "bin_and_safetensors_adapters_give_the_same_image",
        "ddpm_and_seed_equal_diffusers", "scale_zero_is_exactly_plain_sd", "guidance_one_skips_the_unconditional_branch",
        "same_seed_same_image_and_outputs_agree", "bad_arguments_are_clear_errors[kwargs6-ip_scale must be a finite number >= 0]",
        "image_prompt_without_adapter_is_an_error", "cli_writes_png_and_sidecar",
        "single_file_checkpoint_gives_the_same_image_as_the_folder", "unreadable_image_prompt_is_a_clear_error",
        "ip_adapter_plus_equals_diffusers", "ip_adapter_plus_with_two_image_prompts_equals_diffusers",
        "mlp_image_projection_equals_diffusers_faceid_layout", "dpm_solver_with_an_image_prompt_equals_diffusers",
    )),
    "tests/test_precision.py::test_every_component_runs_in_the_dtype_asked_for",  # the fast paths, end to end
    "tests/test_precision.py::test_channels_last_bfloat16_changes_the_layout_not_the_result",  # a whole UNet
    "tests/test_tiny_model.py::test_cli_says_which_words_the_tiny_model_does_not_know",
    *(f"tests/test_image_prompt.py::test_{name}" for name in (  # the image-prompt controls, end to end
        "regions_with_two_image_prompts_equal_diffusers", "negative_image_prompt_equals_diffusers",
        "saved_features_equal_encoding_on_the_fly_and_diffusers_embeds", "step_range_end_equals_diffusers_cutoff_callback",
        "full_step_range_is_no_range_and_an_empty_one_is_plain_sd", "combining_one_image_is_that_image",
        "add_sums_the_features_for_the_base_adapter_and_the_tokens_for_plus", "an_all_ones_mask_is_no_mask",
        "bad_image_prompt_controls_are_clear_errors", "features_for_another_adapter_or_encoder_are_refused",
        "cli_encodes_once_and_generates_from_the_file", "cli_combines_with_weights",
    )),
    *(f"tests/test_reliability.py::test_{name}" for name in (  # generation with odd inputs
        "bad_input", "image_prompt_without_adapter", "odd_images_work", "empty_and_very_long_prompts",
        "nan_guard_names_the_step", "half_precision_on_cpu_works",
    )),
    # training runs the forward process, the loss, image_proj, decoupled attention and condition dropping
    "tests/test_train.py::test_ip_adapter_recipe_trains_only_the_adapter_from_text_weights",
    "tests/test_train.py::test_clip_phase_two_contrasts_each_image_with_every_caption",  # + the BPE loop
    "tests/test_train.py::test_clip_phrasings_fit_every_image_they_describe",  # + the BPE loop
    "tests/test_train.py::test_clip_phase_three_trains_the_image_tower_alone_on_shuffled_copies",  # + the BPE loop
    "tests/test_train.py::test_clip_phase_four_trains_the_text_tower_on_the_phrasings",  # + the BPE loop
    "tests/test_train.py::test_binding_labels_put_each_attribute_on_the_word_it_belongs_to",  # the BPE loop
    "tests/test_train.py::test_word_order_check_tells_words_that_bind_from_words_in_their_places",  # the BPE loop
    *(f"tests/test_train.py::test_{name}" for name in (  # these use the smoke world: every stage trained and exported
        "the_whole_world_trains_and_exports_in_the_real_formats", "exported_world_loads_and_generates_through_load_pipeline",
        "exported_world_matches_diffusers_and_transformers", "train_refuses_to_overwrite_a_run_without_resume",
        "manifest_mismatch_is_a_clear_error", "unet_batches_mix_phrasings_and_empty_captions",
        "adapter_batches_show_the_same_phrasings", "clip_stages_show_only_phrasings_that_name_every_attribute",
        "unet_curriculum_shows_the_caption_form_first",
        "extra_stages_load_and_evaluate", "a_mis_shaped_ablation_file_is_named",
        "steps_option_trains_a_stage_that_many_steps",
    )),
    *(f"tests/test_train_adapter.py::test_{name}" for name in (  # train-adapter: every region of a training step, end to end
        "one_training_step_equals_diffusers_parts", "a_short_run_lowers_the_loss_and_logs_every_step",
        "the_trained_adapter_gives_the_same_image_in_diffusers_and_minipa", "resume_continues_bit_for_bit",
        "two_gloo_processes_equal_one", "bf16_autocast_on_the_cpu_stays_close_to_fp32", "memory_options_leave_the_step_unchanged",
    )),
    "tests/test_benchmark.py",  # whole files: generation end to end
    "tests/test_pipeline_grid.py",
    "tests/test_tiny_model.py",
    "tests/test_notebooks.py::test_notebook_runs_top_to_bottom",  # every notebook uses several regions
)


# ─── Regions ─────────────────────────────────────────────────────────────────────────────────────

_MARKER = re.compile(r"^(?P<indent>[ \t]*)# (?P<kind>BEGIN|END) ASSIGNMENT (?P<n>\d+)[ \t]*$")


def find_regions(text: str, source: str = "<text>") -> dict[int, tuple[int, int, str]]:
    """{n: (line of BEGIN, line of END, indentation)} (0-based line numbers), checking the markers pair up."""
    regions, open_ = {}, None
    for i, line in enumerate(text.splitlines()):
        m = _MARKER.match(line)
        if not m:
            continue
        n, indent = int(m["n"]), m["indent"]
        if m["kind"] == "BEGIN":
            if open_ is not None:
                raise CourseError(f"{source}:{i + 1}: BEGIN ASSIGNMENT {n} inside region {open_[0]} (regions do not nest)")
            if n in regions:
                raise CourseError(f"{source}:{i + 1}: a second region for assignment {n}")
            open_ = (n, i, indent)
        elif open_ is None or open_[0] != n or open_[2] != indent:
            raise CourseError(f"{source}:{i + 1}: END ASSIGNMENT {n} does not close an open BEGIN ASSIGNMENT {n} at the same indentation")
        else:
            regions[n] = (open_[1], i, indent)
            open_ = None
    if open_ is not None:
        raise CourseError(f"{source}:{open_[1] + 1}: BEGIN ASSIGNMENT {open_[0]} has no END")
    return regions


def region_body(text: str, n: int) -> list[str]:
    """The lines between the markers of region n."""
    begin, end, _ = find_regions(text)[n]
    return text.splitlines()[begin + 1 : end]


def replace_region(text: str, n: int, body: list[str]) -> str:
    """`text` with the lines between the markers of region n replaced by `body`."""
    begin, end, _ = find_regions(text)[n]
    lines = text.splitlines(keepends=True)
    return "".join(lines[: begin + 1] + [line.rstrip("\n") + "\n" for line in body] + lines[end:])


def stub(assignment: Assignment, indent: str, challenge: bool = False) -> list[str]:
    """The student's starting point: a `raise NotImplementedError("Assignment n: …")` that says what to write
    (guided), or only the goal, the paper's equation, the shapes and the grading tests (challenge)."""
    message = assignment.challenge_message if challenge else assignment.message
    pieces = textwrap.wrap(message, 96, break_long_words=False, break_on_hyphens=False)
    pieces = [piece + " " for piece in pieces[:-1]] + pieces[-1:]  # the spaces the wrapping took out
    literals = [_json.dumps(piece, ensure_ascii=False) for piece in pieces]  # a JSON string is a Python literal
    return [f"{indent}raise NotImplementedError(", *(f"{indent}    {q}" for q in literals), f"{indent})"]


def is_blank(text: str, n: int) -> bool:
    """Does region n still hold the stub (the student has not started it)?"""
    body = "\n".join(region_body(text, n))
    return "raise NotImplementedError(" in body and f'"Assignment {n}: ' in body


def fingerprint(body: list[str]) -> str:
    """SHA-256 of a region's lines, trailing spaces and blank edges aside: is this the reference solution?"""
    return hashlib.sha256("\n".join(line.rstrip() for line in body).strip("\n").encode()).hexdigest()


def blank_assignments(root: str | Path) -> list[int]:
    """The assignments whose region in the tree at `root` still raises the stub."""
    root = Path(root)
    return [a.number for a in ASSIGNMENTS if (root / a.file).is_file() and is_blank((root / a.file).read_text(encoding="utf-8"), a.number)]


def skip_tests_needing_every_assignment(config, items) -> None:
    """A pytest collection hook (the student copy's conftest.py imports it): skip what needs every region."""
    import pytest

    blank = blank_assignments(config.rootpath)
    if not blank:
        return
    reason = f"needs every assignment; still blank: {', '.join(map(str, blank))} (see assignments/README.md)"
    for item in items:
        if any(_matches(item.nodeid, pattern) for pattern in NEEDS_EVERY_ASSIGNMENT):
            item.add_marker(pytest.mark.skip(reason=reason))


def _matches(nodeid: str, pattern: str) -> bool:
    """`pattern` is a node id; without "[…]" it covers every parametrization, without "::" a whole file."""
    if "::" not in pattern:
        return nodeid.startswith(pattern + "::")
    return nodeid == pattern or ("[" not in pattern and nodeid.startswith(pattern + "["))


# ─── The student copy ────────────────────────────────────────────────────────────────────────────

_NOT_COPIED = {".git", ".venv", "__pycache__", ".pytest_cache", ".ipynb_checkpoints", "out"}
COPY_RECORD = "assignments/course.json"  # written by make-student: what was cut, and each reference solution's fingerprint
STAFF_ONLY = ("tests/test_course.py", "tests/course_mistakes.py")  # tests of this machinery, which expect the solutions: not handed out

STUDENT_CONFTEST = '''"""Written by `minipa course make-student`: skips the end-to-end tests while an assignment is blank."""

from minipa.course import skip_tests_needing_every_assignment as pytest_collection_modifyitems  # noqa: F401
'''


def repository_files(root: str | Path = ROOT) -> list[str]:
    """The files to hand out: what git tracks (as it is in the working tree), else the tree minus caches."""
    root = Path(root).resolve()
    try:
        top = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True)
        if Path(top.stdout.strip()).resolve() != root:
            raise OSError("not the top of a git repository")  # e.g. a student copy inside another checkout
        listed = subprocess.run(["git", "-C", str(root), "ls-files", "-z"], capture_output=True, check=True).stdout
        return sorted(f for f in listed.decode().split("\0") if f and (root / f).is_file())
    except (OSError, subprocess.CalledProcessError):
        files = []
        for folder, dirs, names in os.walk(root):
            dirs[:] = [d for d in dirs if d not in _NOT_COPIED and not d.endswith(".egg-info")]
            files += [str((Path(folder) / n).relative_to(root)) for n in names if not n.endswith(".pyc")]
        return sorted(files)


def check_regions(root: str | Path = ROOT) -> None:
    """Every assignment has exactly one region in its file, and every region in minipa/ has an assignment."""
    root = Path(root)
    numbers = {a.number for a in ASSIGNMENTS}
    for path in sorted((root / "minipa").rglob("*.py")):
        for n in find_regions(path.read_text(encoding="utf-8"), str(path)):
            owner = next((a for a in ASSIGNMENTS if a.number == n), None)
            if owner is None or root / owner.file != path:
                raise CourseError(f"{path}: region {n} is not in the assignment table (minipa/course.py ASSIGNMENTS)")
            numbers.discard(n)
    if numbers:
        raise CourseError(f"no region in the source for assignment(s) {sorted(numbers)}")


def _chosen(only: list[int] | None) -> list[Assignment]:
    chosen = [a for a in ASSIGNMENTS if only is None or a.number in only]
    if only is not None and len(chosen) != len(set(only)):
        raise CourseError(f"no assignment(s) {sorted(set(only) - {a.number for a in ASSIGNMENTS})}; there are 1–{len(ASSIGNMENTS)}")
    return chosen


# ─── Notebook cells that solve an assignment ─────────────────────────────────────────────────────
# A notebook rebuilds each piece by hand, so some of its code cells are an assignment's solution in other
# words. Such a cell names what it solves in its metadata, `"minipa": {"solves": ["DDIMScheduler.step"]}`
# (an `Assignment.where`), and the student copy replaces it by a note and an empty cell.

NOTEBOOK_STORE_COMMAND = ".venv/bin/python notebooks/nbutil.py --store"  # re-executes notebooks, stores their outputs


def cell_source(cell: dict) -> str:
    """A notebook cell's text (a notebook file stores it as one string or as a list of lines)."""
    return cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])


def notebook_code_hash(notebook: dict) -> str:
    """SHA-256 of a notebook's code cells, in order: what its stored outputs were made from (its metadata
    `minipa.code_sha256`, written by the command above and checked by tests/test_notebooks.py)."""
    code = [cell_source(c) for c in notebook["cells"] if c["cell_type"] == "code"]
    return hashlib.sha256(_json.dumps(code, ensure_ascii=False).encode()).hexdigest()


def solution_cells(notebook: dict, source: str = "<notebook>") -> dict[int, list[Assignment]]:
    """{cell index: the assignments it solves}, from each cell's `minipa.solves` metadata."""
    by_where = {a.where: a for a in ASSIGNMENTS}
    found = {}
    for i, cell in enumerate(notebook["cells"]):
        solves = cell.get("metadata", {}).get("minipa", {}).get("solves", [])
        unknown = [w for w in solves if w not in by_where]
        if unknown:
            raise CourseError(f"{source}: cell {i} solves {unknown}, which no assignment's `where` names (minipa/course.py ASSIGNMENTS)")
        if solves:
            found[i] = [by_where[w] for w in solves]
    return found


def blank_solution_cells(notebook: dict, chosen: list[Assignment], source: str = "<notebook>") -> dict:
    """`notebook` with every cell that solves one of `chosen` replaced by a markdown note and an empty code
    cell (its outputs, and its metadata `minipa.blanked`, say which assignment it was)."""
    numbers = {a.number for a in chosen}
    solving = solution_cells(notebook, source)
    cells = []
    for i, cell in enumerate(notebook["cells"]):
        cut = [a for a in solving.get(i, []) if a.number in numbers]
        if not cut:
            cells.append(cell)
            continue
        names = " and ".join(f"assignment {a.number} (`{a.file}`: `{a.where}`)" for a in cut)
        later = _used_later(notebook["cells"], i)
        note = (f"**This cell is your {names}.** In minipa's repository it rebuilds that piece by hand, so the student "
                "copy leaves it to you: write it once the region passes its tests."
                + (f" The cells below use {', '.join(f'`{n}`' for n in later)}, which it defined." if later else "")
                + " The notebook runs top to bottom again once this cell is written.")
        identity = cell.get("id", f"cell-{i}")
        cells.append({"cell_type": "markdown", "id": f"{identity}-note", "metadata": {}, "source": note})
        cells.append({"cell_type": "code", "id": identity, "execution_count": None, "outputs": [],
                      "metadata": {"minipa": {"blanked": [a.number for a in cut]}}, "source": blank_cell_source([a.number for a in cut])})
    return {**notebook, "cells": cells}


def _used_later(cells: list[dict], i: int) -> list[str]:
    """The names code cell i binds that a later code cell reads without binding them itself first."""
    try:
        tree = ast.parse(cell_source(cells[i]))
        later = [ast.parse(cell_source(c)) for c in cells[i + 1 :] if c["cell_type"] == "code"]
    except SyntaxError:  # e.g. IPython magics: no list, the note still stands
        return []
    needed, rebound = set(), set()
    for cell in later:
        read = {n.id for n in ast.walk(cell) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        needed |= read - _bound(cell) - _bound(cell, scopes=True) - rebound
        rebound |= _bound(cell)
    return [name for name in dict.fromkeys(_bound(tree, ordered=True)) if name in needed]


def _bound(tree: ast.AST, scopes: bool = False, ordered: bool = False):
    """Names a cell binds at its top level (functions and classes by name, not their insides); with `scopes`,
    those bound inside its functions, lambdas and comprehensions instead."""
    inner = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
    names, stack = [], [(node, False) for node in ast.iter_child_nodes(tree)]
    while stack:
        node, inside = stack.pop(0)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not inside:
            names.append(node.name)
        if isinstance(node, ast.arg) and inside and scopes:
            names.append(node.arg)
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) and inside == scopes:
            names.append(node.id)
        stack.extend((child, inside or isinstance(node, inner)) for child in ast.iter_child_nodes(node))
    return names if ordered else set(names)


def blank_cell_source(numbers: list[int]) -> str:
    """What a blanked cell holds until the student writes it."""
    return f"# Assignment {', '.join(map(str, numbers))}: your code here (see the note above)\n"


def blanked_cells(notebook: dict) -> dict[int, list[int]]:
    """{cell index: assignment numbers} of the cells a student copy blanked and nobody has written yet."""
    found = {}
    for i, cell in enumerate(notebook["cells"]):
        numbers = cell.get("metadata", {}).get("minipa", {}).get("blanked")
        if numbers and cell_source(cell) == blank_cell_source(numbers):
            found[i] = numbers
    return found


def make_student(out_dir: str | Path, root: str | Path = ROOT, only: list[int] | None = None, challenge: bool = False) -> Path:
    """Write a student copy of the repository at `root` into `out_dir` (new or empty); returns it.

    `only`: cut out just these assignments (e.g. this week's); the others stay solved.
    `challenge`: stubs and README state each goal, its paper equation, the shapes and the grading tests, without the
    guided copy's step-by-step task and hints. Only the stubs differ: the copies are the same outside the regions.
    """
    root, out = Path(root).resolve(), Path(out_dir).resolve()
    chosen = _chosen(only)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CourseError(f"{out_dir}: exists and is not an empty folder; make-student writes a fresh copy")
    check_regions(root)
    files = [f for f in repository_files(root) if f not in STAFF_ONLY and not (root / f).resolve().is_relative_to(out)]
    notebooks = {}  # the notebooks with cells to blank, found (and their metadata checked) before anything is written
    for name in (f for f in files if f.startswith("notebooks/") and f.endswith(".ipynb")):
        notebook = _json.loads((root / name).read_text(encoding="utf-8"))
        if (blanked := blank_solution_cells(notebook, chosen, name)) != notebook:
            notebooks[name] = blanked
    reference = {a.number: fingerprint(region_body((root / a.file).read_text(encoding="utf-8"), a.number)) for a in ASSIGNMENTS}
    for name in files:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, out / name)
    for a in chosen:
        path = out / a.file
        text = path.read_text(encoding="utf-8")
        path.write_text(replace_region(text, a.number, stub(a, find_regions(text)[a.number][2], challenge)), encoding="utf-8")
    for name, notebook in notebooks.items():  # written as nbformat writes a notebook
        (out / name).write_text(_json.dumps(notebook, sort_keys=True, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    conftest = out / "conftest.py"
    conftest.write_text((conftest.read_text(encoding="utf-8") + "\n" if conftest.exists() else "") + STUDENT_CONFTEST)
    (out / "assignments").mkdir(exist_ok=True)
    (out / "assignments" / "README.md").write_text(course_readme(chosen, challenge), encoding="utf-8")
    record = {"made_by": "minipa course make-student", "cut": [a.number for a in chosen], "reference_sha256": reference}
    (out / COPY_RECORD).write_text(_json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return out


# ─── Grading ─────────────────────────────────────────────────────────────────────────────────────


def run_tests(directory: str | Path, nodeids: list[str]) -> dict[str, tuple[str, str]]:
    """Run `nodeids` with this interpreter's pytest inside `directory`: {nodeid: (outcome, message)}.

    outcome is "passed", "failed", "error" or "skipped"; message is the first line of the failure.
    One pytest process for all tests (importing torch and the oracles dominates the time).
    """
    directory = Path(directory).resolve()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(directory), *filter(None, [os.environ.get("PYTHONPATH")])])}
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", f"--junitxml={report}", "-o", "junit_family=xunit1", *nodeids]
        done = subprocess.run(command, cwd=directory, env=env, capture_output=True, text=True)
        if not report.is_file():
            raise CourseError(f"pytest wrote no report in {directory} (exit code {done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
        return read_report(report)


def read_report(report: Path) -> dict[str, tuple[str, str]]:
    """A pytest JUnit XML report (xunit1) → {nodeid: (outcome, message)}, as `run_tests` returns it."""
    results = {}
    for case in ET.parse(report).iter("testcase"):
        file, name = case.get("file"), case.get("name", "")
        classname = case.get("classname", "")
        if not file:  # a collection error: reported against the module
            results[f"<collection of {classname or name}>"] = ("error", _reason(case))
            continue
        middle = classname.split(".")[len(Path(file).with_suffix("").parts):]  # test classes, if any
        nodeid = "::".join([Path(file).as_posix(), *middle, name])
        outcome = next((tag for tag in ("failure", "error", "skipped") if case.find(tag) is not None), "passed")
        outcome = {"failure": "failed"}.get(outcome, outcome)
        results[nodeid] = (outcome, _reason(case) if outcome != "passed" else "")
    return results


def _reason(case) -> str:
    """Why a test did not pass: the stub's `NotImplementedError: Assignment n: …` line if it is anywhere in
    the report (e.g. under pytest.warns' "DID NOT WARN"), else the first line of the message."""
    for tag in ("failure", "error", "skipped"):
        element = case.find(tag)
        if element is not None:
            text = f"{element.get('message') or ''}\n{element.text or ''}"
            stub = re.search(r"NotImplementedError: Assignment \d+: .*", text)
            lines = text.strip().splitlines()
            return stub[0] if stub else lines[0] if lines else tag
    return ""


def score(chosen: list[Assignment], results: dict[str, tuple[str, str]]) -> list[dict]:
    """One row per assignment from the test results: tests passed, points earned, and each test's outcome,
    message and points (its share of the assignment's points, by `Assignment.weights`; a listed test that
    did not run is an error worth nothing)."""
    rows = []
    for a in chosen:
        tests, total = [], sum(a.weights.get(pattern.split("::")[-1], 1) for pattern in a.tests)
        for pattern in a.tests:
            found = [(nodeid, *r) for nodeid, r in results.items() if _matches(nodeid, pattern)]
            file = pattern.split("::")[0]
            found = found or [(pattern, "error", next((m for n, (_, m) in results.items() if file in n), "not run"))]
            share = a.points * a.weights.get(pattern.split("::")[-1], 1) / total / len(found)
            tests += [{"id": nodeid, "outcome": outcome, "message": message, "points": share if outcome == "passed" else 0,
                       "max_points": share} for nodeid, outcome, message in found]
        rows.append({
            "number": a.number, "title": a.title, "passed": sum(t["outcome"] == "passed" for t in tests), "total": len(tests),
            "points": round(sum(t["points"] for t in tests), 1), "max_points": a.points,
            "tests": [{**t, "points": round(t["points"], 2), "max_points": round(t["max_points"], 2)} for t in tests],
        })
    return rows


def check_copy(directory: str | Path) -> Path:
    """`directory`, resolved, if grading can use it; else a CourseError of one line: not a minipa copy, an
    assignment's region gone, or code in minipa/ that does not parse (named by file, line and region)."""
    directory = Path(directory).resolve()
    if not directory.is_dir():
        raise CourseError(f"{directory}: no such folder")
    if not (directory / "minipa" / "__init__.py").is_file() or not (directory / "tests").is_dir():
        raise CourseError(f"{directory} is not a minipa copy (it has no minipa/__init__.py and tests/); "
                          "grade the folder that `minipa course make-student DIR` wrote")
    for a in ASSIGNMENTS:
        path = directory / a.file
        if not path.is_file() or a.number not in find_regions(path.read_text(encoding="utf-8"), str(path)):
            raise CourseError(f"{path}: no region for assignment {a.number} (its # BEGIN/END ASSIGNMENT {a.number} lines are gone)")
    for path in sorted((directory / "minipa").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        try:
            compile(text, str(path), "exec")
        except SyntaxError as err:
            line = err.lineno or 0
            inside = [n for n, (begin, end, _) in find_regions(text, str(path)).items() if begin < line <= end + 1]
            where = f"assignment {inside[0]}'s region" if inside else "this line (outside the assignment regions)"
            raise CourseError(f"{path}:{line}: {where} does not parse: {err.msg}; fix it, then grade again") from None
    return directory


def reference_note(directory: Path, chosen: list[Assignment]) -> str | None:
    """The line `grade` prints when no graded region is blank or differs from the reference solution."""
    record = directory / COPY_RECORD
    if record.is_file():  # a student copy: the fingerprints make-student recorded
        reference = {int(n): h for n, h in _json.loads(record.read_text(encoding="utf-8"))["reference_sha256"].items()}
    else:  # e.g. minipa's own repository: the regions of the minipa running this
        reference = {a.number: fingerprint(region_body((ROOT / a.file).read_text(encoding="utf-8"), a.number)) for a in chosen}
    for a in chosen:
        if fingerprint(region_body((directory / a.file).read_text(encoding="utf-8"), a.number)) != reference.get(a.number):
            return None
    regions = "every assignment region" if len(chosen) == len(ASSIGNMENTS) else \
        f"the region of assignment{'s' * (len(chosen) > 1)} {', '.join(str(a.number) for a in chosen)}"
    return (f"no student work here: {regions} in {directory} holds the reference solution — "
            "make a copy with `minipa course make-student DIR`")


def grade(directory: str | Path = ".", json: bool = False, only: list[int] | None = None, out=None) -> dict:
    """Run the grading tests of every assignment (or those in `only`) in `directory`; print a table or JSON.

    The table is preceded by the folder graded and, where it holds only reference solutions, a line saying so."""
    out = out or sys.stdout
    chosen = _chosen(only)
    directory = check_copy(directory)
    note = reference_note(directory, chosen)
    if not json:
        print(f"grading {directory}", *[note] if note else [], sep="\n", file=out, flush=True)
    nodeids = list(dict.fromkeys(t for a in chosen for t in a.tests))
    rows = score(chosen, run_tests(directory, nodeids))
    summary = {
        "directory": str(directory), "note": note, "assignments": rows,
        "points": round(sum(r["points"] for r in rows), 1), "max_points": sum(r["max_points"] for r in rows),
    }
    if json:
        print(_json.dumps(summary, indent=2, ensure_ascii=False), file=out)
    else:
        print(score_table(summary), file=out)
    return summary


def score_table(summary: dict) -> str:
    width = max(len(r["title"]) for r in summary["assignments"])
    lines = [f"{'#':>2}  {'assignment':<{width}}  {'tests':>7}  {'points':>11}"]
    for r in summary["assignments"]:
        tests, points = f"{r['passed']}/{r['total']}", f"{r['points']:g}/{r['max_points']}"
        lines.append(f"{r['number']:>2}  {r['title']:<{width}}  {tests:>7}  {points:>11}")
        if r["passed"] < r["total"]:
            lines.append(f"      ↳ {first_failure(r)}")
    passed, total = (sum(r[k] for r in summary["assignments"]) for k in ("passed", "total"))
    points = f"{summary['points']:g}/{summary['max_points']}"
    lines.append(f"{'':>2}  {'total':<{width}}  {f'{passed}/{total}':>7}  {points:>11}")
    return "\n".join(lines)


def first_failure(row: dict, width: int = 110) -> str:
    """An assignment's first test that did not pass and why, in one line of at most `width` characters."""
    test = next(t for t in row["tests"] if t["outcome"] != "passed")
    message = " ".join(test["message"].split()) or test["outcome"]
    if message.startswith(f"NotImplementedError: Assignment {row['number']}: "):
        message = "not started (the region still raises its NotImplementedError)"
    line = f"{test['id'].split('::')[-1]}: {message}"
    return line if len(line) <= width else line[: width - 1].rstrip() + "…"


# ─── The course README (assignments/README.md in the student copy) ──────────────────────────────

README_INTRO = """# minipa course: Stable Diffusion and IP-Adapter, one function at a time

This copy of minipa has {count} pieces cut out. Each is a function body that now raises
`NotImplementedError("Assignment n: …")`, between the lines `# BEGIN ASSIGNMENT n` and
`# END ASSIGNMENT n`; the message says what to write. {mode} Everything else is complete, and the tests
that grade you already exist: they compare your code with `diffusers` / `transformers`.

## How to work

1. Pick the next assignment (the order below builds up; prerequisites are ideas, not code: every
   assignment is graded on its own).
2. Read its section here and the docstring above the region, then write the body between the markers.
3. Run its tests until they pass, one failing test at a time:
   `python -m pytest -x <its tests>` (each section below has the command).
4. See where you stand: `python -m minipa course grade` (below: where and with what; `--json` for tools).

Which tests count: a test that runs exactly one assignment's code grades that assignment. The
end-to-end tests (the whole pipeline against diffusers) run all of them together; they grade
nothing and are *skipped* while any region still raises its `NotImplementedError`, with a reason
saying which. Every other test in `tests/` runs none of your code and passes from the start:
`python -m pytest -q` shows only your assignments failing. When every region is filled in, the
end-to-end tests run again and check that the pieces fit: the pipeline then makes the same images as
diffusers.

## Running the grader

- **Where**: in this copy's top folder, the one holding `assignments/`, `minipa/` and `tests/`.
  `python -m minipa course grade` grades the current folder and prints its path first, so check that it
  is your copy; from anywhere else, name it: `python -m minipa course grade path/to/copy`. Each failing
  assignment's row is followed by its first failing test and why.
- **With what**: a Python environment with minipa's test dependencies (PyTorch, pytest, and diffusers
  and transformers, the references the tests compare with). Make one for this copy,
  `python -m venv .venv && .venv/bin/pip install -e '.[test]'`, then run `.venv/bin/python -m minipa course grade`;
  or use the environment of minipa's own repository: `path/to/minipa/.venv/bin/python -m minipa course grade`.
- **Which code**: this copy's own. The grader runs pytest inside the copy with the copy first on the
  import path, so the tests import *this* folder's `minipa/`, whichever minipa the grader came from
  (`python -c "import minipa; print(minipa.__file__)"`, run here, prints a path inside this copy).
- `assignments/course.json` records which assignments this copy cut and a fingerprint of each reference
  solution, so that grading a folder that holds only reference solutions says so.
- Notebook cells that rebuild an assignment by hand are blanked in this copy (a note above each says which);
  the notebook test skips a notebook until you have written its blanked cells.

## The course

| # | assignment | where | prerequisites | time | points |
|---|---|---|---|---|---|
"""


MODES = {
    False: "This is a **guided** copy: each message and each section below gives the equation to compute and hints "
           "on how (`minipa course make-student --challenge` makes a copy without them).",
    True: "This is a **challenge** copy: each message and each section below states only the goal, the paper's "
          "section and equation, the shapes and the tests that grade it; how to compute it is yours to work out "
          "(`minipa course make-student` without `--challenge` makes a guided copy, with hints).",
}


def course_readme(assignments: list[Assignment] | tuple[Assignment, ...] = ASSIGNMENTS, challenge: bool = False) -> str:
    """assignments/README.md: the course, generated from the assignment table, guided or challenge."""
    lines = [README_INTRO.format(count=len(assignments), mode=MODES[challenge])]
    for a in assignments:
        needs = ", ".join(map(str, a.prerequisites)) or "—"
        lines.append(f"| {a.number} | {a.title} | `{a.file}`: `{a.where}` | {needs} | {a.minutes} min | {a.points} |\n")
    total = sum(a.minutes for a in assignments)
    lines.append(f"\nAbout {total // 60} h {total % 60} min in all, {sum(a.points for a in assignments)} points.\n")
    for a in assignments:
        needs = ", ".join(f"{n} ({ASSIGNMENTS[n - 1].title})" for n in a.prerequisites) or "none"
        lines += [
            f"\n## {a.number}. {a.title}\n\n",
            f"*{a.file}*, `{a.where}` · prerequisites: {needs} · about {a.minutes} min · {a.points} points\n\n",
            f"**What it teaches:** {a.teaches}.\n\n",
            *([f"**Goal:** {a.goal}\n\n"] if challenge else
              [f"**What to write:** {a.task}\n\n", "**Hints**\n\n", *(f"- {hint}\n" for hint in a.hints)]),
            "\n**Graded by** (points: each test's share; the first test that fails names what is wrong)\n\n",
            *(f"- `{t}` ({points_of(a, t):g})\n" for t in a.tests),
            f"\n```bash\npython -m pytest -x {' '.join(sorted({t.split('::')[0] for t in a.tests}))} -k \"{' or '.join(_names(a))}\"\n"
            f"minipa course grade --assignment {a.number}\n```\n",
        ]
    if NEEDS_EVERY_ASSIGNMENT:
        lines += ["\n## Tests that need every assignment\n\n", "Skipped until no region is blank:\n\n",
                  *(f"- `{t}`\n" for t in NEEDS_EVERY_ASSIGNMENT)]
    return "".join(lines)


def points_of(a: Assignment, pattern: str) -> float:
    """The points a listed test (all its parametrizations together) is worth."""
    weight = lambda p: a.weights.get(p.split("::")[-1], 1)  # noqa: E731
    return round(a.points * weight(pattern) / sum(map(weight, a.tests)), 1)


def _names(a: Assignment) -> list[str]:
    """The test function names of an assignment's grading tests (for a `-k` expression)."""
    return list(dict.fromkeys(t.split("::")[-1].split("[")[0] for t in a.tests))
