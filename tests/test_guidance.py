"""Classifier-free guidance, paper eq. 2."""

import math

import pytest
import torch

from minipa.guidance import classifier_free_guidance


@pytest.mark.parametrize("w", [0.5, 2.0, 7.5])
def test_both_forms_of_paper_eq2_agree(w):
    u, c = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(classifier_free_guidance(u, c, w), w * c + (1 - w) * u)


def test_w_one_is_the_conditional_prediction():
    u, c = torch.randn(3), torch.randn(3)
    assert torch.equal(classifier_free_guidance(u, c, 1.0), c)


def test_w_zero_is_the_unconditional_prediction():
    u, c = torch.randn(3), torch.randn(3)
    assert torch.equal(classifier_free_guidance(u, c, 0.0), u)


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
