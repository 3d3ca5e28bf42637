"""The course's catalogue of wrong solutions: what learners really write, and what the grader must say to them.

Each `Mistake` is the body of an assignment's region as a learner might write it, with the misconception it
embodies and the words that name it. tests/test_course.py grades every one and asserts that it earns less
than half of its assignment's points and that its first failing message contains those words: how we know
that the grader teaches, and does not only count.

Grading happens in one process (`python tests/course_mistakes.py OUT.json NAME…`): for each body, the
function that holds the region gets the body's code (its `__code__` swapped, so that every reference to
the function sees the change, as a student copy would), the assignment's grading tests run with
`pytest.main`, and the function gets its own code back. The reference solution is graded the same way,
after the mistakes, so the harness is seen to give full marks too (and a mistake that leaked into a
cache would show).
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import inspect
import itertools
import json
import os
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mistake:
    """A wrong solution: the reference region with `edits` ((old, new) text replacements, each old found exactly
    once: a slip of one or two lines, so the catalogue follows the reference as it changes), or a whole `body`."""

    assignment: int
    name: str  # the misconception, in a learner's words
    words: str  # what the first failing message must contain: the words that name the mistake
    edits: tuple[tuple[str, str], ...] = ()
    body: str = ""  # the region as the learner wrote it (the region's indentation is added)

    def code(self) -> str:
        if self.body:
            return self.body
        code = reference_body(self.assignment)
        for old, new in self.edits:
            if code.count(old) != 1:
                raise ValueError(f"mistake {self.name!r}: {old!r} is in the reference region of assignment "
                                 f"{self.assignment} {code.count(old)} times, not once; update the catalogue")
            code = code.replace(old, new)
        return code


M = Mistake
MISTAKES = (
    # 1. add_noise: x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε
    M(1, "ᾱ_t and 1−ᾱ_t without square roots", "the square root is missing",
      edits=(("abar**0.5 * x0 + (1 - abar) ** 0.5 * noise", "abar * x0 + (1 - abar) * noise"),)),
    M(1, "x0 and ε swapped", "x0 and ε are swapped",
      edits=(("abar**0.5 * x0 + (1 - abar) ** 0.5 * noise", "(1 - abar) ** 0.5 * x0 + abar**0.5 * noise"),)),
    M(1, "1 − √ᾱ_t as the noise's coefficient", "1 − √ᾱ_t, not √(1−ᾱ_t)",
      edits=(("(1 - abar) ** 0.5 * noise", "(1 - abar**0.5) * noise"),)),
    M(1, "ᾱ_t not reshaped to (B, 1, 1, 1)", "each sample needs its own ᾱ_t",
      edits=(("abar = abar.reshape(-1, *([1] * (x0.ndim - 1)))", "abar = abar"),)),
    # 2. the loss: the mean of (ε − ε_θ)², in float32
    M(2, "the sum instead of the mean", "the sum over every element", edits=((".mean()", ".sum()"),)),
    M(2, "the absolute error (L1)", "the mean absolute error", edits=((") ** 2).mean()", ").abs()).mean()"),)),
    M(2, "not in float32", "compute the loss in float32", edits=(("target.float() - prediction.float()", "target - prediction"),)),
    M(2, "a Python number (.item())", "no .item()", edits=((".mean()", ".mean().item()"),)),
    # 3. the sinusoidal timestep embedding
    M(3, "[sin, cos] whatever flip_sin_to_cos says", "you wrote [sin, cos]",
      edits=(("[cos, sin] if flip_sin_to_cos else [sin, cos]", "[sin, cos] if flip_sin_to_cos else [cos, sin]"),)),
    M(3, "rising frequencies (no minus sign)", "yours rise", edits=(("torch.exp(-math.log(max_period)", "torch.exp(math.log(max_period)"),)),
    M(3, "−i/(half − 1) in the exponent, freq_shift ignored", "not −i/7", edits=(("i / (half - freq_shift)", "i / (half - 1)"),)),
    M(3, "i/dim instead of i/(dim/2)", "not by dim", edits=(("i / (half - freq_shift)", "i / dim"),)),
    # 4. the UNet's training step: z = s·(μ + σ·ε_z), x_t = add_noise(z, ε, t), L = ‖ε − ε_θ(x_t, c, t)‖²
    M(4, "the loss against the latent (x0-prediction)", "not with the latent z",
      edits=(('return diffusion_loss(eps, b["noise"])', "return diffusion_loss(eps, z)"),)),
    M(4, "the posterior's mean μ for the latent", "not the mean μ",
      edits=(('z = self.data.scaling_factor * (mean + std * b["latent_noise"])', "z = self.data.scaling_factor * mean"),)),
    M(4, "the latent not scaled by scaling_factor", "scaled by the VAE's scaling_factor",
      edits=(('z = self.data.scaling_factor * (mean + std * b["latent_noise"])', 'z = mean + std * b["latent_noise"]'),)),
    M(4, "the latent divided by scaling_factor", "you divided by s",
      edits=(('z = self.data.scaling_factor * (mean + std * b["latent_noise"])', 'z = (mean + std * b["latent_noise"]) / self.data.scaling_factor'),)),
    M(4, "ε_z reused as the noise of x_t", "b[\"latent_noise\"] is ε_z",
      edits=(('x_t = add_noise(z, b["noise"], b["t"], self.alphas_cumprod)', 'x_t = add_noise(z, b["latent_noise"], b["t"], self.alphas_cumprod)'),)),
    M(4, "the UNet shown the clean latent", "not the clean latent z",
      edits=(("eps = self.unet(x_t, b[\"t\"], text", "eps = self.unet(z, b[\"t\"], text"),)),
    # 5. x̂0 and ε̂ from the model's output (paper eq. 1 inverted)
    M(5, "σ forgotten: (x_t − ε)/α", "subtract σ·ε",
      edits=(("return (x_t - sigma * model_output) / alpha, model_output", "return (x_t - model_output) / alpha, model_output"),)),
    M(5, "multiplied by α instead of divided", "divide by √ᾱ_t, do not multiply",
      edits=(("(x_t - sigma * model_output) / alpha", "(x_t - sigma * model_output) * alpha"),)),
    M(5, "v read as ε", "the model's output is v, not ε", body="return (x_t - sigma * model_output) / alpha, model_output"),
    M(5, "the sign of σ·v", "the sign of σ·v", edits=(("return alpha * x_t - sigma * model_output,", "return alpha * x_t + sigma * model_output,"),)),
    # 6. the DDPM step (DDPM eq. 6–7)
    M(6, "α_t, β_t of one training step (alphas[t], betas[t])", "alphas[t] of one training step",
      edits=(("alpha_t = abar_t / abar_prev", "alpha_t = self.alphas[t]"),)),
    M(6, "z scaled by the variance β̃_t", "scaled z by the variance", edits=(("mean + variance**0.5 * _noise_like", "mean + variance * _noise_like"),)),
    M(6, "β_t for the posterior variance (\"fixed_large\")", "fixed_large",
      edits=(("variance = ((1 - abar_prev) / (1 - abar_t) * beta_t).clamp(min=1e-20)", "variance = beta_t"),)),
    M(6, "the coefficients of x̂0 and x_t swapped", "check the coefficients",
      edits=(("/ (1 - abar_t) * x0 + alpha_t**0.5 * (1 - abar_prev) / (1 - abar_t) * x_t", "/ (1 - abar_t) * x_t + alpha_t**0.5 * (1 - abar_prev) / (1 - abar_t) * x0"),)),
    # 7. the DDIM step (DDIM eq. 12 and 16)
    M(7, "σ² missing in the direction term", "σ² is missing", edits=(("(1 - abar_prev - sigma**2) ** 0.5", "(1 - abar_prev) ** 0.5"),)),
    M(7, "α_t (one step) for ᾱ_t", "not the cumulative product",
      edits=(("abar_t = self.alphas_cumprod[t]", "abar_t = self.alphas[t]"), ("self.alphas_cumprod[prev_t] if", "self.alphas[prev_t] if"))),
    M(7, "t − 1 as the previous timestep", "one training step back", edits=(("prev_t = self._prev_timestep(t)", "prev_t = t - 1"),)),
    M(7, "alphas_cumprod[prev_t] after the last step (a negative index)", "a negative index",
      edits=(("self.alphas_cumprod[prev_t] if prev_t >= 0 else final", "self.alphas_cumprod[prev_t]"),)),
    M(7, "σ without η", "η is missing", edits=(("sigma = eta * variance**0.5", "sigma = variance**0.5"),)),
    # 8. classifier-free guidance (paper eq. 2)
    M(8, "w on the unconditional prediction", "ε_u and ε_c are swapped",
      edits=(("eps_uncond + w * (eps_cond - eps_uncond)", "eps_cond + w * (eps_uncond - eps_cond)"),)),
    M(8, "the step taken from ε_c", "a step from ε_c", edits=(("eps_uncond + w * (eps_cond - eps_uncond)", "eps_cond + w * (eps_cond - eps_uncond)"),)),
    M(8, "only the step w·(ε_c − ε_u)", "ε_u is missing", edits=(("eps_uncond + w * (eps_cond - eps_uncond)", "w * (eps_cond - eps_uncond)"),)),
    M(8, "ε_u − w·(ε_c − ε_u)", "the sign of (ε_c − ε_u) is flipped", edits=(("eps_uncond + w *", "eps_uncond - w *"),)),
    # 9. the sampling loop: [x; x], [ε_u; ε_c], guidance, the step
    M(9, "the halves read as [cond; uncond]", "gives ε_u first", edits=(("eps_uncond, eps_cond = eps.chunk(2)", "eps_cond, eps_uncond = eps.chunk(2)"),)),
    M(9, "the step index i for the timestep t", "not the step index i",
      edits=(("eps = unet(torch.cat([x, x]) if use_cfg else x, t,", "eps = unet(torch.cat([x, x]) if use_cfg else x, i,"),)),
    M(9, "stepped with ε_c, guidance never applied", "you stepped with ε_c",
      edits=(("eps = classifier_free_guidance(eps_uncond, eps_cond, guidance_scale)", "eps = eps_cond"),)),
    M(9, "pred_original_sample (x̂0) as the next x", "not from its pred_original_sample", edits=((".prev_sample", ".pred_original_sample"),)),
    # 10. Softmax(QKᵀ/√d)V with a −inf mask
    M(10, "no 1/√d", "the 1/√d is missing", edits=((" / math.sqrt(d)", ""),)),
    M(10, "divided by d instead of √d", "divided by d, not by √d", edits=(("math.sqrt(d)", "d"),)),
    M(10, "softmax over the queries", "not over the queries", edits=(("softmax(dim=-1)", "softmax(dim=-2)"),)),
    M(10, "masked scores set to 0, not −inf", "fill with −inf, not 0", edits=(('float("-inf")', "0.0"),)),
    M(10, "the mask inverted (True = hidden)", "the mask is inverted", edits=(("masked_fill(~mask,", "masked_fill(mask,"),)),
    M(10, "the mask applied to the weights after the softmax", "not the weights after it", body="""
        weights = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(dim=-1)
        if mask is not None:
            weights = weights * mask
        return weights @ v
    """),
    # 11. the VAE's reparameterised sample z = μ + σ·ε
    M(11, "torch.normal(μ, σ): the same numbers, no gradient", "the reparameterisation trick",
      body="return torch.normal(self.mean, self.std, generator=generator)"),
    M(11, "the variance σ² for σ", "not by the variance", edits=(("self.mean + self.std * noise", "self.mean + self.std**2 * noise"),)),
    M(11, "randn_like: the generator ignored", "draw ε from the generator", body="return self.mean + self.std * torch.randn_like(self.mean)"),
    M(11, "one ε for the whole batch", "each sample of the batch needs its own ε",
      edits=(("torch.randn(self.mean.shape, generator", "torch.randn(self.mean.shape[1:], generator"),)),
    # 12. the BPE merge loop
    M(12, "the highest rank merged first", "you merged the highest rank first",
      edits=(('best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))',
              "best = max((p for p in pairs if p in self.ranks), key=self.ranks.get, default=pairs[0])"),)),
    M(12, "the leftmost ranked pair merged first", "you merged the leftmost pair that has a rank",
      edits=(('best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))', "best = next((p for p in pairs if p in self.ranks), pairs[0])"),)),
    M(12, "pairs without a rank merged too", "pairs that have no rank were merged", edits=(("if best not in self.ranks:\n        break", "pass"),)),
    M(12, "one merge, no loop", "look for the best pair again", edits=(("while len(symbols) > 1:", "for _ in range(min(1, len(symbols) - 1)):"),)),
    # 13. the image projection: Linear → (B, N, D) → LayerNorm
    M(13, "no LayerNorm", "must go through LayerNorm", edits=(("return self.norm(tokens)", "return tokens"),)),
    M(13, "reshaped to (B, D, N) and transposed", "not (B, D, N) and a transpose",
      edits=(("reshape(*image_embeds.shape[:-1], self.num_tokens, -1)", "reshape(*image_embeds.shape[:-1], -1, self.num_tokens).transpose(-1, -2)"),)),
    M(13, "only the batch axis kept", "keep every leading axis",
      edits=(("reshape(*image_embeds.shape[:-1], self.num_tokens, -1)", "reshape(image_embeds.shape[0], self.num_tokens, -1)"),)),
    # 14. decoupled cross-attention: text + λ·image, two softmaxes
    M(14, "one softmax over text and image tokens concatenated", "one softmax over [text; image]", body="""
        if scale == 0:
            return attention(q, k, v)
        return attention(q, torch.cat([k, k_ip], dim=2), torch.cat([v, scale * v_ip], dim=2))
    """),
    M(14, "λ on both branches", "λ multiplies the text branch too", body="return scale * (attention(q, k, v) + attention(q, k_ip, v_ip))"),
    M(14, "(1−λ)·text + λ·image", "the text branch must keep weight 1", body="return (1 - scale) * attention(q, k, v) + scale * attention(q, k_ip, v_ip)"),
    M(14, "the image branch with the text keys", "used the text keys K instead of K′", edits=(("attention(q, k_ip, v_ip)", "attention(q, k, v_ip)"),)),
    # 15. W′ ← W: the image keys and values start as copies of the text ones
    M(15, "Wk′ ← Wv and Wv′ ← Wk", "K and V are swapped",
      edits=(("to_k_ip.weight.copy_(attn.to_k.weight)", "to_k_ip.weight.copy_(attn.to_v.weight)"),
             ("to_v_ip.weight.copy_(attn.to_v.weight)", "to_v_ip.weight.copy_(attn.to_k.weight)"))),
    M(15, "the UNet's tensors shared, not copied", "do not share the UNet's tensors", body="""
        for i, _, attn in cross_attention_layers(unet):
            self.layers[str(i)].to_k_ip.weight = attn.to_k.weight
            self.layers[str(i)].to_v_ip.weight = attn.to_v.weight
    """),
    M(15, "copied the wrong way (W ← W′)", "copy from the UNet's text attention into the adapter",
      edits=(("self.layers[str(i)].to_k_ip.weight.copy_(attn.to_k.weight)", "attn.to_k.weight.copy_(self.layers[str(i)].to_k_ip.weight)"),
             ("self.layers[str(i)].to_v_ip.weight.copy_(attn.to_v.weight)", "attn.to_v.weight.copy_(self.layers[str(i)].to_v_ip.weight)"))),
    M(15, "only Wk′ initialised", "Wv′ must start as a copy",
      edits=(("\n    self.layers[str(i)].to_v_ip.weight.copy_(attn.to_v.weight)  # Wv′ ← Wv", ""),)),
    # 16. dropping the image, the text or both (5% each in the paper)
    M(16, "three independent thresholds (the cases overlap)", "the cases overlap",
      edits=(("drop_image = (u < image_drop) | ((u >= image_drop + text_drop) & (u < image_drop + text_drop + both_drop))",
              "drop_image = (u < image_drop) | (u < both_drop)"),
             ("drop_text = (u >= image_drop) & (u < image_drop + text_drop + both_drop)", "drop_text = (u < text_drop) | (u < both_drop)"))),
    M(16, "no case that drops both", "both dropped, is missing",
      edits=(("(u < image_drop) | ((u >= image_drop + text_drop) & (u < image_drop + text_drop + both_drop))", "u < image_drop"),
             ("(u < image_drop + text_drop + both_drop)", "(u < image_drop + text_drop)"))),
    M(16, "keep_image 1.0 where the image is dropped", "keep_image is inverted", edits=(("(~drop_image).float()", "drop_image.float()"),)),
    M(16, "the both-dropped band keeps the text", "the third case drops the text too",
      edits=(("drop_text = (u >= image_drop) & (u < image_drop + text_drop + both_drop)", "drop_text = (u >= image_drop) & (u < image_drop + text_drop)"),)),
    # 17. the VAE's levels in the LDM key map
    M(17, "the decoder's levels not reversed", "the decoder's levels are not reversed",
      edits=(('int(level) if side == "encoder" else levels - 1 - int(level)', "int(level)"),)),
    M(17, "the encoder reversed too", "the encoder keeps its level numbers",
      edits=(('int(level) if side == "encoder" else levels - 1 - int(level)', "levels - 1 - int(level)"),)),
    M(17, "levels − i for the decoder", "levels − i is one too many", edits=(("levels - 1 - int(level)", "levels - int(level)"),)),
    M(17, "one direction only (to_diffusers ignored)", "must work both ways",
      edits=(("src, dst = (ldm, ours) if to_diffusers else (ours, ldm)", "src, dst = ldm, ours"),)),
)


# ─── Grading a body in this process ──────────────────────────────────────────────────────────────


def assignment(number: int):
    from minipa.course import ASSIGNMENTS

    return ASSIGNMENTS[number - 1]


def reference_body(number: int) -> str:
    from minipa.course import region_body

    a = assignment(number)
    return textwrap.dedent("\n".join(region_body((ROOT / a.file).read_text(encoding="utf-8"), number)))


def _qualname(tree: ast.AST, line: int, prefix: str = "") -> str | None:
    """The qualified name of the innermost function whose body holds `line` (1-based)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.lineno <= line <= node.end_lineno:
            name = f"{prefix}{node.name}"
            inner = _qualname(node, line, f"{name}.<locals>." if isinstance(node, ast.FunctionDef) else f"{name}.")
            return inner or (name if not isinstance(node, ast.ClassDef) else None)
    return None


