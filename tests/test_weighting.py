"""Uncertainty-weighted objectives and dynamic teacher adoption (tasks/objectives/weighting.py) vs float64 references."""

import math

import pytest
import torch

from tasks.objectives import build_objective
from tasks.objectives.labels import SparseLabels
from tasks.objectives.weighting import (
    DynamicTeacher,
    UncertaintyWeighted,
    dynamic_teacher_loss,
    example_uncertainty,
    normalised_entropy,
)

B, T, V = 5, 4, 11


def _mask():
    m = torch.ones(B, T, dtype=torch.bool)
    m[1, 3:] = False
    m[3, 1:] = False
    m[4, :] = False  # an all-padding row
    return m


def _labels(teacher_logits, k, targets):
    logp = torch.log_softmax(teacher_logits, -1)
    lp, ids = logp.topk(k, -1)
    tail = logp.scatter(-1, ids, float("-inf")).logsumexp(-1) if k < V else torch.full(logp.shape[:-1], float("-inf"),
                                                                                      dtype=logp.dtype)
    return SparseLabels(ids=ids, logprobs=lp, tail_logmass=tail, target_ids=targets)


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, B, dtype=torch.float64)[:, None, None])
    teachers = [torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2 for _ in range(2)]
    targets = torch.randint(0, V, (B, T), generator=g)
    return student.requires_grad_(True), teachers, targets


def _dense_fkl(student, teacher, k):
    """Per-position forward KL over the top-k + tail buckets, dense float64 [B, T]."""
    p_full = torch.softmax(teacher, -1)
    q_full = torch.softmax(student, -1)
    ids = p_full.topk(k, -1).indices
    p, q = p_full.gather(-1, ids), q_full.gather(-1, ids)
    kl = (p * (p.log() - q.log())).sum(-1)
    if k < V:
        pt, qt = 1 - p.sum(-1), 1 - q.sum(-1)
        kl = kl + pt * (pt.log() - qt.log())
    return kl


def _dense_u(student, mask):
    with torch.no_grad():
        q = torch.softmax(student, -1)
        h = -(q * q.log()).sum(-1) / math.log(V)
        m = mask.double()
        return h, (h * m).sum(-1) / m.sum(-1).clamp_min(1)


def test_normalised_entropy_matches_dense_and_has_no_gradient():
    student, _, _ = _setup()
    mask = _mask()
    h, u = _dense_u(student, mask)
    got = normalised_entropy(student, mask)
    assert not got.requires_grad
    torch.testing.assert_close(got, torch.where(mask, h, 0.0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(example_uncertainty(student, mask), u, rtol=1e-12, atol=1e-12)
    # Sliced (non-contiguous) logits, as the trainer passes logits[:, :-1].
    wide = torch.cat([student.detach(), torch.zeros(B, 1, V, dtype=torch.float64)], 1)[:, :-1]
    torch.testing.assert_close(normalised_entropy(wide, mask), got)


@pytest.mark.parametrize("k", [V, 4])
@pytest.mark.parametrize("granularity", ["example", "token"])
def test_uncertainty_weighted_matches_float64_reference(k, granularity):
    student, (teacher, _), targets = _setup()
    mask = _mask()
    labels = _labels(teacher, k, targets)
    weighted = UncertaintyWeighted(build_objective("fkl+ce"), granularity=granularity)
    loss = weighted(student, labels, mask, num_valid_tokens=50)
    h, u = _dense_u(student, mask)
    w = h if granularity == "token" else u[:, None].expand(B, T)
    ce = -torch.log_softmax(student, -1).gather(-1, targets[..., None])[..., 0]
    ref = ((w * _dense_fkl(student, teacher, k))[mask].sum() + ce[mask].sum()) / 50  # ce unweighted
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    (g,) = torch.autograd.grad(loss, student)
    (g_ref,) = torch.autograd.grad(ref, student)
    torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(weighted.last_weights, torch.where(mask, w, 0).sum(-1) / mask.sum(-1).clamp_min(1))
    assert set(weighted.last_parts) == {"fkl", "ce"}


def test_unit_weights_give_the_plain_objective_and_confidence_mode_flips():
    student, (teacher, _), targets = _setup(1)
    mask = _mask()
    labels = _labels(teacher, 4, targets)
    plain = build_objective("akl", mu=0.5)
    weighted = UncertaintyWeighted(plain)
    torch.testing.assert_close(weighted(student, labels, mask, weights=torch.ones(B, T, dtype=torch.float64)),
                               plain(student, labels, mask), rtol=1e-12, atol=1e-12)
    _, u = _dense_u(student, mask)
    per_example = torch.stack([plain(student, labels, mask & (torch.arange(B) == b)[:, None], mask.sum())
                               for b in range(B)])
    flipped = UncertaintyWeighted(plain, mode="confidence")(student, labels, mask)
    torch.testing.assert_close(flipped, ((1 - u) * per_example).sum(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["hard", "soft", "soft_instance"])
def test_dynamic_teacher_matches_float64_reference(mode):
    student, (small_t, large_t), targets = _setup(2)
    mask = _mask()
    small, large = _labels(small_t, 4, targets), _labels(large_t, 6, targets)
    loss = dynamic_teacher_loss(build_objective("fkl+ce"), student, small, large, mask, mode=mode)
    _, u = _dense_u(student, mask)
    present = mask.any(-1)
    if mode == "hard":
        # The released code: sort by entropy descending; the uncertain half (bsz // 2) -> the small teacher.
        order = [b for b in sorted(range(B), key=lambda b: -float(u[b])) if present[b]]
        w = torch.zeros(B, dtype=torch.float64)
        w[order[: len(order) // 2]] = 1.0
        assert w.sum() == 2 and w[order[0]] == 1 and w[order[-1]] == 0
    elif mode == "soft":
        w = u[present].mean().expand(B)
    else:
        w = u
    kd = w[:, None] * _dense_fkl(student, small_t, 4) + (1 - w[:, None]) * _dense_fkl(student, large_t, 6)
    ce = -torch.log_softmax(student, -1).gather(-1, targets[..., None])[..., 0]
    n = mask.sum()
    ref = (kd[mask].sum() + ce[mask].sum()) / n
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    (g,) = torch.autograd.grad(loss, student)
    (g_ref,) = torch.autograd.grad(ref, student)
    torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-12)


def test_dynamic_teacher_records_routing_and_refuses_mismatched_responses():
    student, (small_t, large_t), targets = _setup(3)
    mask = _mask()
    dyn = DynamicTeacher(build_objective("fkl"), mode="hard")
    dyn(student, _labels(small_t, 4, targets), _labels(large_t, 4, targets), mask)
    assert dyn.last_small_weight.tolist().count(1.0) == 2 and set(dyn.last_parts) == {"small/fkl", "large/fkl"}
    other = targets.clone()
    other[0, 0] = (other[0, 0] + 1) % V
    with pytest.raises(ValueError, match="different response tokens"):
        dyn(student, _labels(small_t, 4, targets), _labels(large_t, 4, other), mask)
    with pytest.raises(ValueError, match="no teacher term"):
        DynamicTeacher(build_objective("ce"))
    with pytest.raises(ValueError, match="not one of"):
        DynamicTeacher(build_objective("fkl"), mode="vote")
