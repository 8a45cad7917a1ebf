"""Forward and reverse KL on the bucket distributions, plus the shared safe-KL helpers."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .registry import register
from .support import Buckets


def kl_per_token(log_a: Tensor, log_b: Tensor) -> Tensor:
    """sum_i a_i (log a_i - log b_i) over the last dim, with 0 * log 0 = 0.

    Buckets where a = 0 are masked *before* the subtraction so that -inf - -inf never
    reaches the graph: the forward stays finite and no NaN leaks into the gradient.
    """
    present = log_a > float("-inf")
    diff = torch.where(present, log_a - torch.where(present, log_b, 0.0), 0.0)
    return (log_a.exp() * diff).sum(-1)


def log_mix(log_a: Tensor, log_b: Tensor, w_a: float, w_b: float) -> Tensor:
    """log(w_a * a + w_b * b), elementwise, safe when both a and b are 0 (empty bucket)."""
    both_empty = torch.isneginf(log_a) & torch.isneginf(log_b)
    la = torch.where(both_empty, 0.0, log_a) + (math.log(w_a) if w_a > 0 else float("-inf"))
    lb = torch.where(both_empty, 0.0, log_b) + (math.log(w_b) if w_b > 0 else float("-inf"))
    return torch.where(both_empty, float("-inf"), torch.logaddexp(la, lb))


@register("fkl")
def fkl(b: Buckets) -> Tensor:
    """KL(p || q): mass-covering; the classic (Hinton) distillation loss."""
    return kl_per_token(b.logp, b.logq)


@register("rkl")
def rkl(b: Buckets) -> Tensor:
    """KL(q || p): mode-seeking; penalises student mass where the teacher has little."""
    return kl_per_token(b.logq, b.logp)
