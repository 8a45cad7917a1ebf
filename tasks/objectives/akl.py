"""Adaptive KL (Wu et al. 2024, "Rethinking Kullback-Leibler divergence in knowledge
distillation for large language models")."""

from __future__ import annotations

import torch
from torch import Tensor

from .kl import kl_per_token
from .registry import register
from .support import Buckets


def akl_head_mask(p_topk: Tensor, mu: float) -> Tensor:
    """Head = shortest prefix of the teacher's top-k, sorted by probability, whose cumulative
    mass reaches ``mu`` -- the token that crosses ``mu`` included.  [N, k] bool.

    Sorted here (stable) rather than trusting the stored order, so ties and re-tempering
    cannot change which tokens are head.
    """
    sorted_p, order = p_topk.sort(dim=-1, descending=True, stable=True)
    # mass strictly before each token (shifted inclusive cumsum, no subtraction round-off)
    before = torch.cat([torch.zeros_like(sorted_p[:, :1]), torch.cumsum(sorted_p, dim=-1)[:, :-1]], dim=-1)
    head_sorted = before < mu
    return torch.zeros_like(head_sorted).scatter_(1, order, head_sorted)


@register("akl", defaults={"mu": 0.5}, bounds={"mu": (0.0, 1.0)})
def akl(b: Buckets, mu: float) -> Tensor:
    """g_head/(g_head+g_tail) * FKL + g_tail/(g_head+g_tail) * RKL, g = sum |p - q| over
    head / tail buckets (q detached, so the weights carry no gradient).

    FKL fixes the head early, RKL the tail; weighting by where the student is currently
    wrong adapts between them.  The tail bucket (tail_bucket support) is always tail.
    """
    p = b.logp.exp()
    q = b.logq.detach().exp()
    k = b.num_topk
    head = torch.zeros_like(p, dtype=torch.bool)
    head[:, :k] = akl_head_mask(p[:, :k], mu)
    gap = (p - q).abs()
    g_head = torch.where(head, gap, 0.0).sum(-1)
    g_tail = torch.where(head, 0.0, gap).sum(-1)
    total = g_head + g_tail
    # 0/0 only when p == q on every bucket, where FKL = RKL = 0: any weight works.
    w_head = torch.where(total > 0, g_head / total.clamp_min(torch.finfo(total.dtype).tiny), 0.5)
    return w_head * kl_per_token(b.logp, b.logq) + (1.0 - w_head) * kl_per_token(b.logq, b.logp)
