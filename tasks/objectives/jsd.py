"""Generalised Jensen-Shannon divergence (GKD, Agarwal et al. 2024)."""

from __future__ import annotations

from torch import Tensor

from .kl import kl_per_token, log_mix
from .registry import register
from .support import Buckets


@register("jsd", defaults={"beta": 0.5}, bounds={"beta": (0.0, 1.0)})
def jsd(b: Buckets, beta: float) -> Tensor:
    """beta*KL(p||M) + (1-beta)*KL(q||M), M = beta*p + (1-beta)*q.

    Bounded (<= log 2 at beta = 0.5), so it never blows up on tokens where the student
    puts no mass; beta interpolates between forward-like and reverse-like behaviour.
    """
    log_m = log_mix(b.logp, b.logq, beta, 1.0 - beta)
    return beta * kl_per_token(b.logp, log_m) + (1.0 - beta) * kl_per_token(b.logq, log_m)
