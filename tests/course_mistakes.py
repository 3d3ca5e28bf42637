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
    assignment: int
    name: str  # the misconception, in a learner's words
    words: str  # what the first failing message must contain: the words that name the mistake
    body: str  # the region as the learner wrote it (the region's indentation is added)


MISTAKES = (
    # 1. add_noise: x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε
    Mistake(1, "ᾱ_t and 1−ᾱ_t without square roots", "the square root is missing", """
        abar = alphas_cumprod.to(device=x0.device, dtype=x0.dtype)[t.to(x0.device)].reshape(-1, 1, 1, 1)
        return abar * x0 + (1 - abar) * noise
    """),
    Mistake(1, "x0 and ε swapped", "x0 and ε are swapped", """
        abar = alphas_cumprod.to(device=x0.device, dtype=x0.dtype)[t.to(x0.device)].reshape(-1, 1, 1, 1)
        return (1 - abar) ** 0.5 * x0 + abar**0.5 * noise
    """),
    Mistake(1, "1 − √ᾱ_t as the noise's coefficient", "1 − √ᾱ_t, not √(1−ᾱ_t)", """
        abar = alphas_cumprod.to(device=x0.device, dtype=x0.dtype)[t.to(x0.device)].reshape(-1, 1, 1, 1)
        return abar**0.5 * x0 + (1 - abar**0.5) * noise
    """),
    Mistake(1, "ᾱ_t not reshaped to (B, 1, 1, 1)", "each sample needs its own ᾱ_t", """
        abar = alphas_cumprod.to(device=x0.device, dtype=x0.dtype)[t.to(x0.device)]
        return abar**0.5 * x0 + (1 - abar) ** 0.5 * noise
    """),
    # 2. the loss: mean of (ε − ε_θ)² in float32
    Mistake(2, "the sum instead of the mean", "the sum over every element", """
        return ((target.float() - prediction.float()) ** 2).sum()
    """),
    Mistake(2, "the absolute error (L1)", "the mean absolute error", """
        return (target.float() - prediction.float()).abs().mean()
    """),
    Mistake(2, "not in float32", "compute the loss in float32", """
        return ((target - prediction) ** 2).mean()
    """),
    Mistake(2, "a Python number (.item())", "no .item()", """
        return ((target.float() - prediction.float()) ** 2).mean().item()
    """),
    # 3. the DDIM step (DDIM eq. 12 and 16)
    Mistake(3, "σ² missing in the direction term", "σ² is missing", """
        prev_t = self._prev_timestep(t)
        abar_t = self.alphas_cumprod[t]
        final = torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]
        abar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else final
        x0, eps = self._x0_and_eps(model_output, x_t, abar_t)
        sigma = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)) ** 0.5
        x_prev = abar_prev**0.5 * x0 + (1 - abar_prev) ** 0.5 * eps
        if eta > 0:
            x_prev = x_prev + sigma * _noise_like(model_output, generator)
        return StepOutput(x_prev, x0)
    """),
    Mistake(3, "α_t (one step) for ᾱ_t", "not the cumulative product", """
        prev_t = self._prev_timestep(t)
        abar_t = self.alphas[t]
        abar_prev = self.alphas[prev_t] if prev_t >= 0 else torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas[0]
        x0, eps = self._x0_and_eps(model_output, x_t, abar_t)
        sigma = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)) ** 0.5
        x_prev = abar_prev**0.5 * x0 + (1 - abar_prev - sigma**2) ** 0.5 * eps
        if eta > 0:
            x_prev = x_prev + sigma * _noise_like(model_output, generator)
        return StepOutput(x_prev, x0)
    """),
    Mistake(3, "t − 1 as the previous timestep", "one training step back", """
        prev_t = t - 1
        abar_t = self.alphas_cumprod[t]
        final = torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]
        abar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else final
        x0, eps = self._x0_and_eps(model_output, x_t, abar_t)
        sigma = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)) ** 0.5
        x_prev = abar_prev**0.5 * x0 + (1 - abar_prev - sigma**2) ** 0.5 * eps
        if eta > 0:
            x_prev = x_prev + sigma * _noise_like(model_output, generator)
        return StepOutput(x_prev, x0)
    """),
    Mistake(3, "alphas_cumprod[prev_t] after the last step (a negative index)", "a negative index", """
        prev_t = self._prev_timestep(t)
        abar_t, abar_prev = self.alphas_cumprod[t], self.alphas_cumprod[prev_t]
        x0, eps = self._x0_and_eps(model_output, x_t, abar_t)
        sigma = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)) ** 0.5
        x_prev = abar_prev**0.5 * x0 + (1 - abar_prev - sigma**2) ** 0.5 * eps
        if eta > 0:
            x_prev = x_prev + sigma * _noise_like(model_output, generator)
        return StepOutput(x_prev, x0)
    """),
    Mistake(3, "σ without η (noise at η = 0)", "η is missing", """
        prev_t = self._prev_timestep(t)
        abar_t = self.alphas_cumprod[t]
        final = torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]
        abar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else final
        x0, eps = self._x0_and_eps(model_output, x_t, abar_t)
        sigma = ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)) ** 0.5
        x_prev = abar_prev**0.5 * x0 + (1 - abar_prev - sigma**2) ** 0.5 * eps
        return StepOutput(x_prev + sigma * _noise_like(model_output, generator), x0)
    """),
    # 4. classifier-free guidance (paper eq. 2)
    Mistake(4, "w on the unconditional prediction", "ε_u and ε_c are swapped", """
        if w == 1:
            return eps_cond
        return eps_cond + w * (eps_uncond - eps_cond)
    """),
    Mistake(4, "the step taken from ε_c", "a step from ε_c", """
        if w == 1:
            return eps_cond
        return eps_cond + w * (eps_cond - eps_uncond)
    """),
    Mistake(4, "only the step w·(ε_c − ε_u)", "ε_u is missing", """
        return w * (eps_cond - eps_uncond)
    """),
    Mistake(4, "ε_u − w·(ε_c − ε_u)", "the sign of (ε_c − ε_u) is flipped", """
        if w == 1:
            return eps_cond
        return eps_uncond - w * (eps_cond - eps_uncond)
    """),
    # 5. Softmax(QKᵀ/√d)V with a −inf mask
    Mistake(5, "no 1/√d", "the 1/√d is missing", """
        scores = q @ k.transpose(-2, -1)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return scores.softmax(dim=-1) @ v
    """),
    Mistake(5, "divided by d instead of √d", "divided by d, not by √d", """
        scores = q @ k.transpose(-2, -1) / q.shape[-1]
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return scores.softmax(dim=-1) @ v
    """),
    Mistake(5, "softmax over the queries", "not over the queries", """
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return scores.softmax(dim=-2) @ v
    """),
    Mistake(5, "masked scores set to 0, not −inf", "fill with −inf, not 0", """
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        if mask is not None:
            scores = scores.masked_fill(~mask, 0.0)
        return scores.softmax(dim=-1) @ v
    """),
    Mistake(5, "the mask inverted (True = hidden)", "the mask is inverted", """
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        if mask is not None:
            scores = scores.masked_fill(mask, float("-inf"))
        return scores.softmax(dim=-1) @ v
    """),
    Mistake(5, "the mask applied to the weights after the softmax", "not the weights after it", """
        weights = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(dim=-1)
        if mask is not None:
            weights = weights * mask
        return weights @ v
    """),
    # 6. the BPE merge loop
    Mistake(6, "the highest rank merged first", "you merged the highest rank first", """
        while len(symbols) > 1:
            ranked = [p for p in zip(symbols, symbols[1:]) if p in self.ranks]
            if not ranked:
                break
            best = max(ranked, key=self.ranks.get)
            merged, k = [], 0
            while k < len(symbols):
                if k + 1 < len(symbols) and (symbols[k], symbols[k + 1]) == best:
                    merged.append(symbols[k] + symbols[k + 1])
                    k += 2
                else:
                    merged.append(symbols[k])
                    k += 1
            symbols = merged
    """),
    Mistake(6, "the leftmost ranked pair merged first", "you merged the leftmost pair that has a rank", """
        while len(symbols) > 1:
            ranked = [p for p in zip(symbols, symbols[1:]) if p in self.ranks]
            if not ranked:
                break
            best = ranked[0]
            merged, k = [], 0
            while k < len(symbols):
                if k + 1 < len(symbols) and (symbols[k], symbols[k + 1]) == best:
                    merged.append(symbols[k] + symbols[k + 1])
                    k += 2
                else:
                    merged.append(symbols[k])
                    k += 1
            symbols = merged
    """),
    Mistake(6, "pairs without a rank merged too", "pairs that have no rank were merged", """
        while len(symbols) > 1:
            pairs = list(zip(symbols, symbols[1:]))
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            merged, k = [], 0
            while k < len(symbols):
                if k + 1 < len(symbols) and (symbols[k], symbols[k + 1]) == best:
                    merged.append(symbols[k] + symbols[k + 1])
                    k += 2
                else:
                    merged.append(symbols[k])
                    k += 1
            symbols = merged
    """),
    Mistake(6, "one merge, no loop", "look for the best pair again", """
        pairs = list(zip(symbols, symbols[1:]))
        if pairs and min(pairs, key=lambda p: self.ranks.get(p, float("inf"))) in self.ranks:
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            merged, k = [], 0
            while k < len(symbols):
                if k + 1 < len(symbols) and (symbols[k], symbols[k + 1]) == best:
                    merged.append(symbols[k] + symbols[k + 1])
                    k += 2
                else:
                    merged.append(symbols[k])
                    k += 1
            symbols = merged
    """),
    # 7. the image projection: Linear → (B, N, D) → LayerNorm
    Mistake(7, "no LayerNorm", "must go through LayerNorm", """
        return self.proj(image_embeds).reshape(*image_embeds.shape[:-1], self.num_tokens, -1)
    """),
    Mistake(7, "reshaped to (B, D, N) and transposed", "not (B, D, N) and a transpose", """
        tokens = self.proj(image_embeds).reshape(*image_embeds.shape[:-1], -1, self.num_tokens)
        return self.norm(tokens.transpose(-1, -2))
    """),
    Mistake(7, "only the batch axis kept", "keep every leading axis", """
        tokens = self.proj(image_embeds).reshape(image_embeds.shape[0], self.num_tokens, -1)
        return self.norm(tokens)
    """),
    # 8. decoupled cross-attention: text + λ·image, two softmaxes
    Mistake(8, "one softmax over text and image tokens concatenated", "one softmax over [text; image]", """
        if scale == 0:
            return attention(q, k, v)
        return attention(q, torch.cat([k, k_ip], dim=2), torch.cat([v, scale * v_ip], dim=2))
    """),
    Mistake(8, "λ on both branches", "λ multiplies the text branch too", """
        return scale * (attention(q, k, v) + attention(q, k_ip, v_ip))
    """),
    Mistake(8, "(1−λ)·text + λ·image", "the text branch must keep weight 1", """
        return (1 - scale) * attention(q, k, v) + scale * attention(q, k_ip, v_ip)
    """),
    Mistake(8, "the image branch with the text keys", "used the text keys K instead of K′", """
        return attention(q, k, v) + scale * attention(q, k, v_ip)
    """),
    # 9. the VAE's levels in the LDM key map
    Mistake(9, "the decoder's levels not reversed", "the decoder's levels are not reversed", """
        down, up = ("down", "down_blocks"), ("up", "up_blocks")
        for side, (ldm, ours) in (("encoder", down), ("decoder", up)):
            src, dst = (ldm, ours) if to_diffusers else (ours, ldm)
            head = f"{side}.{src}."
            if key.startswith(head):
                level, rest = key[len(head):].split(".", 1)
                level = int(level)
                return f"{side}.{dst}.{level}.{rest}"
        return key
    """),
    Mistake(9, "the encoder reversed too", "the encoder keeps its level numbers", """
        down, up = ("down", "down_blocks"), ("up", "up_blocks")
        for side, (ldm, ours) in (("encoder", down), ("decoder", up)):
            src, dst = (ldm, ours) if to_diffusers else (ours, ldm)
            head = f"{side}.{src}."
            if key.startswith(head):
                level, rest = key[len(head):].split(".", 1)
                level = levels - 1 - int(level)
                return f"{side}.{dst}.{level}.{rest}"
        return key
    """),
    Mistake(9, "levels − i for the decoder", "levels − i is one too many", """
        down, up = ("down", "down_blocks"), ("up", "up_blocks")
        for side, (ldm, ours) in (("encoder", down), ("decoder", up)):
            src, dst = (ldm, ours) if to_diffusers else (ours, ldm)
            head = f"{side}.{src}."
            if key.startswith(head):
                level, rest = key[len(head):].split(".", 1)
                level = int(level) if side == "encoder" else levels - int(level)
                return f"{side}.{dst}.{level}.{rest}"
        return key
    """),
    Mistake(9, "one direction only (to_diffusers ignored)", "must work both ways", """
        down, up = ("down", "down_blocks"), ("up", "up_blocks")
        for side, (ldm, ours) in (("encoder", down), ("decoder", up)):
            src, dst = ldm, ours
            head = f"{side}.{src}."
            if key.startswith(head):
                level, rest = key[len(head):].split(".", 1)
                level = int(level) if side == "encoder" else levels - 1 - int(level)
                return f"{side}.{dst}.{level}.{rest}"
        return key
    """),
    # 10. dropping the image, the text or both (5% each in the paper)
    Mistake(10, "three independent thresholds (the cases overlap)", "the cases overlap", """
        image_drop, text_drop, both_drop = self.rates
        u = b["u"]
        drop_image = (u < image_drop) | (u < both_drop)
        drop_text = (u < text_drop) | (u < both_drop)
        b["caption"] = torch.where(drop_text, self.data.empty, self.data.caption_index[b["index"]])
        b["keep_image"] = (~drop_image).float()
        return b
    """),
    Mistake(10, "no case that drops both", "both dropped, is missing", """
        image_drop, text_drop, both_drop = self.rates
        u = b["u"]
        drop_image = u < image_drop
        drop_text = (u >= image_drop) & (u < image_drop + text_drop)
        b["caption"] = torch.where(drop_text, self.data.empty, self.data.caption_index[b["index"]])
        b["keep_image"] = (~drop_image).float()
        return b
    """),
    Mistake(10, "keep_image 1.0 where the image is dropped", "keep_image is inverted", """
        image_drop, text_drop, both_drop = self.rates
        u = b["u"]
        drop_image = (u < image_drop) | ((u >= image_drop + text_drop) & (u < image_drop + text_drop + both_drop))
        drop_text = (u >= image_drop) & (u < image_drop + text_drop + both_drop)
        b["caption"] = torch.where(drop_text, self.data.empty, self.data.caption_index[b["index"]])
        b["keep_image"] = drop_image.float()
        return b
    """),
    Mistake(10, "the both-dropped band keeps the text", "the third case drops the text too", """
        image_drop, text_drop, both_drop = self.rates
        u = b["u"]
        drop_image = (u < image_drop) | ((u >= image_drop + text_drop) & (u < image_drop + text_drop + both_drop))
        drop_text = (u >= image_drop) & (u < image_drop + text_drop)
        b["caption"] = torch.where(drop_text, self.data.empty, self.data.caption_index[b["index"]])
        b["keep_image"] = (~drop_image).float()
        return b
    """),
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
            graded = grade_bodies({n: m.body for n, m in mistakes.items()})
            rows += [{"name": mistakes[row["number"]].name, **row} for row in graded]
        rows += [{"name": "reference", **row} for row in grade_bodies({n: reference_body(n) for n in numbers})]
    Path(out).write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")


if __name__ == "__main__":
    os.chdir(ROOT)
    main(sys.argv[1], sys.argv[2:])
