"""The sinusoidal timestep embedding (a course assignment): how the UNet is told t in ε_θ(x_t, c, t) (paper §3.1).
One test per property of emb(t) = [cos(t·ω), sin(t·ω)], ω_i = max_period^(−i/(dim/2 − freq_shift)); then diffusers'
get_timestep_embedding (tests/test_unet.py), and the whole UNet against diffusers, which reads t through it."""

import math

import pytest
import torch

from minipa.embeddings import timestep_embedding


def frequencies(dim=16, freq_shift=0.0, max_period=10000.0) -> torch.Tensor:
    half = dim // 2
    return max_period ** (-torch.arange(half, dtype=torch.float64) / (half - freq_shift))


def test_at_t_zero_the_code_is_cos_one_then_sin_zero():
    """SD 1.5 flips to [cos, sin] (flip_sin_to_cos=True): at t = 0 the first half is cos 0 = 1, the second sin 0 = 0."""
    code = timestep_embedding(torch.tensor([0]), 16)[0]
    if torch.equal(code[:8], torch.ones(8)) and torch.equal(code[8:], torch.zeros(8)):
        return
    why = ("you wrote [sin, cos]; flip_sin_to_cos=True (SD 1.5) puts cos first" if torch.equal(code[:8], torch.zeros(8))
           else "the first half must be cos(t·ω), the second sin(t·ω)")
    pytest.fail(f"timestep_embedding(0, 16) must be eight 1s then eight 0s, got {[round(float(c), 3) for c in code]}: {why}")


def test_without_the_flip_the_code_is_sin_then_cos():
    code = timestep_embedding(torch.tensor([0]), 16, flip_sin_to_cos=False)[0]
    assert torch.equal(code[:8], torch.zeros(8)) and torch.equal(code[8:], torch.ones(8)), \
        "with flip_sin_to_cos=False the code is [sin(t·ω), cos(t·ω)]: at t = 0 eight 0s, then eight 1s"


def test_the_frequencies_fall_geometrically_from_one():
    """At t = 1 the angles are the frequencies themselves: ω_0 = 1 down to ω_{half−1} = max_period^(−(half−1)/half)."""
    code = timestep_embedding(torch.tensor([1]), 16)[0].double()
    at_one = lambda omega: torch.cat([torch.cos(omega), torch.sin(omega)])  # noqa: E731  the code at t = 1 for frequencies ω
    expected = frequencies(16)
    if torch.allclose(code, at_one(expected), atol=1e-5):
        return
    why = ("yours rise: the exponent of max_period is −i/(dim/2), with a minus sign" if torch.allclose(code, at_one(1 / expected.float().double()), atol=1e-2)
           else "the exponent is −i/(dim/2 − freq_shift), here −i/8, not −i/7" if torch.allclose(code, at_one(frequencies(16, 1.0)), atol=1e-5)
           else "divide i by dim/2 (the number of frequencies), not by dim" if torch.allclose(code, at_one(frequencies(32)[:8]), atol=1e-5)
           else "ω_i = exp(−ln(max_period)·i/(dim/2 − freq_shift)), i = 0 … dim/2 − 1, and the angles are t·ω")
    pytest.fail(f"timestep_embedding(1, 16): the frequencies ω must fall from 1 to {float(expected[-1]):.2g} "
                f"({[round(float(w), 4) for w in expected]}): {why}")


def test_freq_shift_lowers_the_denominator_of_the_exponent():
    code = timestep_embedding(torch.tensor([1]), 16, freq_shift=1)[0].double()
    omega = torch.atan2(code[8:], code[:8])
    assert torch.allclose(omega, frequencies(16, 1.0), atol=1e-5), \
        "with freq_shift = 1, ω_i = max_period^(−i/(dim/2 − 1)): freq_shift is subtracted from dim/2 in the exponent"


def test_each_timestep_of_the_batch_gets_its_own_row():
    t = torch.tensor([0, 10, 999])
    codes = timestep_embedding(t, 16)
    assert codes.shape == (3, 16), f"(B,) timesteps give a (B, dim) code: expected (3, 16), got {tuple(codes.shape)}"
    for row, step in zip(codes, t):
        angles = step.double() * frequencies(16)
        expected = torch.cat([torch.cos(angles), torch.sin(angles)]).float()
        assert torch.allclose(row, expected, atol=1e-4), f"row {int(step)} must be the code of t = {int(step)}: t·ω with ω of shape (dim/2,)"


def test_an_odd_width_ends_with_one_zero_channel():
    codes = timestep_embedding(torch.tensor([3, 7]), 9)
    assert codes.shape == (2, 9) and torch.equal(codes[:, 8], torch.zeros(2)), \
        "an odd dim = 9 has 4 frequencies (8 channels) and one zero channel at the end (F.pad)"


def test_the_code_is_float32_whatever_the_timesteps():
    for t in (torch.tensor([5]), torch.tensor([5.0], dtype=torch.float16), torch.tensor([5.0], dtype=torch.float64)):
        assert timestep_embedding(t, 8).dtype == torch.float32, f"the code must be float32 for {t.dtype} timesteps"
    assert math.isclose(float(timestep_embedding(torch.tensor([5], dtype=torch.int64), 8)[0, 0]), math.cos(5.0), abs_tol=1e-6)