def _code(code, qualname: str):
    """The code object named `qualname` among the constants of `code`, at any depth."""
    for const in code.co_consts:
        if inspect.iscode(const):
            if const.co_qualname == qualname:
                return const
            found = _code(const, qualname)
            if found is not None:
                return found
    return None


@contextlib.contextmanager
def solved_with(number: int, body: str):
    """Inside the block, the function that holds region `number` runs `body` instead of its own code."""
    from minipa.course import find_regions, replace_region

    a = assignment(number)
    path = ROOT / a.file
    text = path.read_text(encoding="utf-8")
    begin, _, indent = find_regions(text)[number]
    qualname = _qualname(ast.parse(text), begin + 1)
    lines = [indent + line if line.strip() else "" for line in textwrap.dedent(body).strip("\n").splitlines()]
    code = _code(compile(replace_region(text, number, lines), str(path), "exec"), qualname)
    function = importlib.import_module(a.file.removesuffix(".py").replace("/", "."))
    for part in qualname.split("."):
        function = getattr(function, part)
    function = inspect.unwrap(function)
    own, function.__code__ = function.__code__, code
    try:
        yield
    finally:
        function.__code__ = own


def grade_bodies(bodies: dict[int, str]) -> list[dict]:
    """Grade several assignments in one pytest run, each with its body in its region: their score rows, each with
    its first failing message (in the order the assignment lists its tests). One run serves them all because an
    assignment's grading tests run its region alone (what tests/test_course.py checks on the student copy)."""
    import pytest

    from minipa.course import read_report, score

    chosen = [assignment(n) for n in sorted(bodies)]
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as swaps:
        for n, body in bodies.items():
            swaps.enter_context(solved_with(n, body))
        report = Path(tmp) / "report.xml"
        pytest.main(["-p", "no:cacheprovider", "-q", "--no-header", f"--junitxml={report}", "-o", "junit_family=xunit1",
                     *dict.fromkeys(t for a in chosen for t in a.tests)])
        rows = score(chosen, read_report(report))
    for row in rows:
        row["first_message"] = next((t["message"] for t in row["tests"] if t["outcome"] != "passed"), "")
    return rows


def main(out: str, names: list[str]) -> None:
    """Grade the named mistakes (all if none), in rounds of one mistake per assignment, then their assignments'
    reference solutions in one more round; write one JSON row per mistake and per reference to `out`."""
    chosen = [m for m in MISTAKES if not names or m.name in names]
    numbers = sorted({m.assignment for m in chosen})
    rounds = [[m for m in chosen if m.assignment == n] for n in numbers]
    rows = []
    with contextlib.redirect_stdout(sys.stderr):  # pytest's progress lines
        for round_ in itertools.zip_longest(*rounds):
            mistakes = {m.assignment: m for m in round_ if m is not None}
            graded = grade_bodies({n: m.code() for n, m in mistakes.items()})
            rows += [{"name": mistakes[row["number"]].name, **row} for row in graded]
        rows += [{"name": "reference", **row} for row in grade_bodies({n: reference_body(n) for n in numbers})]
    Path(out).write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")


if __name__ == "__main__":
    os.chdir(ROOT)
    main(sys.argv[1], sys.argv[2:])
