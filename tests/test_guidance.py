"""Classifier-free guidance, paper eq. 2."""

import math

import pytest
import torch

from minipa.guidance import classifier_free_guidance


def test_guidance_steps_from_the_unconditional_towards_the_conditional():
    """ε̂ = (1−w)·ε_u + w·ε_c: read the two weights back by least squares and compare them, for several w."""
    u, c = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for w in (2.0, 7.5, 0.5, 0.0):  # w = 2 first: there every mistake below has its own pair of weights
        out = classifier_free_guidance(u, c, w)
        A = torch.stack([u.flatten(), c.flatten()], dim=1).double()
        p, q = torch.linalg.lstsq(A, out.flatten().double()[:, None]).solution[:, 0].tolist()
        named = {"ε_u and ε_c are swapped: w belongs on the conditional prediction": (w, 1 - w),
                 "a step from ε_c: the step starts at the unconditional prediction": (-w, 1 + w),
                 "ε_u is missing: the step w·(ε_c − ε_u) is added to ε_u": (-w, w),
                 "the step points away from ε_c: the sign of (ε_c − ε_u) is flipped": (1 + w, -w)}
        name = next((f" = {k}" for k, (pp, qq) in named.items() if abs(p - pp) < 1e-4 and abs(q - qq) < 1e-4), "")
        assert abs(p - (1 - w)) < 1e-4 and abs(q - w) < 1e-4, (
            f"guidance must step from the unconditional prediction towards the conditional one, ε̂ = ε_u + w·(ε_c − ε_u) = "
            f"(1−w)·ε_u + w·ε_c (paper eq. 2): at w = {w} that is {1 - w:g}·ε_u + {w:g}·ε_c, yours is {p:.4g}·ε_u + {q:.4g}·ε_c{name}")


@pytest.mark.parametrize("w", [0.5, 2.0, 7.5])
def test_both_forms_of_paper_eq2_agree(w):
    u, c = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(classifier_free_guidance(u, c, w), w * c + (1 - w) * u,
                               msg=lambda m: f"at w = {w}, ε̂ is not w·ε_c + (1−w)·ε_u (paper eq. 2): {m}")


def test_w_one_is_the_conditional_prediction():
    u, c = torch.randn(3), torch.randn(3)
    assert torch.equal(classifier_free_guidance(u, c, 1.0), c), (
        "w = 1 must return ε_c itself, bit for bit (return eps_cond when w == 1: ε_u + 1·(ε_c − ε_u) rounds differently)")


def test_w_zero_is_the_unconditional_prediction():
    u, c = torch.randn(3), torch.randn(3)
    assert torch.equal(classifier_free_guidance(u, c, 0.0), u), "w = 0 must return ε_u, the unconditional prediction"


@pytest.mark.parametrize("w", [-1.0, math.nan, math.inf, "7.5", None])
def test_bad_guidance_scale(w):
    with pytest.raises(ValueError, match="guidance scale w must be a finite number >= 0"):
        classifier_free_guidance(torch.zeros(1), torch.zeros(1), w)


def test_the_old_names_still_work_with_a_deprecation_warning(tmp_path):
    from minipa.guidance import cfg
    from minipa.schedulers import make_scheduler

    u, c = torch.zeros(3), torch.ones(3)
    with pytest.warns(DeprecationWarning, match="^minipa.guidance.cfg is now classifier_free_guidance$") as record:
        assert torch.equal(cfg(u, c, 2.0), classifier_free_guidance(u, c, 2.0))
    assert not record[0].filename.endswith("minipa/guidance.py")  # the warning points at the caller, not at minipa
    (tmp_path / "scheduler_config.json").write_text('{"_class_name": "DDIMScheduler", "beta_end": 0.02}')
    with pytest.warns(DeprecationWarning, match="read_config"):
        assert make_scheduler("ddim", tmp_path / "scheduler_config.json").config.beta_end == 0.02
