"""Classifier-free guidance (paper eq. 2).

One model is trained both with and without its condition (the condition is dropped at random),
so at sampling time it can predict the noise both ways, ε_c = ε_θ(x_t, c, t) and ε_u = ε_θ(x_t, t).
Guidance extrapolates from the unconditional towards the conditional prediction:

    ε̂ = w·ε_c + (1 − w)·ε_u        (paper eq. 2)
      = ε_u + w·(ε_c − ε_u)         (the same, written as a step from ε_u; what we compute)

w = 1 is the conditional model alone, w = 0 the unconditional one, and w > 1 (SD's default 7.5)
pushes samples further towards the condition, trading diversity for fidelity.
"""

from __future__ import annotations

import math
import warnings

import torch


def classifier_free_guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, w: float) -> torch.Tensor:
    """ε̂ = ε_u + w·(ε_c − ε_u)  (paper eq. 2). w = 1 returns ε_c itself, exactly."""
    check_guidance_scale(w)
    # BEGIN ASSIGNMENT 8
    if w == 1:
        return eps_cond  # the pipeline skips the unconditional pass altogether in this case
    return eps_uncond + w * (eps_cond - eps_uncond)
    # END ASSIGNMENT 8


def check_guidance_scale(w) -> float:
    """A finite, non-negative number, or a ValueError that says so."""
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
        raise ValueError(f"guidance scale w must be a finite number >= 0 (1 = no guidance, SD default 7.5), got {w!r}")
    return float(w)


def cfg(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, w: float) -> torch.Tensor:
    """The old name of `classifier_free_guidance` (it read like the configs around it); kept for old code, with a warning."""
    warnings.warn("minipa.guidance.cfg is now classifier_free_guidance", DeprecationWarning, stacklevel=2)
    return classifier_free_guidance(eps_uncond, eps_cond, w)
