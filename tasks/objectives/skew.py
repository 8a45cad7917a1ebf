"""Skew KL divergences (DistiLLM, Ko et al. 2024)."""

from __future__ import annotations

from torch import Tensor

from .kl import kl_per_token, log_mix
from .registry import register
from .support import Buckets

_ALPHA = {"alpha": 0.1}
_BOUNDS = {"alpha": (0.0, 1.0)}


@register("skew_fkl", defaults=_ALPHA, bounds=_BOUNDS)
def skew_fkl(b: Buckets, alpha: float) -> Tensor:
    """KL(p || alpha*p + (1-alpha)*q): mixing p into the target caps the log-ratio, so
    the loss and its gradient stay finite where q -> 0 (alpha = 0 is plain fkl)."""
    return kl_per_token(b.logp, log_mix(b.logp, b.logq, alpha, 1.0 - alpha))


@register("skew_rkl", defaults=_ALPHA, bounds=_BOUNDS)
def skew_rkl(b: Buckets, alpha: float) -> Tensor:
    """KL(q || (1-alpha)*p + alpha*q): reverse KL made finite where p -> 0."""
    return kl_per_token(b.logq, log_mix(b.logp, b.logq, 1.0 - alpha, alpha))
