"""Sparse KD objectives vs dense definitions written independently here (float64)."""

from __future__ import annotations

import math
import zlib

import pytest
import torch
import torch.nn.functional as F

from tasks.objectives import (
    OBJECTIVE_NAMES,
    SUPPORTS,
    SparseLabels,
    build_objective,
    get_objective,
    parse_spec,
)
from tasks.objectives.akl import akl_head_mask

DIVERGENCES = ["fkl", "rkl", "jsd", "tvd", "skew_fkl", "skew_rkl", "akl"]
ALL = DIVERGENCES + ["ce"]
NEG_INF = float("-inf")


# ----------------------------------------------------------------------------- fixtures


def make_case(B, T, V, k, seed=0, dtype=torch.float32, poison=True, mask_p=0.7, scale=2.0):
    """Random student/teacher; labels sparsified by hand; padded positions poisoned."""
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    teacher = torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale
    t_lp = torch.log_softmax(teacher, -1)
    top_lp, top_ids = t_lp.sort(-1, descending=True)
    top_lp, top_ids = top_lp[..., :k], top_ids[..., :k]
    if k == V:
        tail = torch.full((B, T), NEG_INF, dtype=torch.float64)
    else:
        outside = torch.ones(B, T, V, dtype=torch.bool).scatter(-1, top_ids, False)
        tail = torch.where(outside, t_lp, NEG_INF).logsumexp(-1)
    target = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < mask_p
    mask.view(-1)[0] = True
    if poison:  # garbage that must never be read
        top_ids = top_ids.masked_fill(~mask[..., None], 0)
        top_lp = top_lp.masked_fill(~mask[..., None], NEG_INF)
        tail = tail.masked_fill(~mask, float("nan"))
        target = target.masked_fill(~mask, 0)
    labels = SparseLabels(ids=top_ids, logprobs=top_lp.float(), tail_logmass=tail.float(), target_ids=target)
    return student, labels, mask, teacher


def ref_buckets(logits64, labels, mask, support, tau):
    """Explicit (k or k+1)-bucket distributions p, q (probabilities, float64) on valid rows."""
    z = logits64[mask] / tau
    q_full = torch.softmax(z, -1)
    ids = labels.ids[mask]
    lp = labels.logprobs[mask].double()
    q_top = q_full.gather(1, ids)
    w = torch.exp(lp / tau)
    V, k = z.shape[-1], ids.shape[-1]
    if support == "renormalize":
        return w / w.sum(-1, keepdim=True), q_top / q_top.sum(-1, keepdim=True), k
    if k == V:  # tail bucket is empty on both sides: drop it
        return w / w.sum(-1, keepdim=True), q_top, k
    outside = torch.ones_like(q_full, dtype=torch.bool).scatter(1, ids, False)
    q_tail = torch.where(outside, q_full, 0.0).sum(-1, keepdim=True)
    w_tail = torch.exp(labels.tail_logmass[mask].double() / tau)[:, None]
    p = torch.cat([w, w_tail], 1)
    return p / p.sum(-1, keepdim=True), torch.cat([q_top, q_tail], 1), k


def _kl(a, b):
    return (a * (a.log() - b.log())).sum(-1)


def ref_akl(p, q, k, mu):
    qd = q.detach()
    w = []
    for n in range(p.shape[0]):
        order = sorted(range(k), key=lambda i: -p[n, i].item())
        head, acc = set(), 0.0
        for i in order:
            if acc >= mu:
                break
            head.add(i)
            acc += p[n, i].item()
        gh = sum(abs(p[n, i] - qd[n, i]).item() for i in head)
        gt = sum(abs(p[n, i] - qd[n, i]).item() for i in range(p.shape[1]) if i not in head)
        w.append(gh / (gh + gt) if gh + gt > 0 else 0.5)
    w = torch.tensor(w, dtype=p.dtype)
    return w * _kl(p, q) + (1 - w) * _kl(q, p)


def ref_per_token(name, p, q, k, beta=0.5, alpha=0.1, mu=0.5):
    if name == "fkl":
        return _kl(p, q)
    if name == "rkl":
        return _kl(q, p)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * _kl(p, m) + (1 - beta) * _kl(q, m)
    if name == "skew_fkl":
        return _kl(p, alpha * p + (1 - alpha) * q)
    if name == "skew_rkl":
        return _kl(q, (1 - alpha) * p + alpha * q)
    if name == "akl":
        return ref_akl(p, q, k, mu)
    raise AssertionError(name)


def ref_loss(name, logits, labels, mask, support="tail_bucket", tau=1.0, scale_t2=False, **params):
    """Returns (loss, grad wrt logits) of the dense reference, computed in float64."""
    x = logits.detach().double().requires_grad_()
    if name == "ce":
        loss = F.cross_entropy(x[mask], labels.target_ids[mask], reduction="sum") / mask.sum()
    else:
        p, q, k = ref_buckets(x, labels, mask, support, tau)
        loss = ref_per_token(name, p, q, k, **params).sum() / mask.sum()
        if scale_t2:
            loss = loss * tau**2
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


def run(obj, logits, labels, mask, **kw):
    x = logits.detach().clone().requires_grad_()
    loss = obj(x, labels, mask, **kw)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


# ----------------------------------------------------------------------------- correctness

CASES = [(2, 5, 17, 17), (2, 5, 17, 5), (3, 4, 50, 50), (3, 4, 50, 8)]


@pytest.mark.parametrize("support", SUPPORTS)
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}T{}V{}k{}".format(*c))
def test_matches_dense_reference_float32(name, support, case):
    logits, labels, mask, _ = make_case(*case, seed=zlib.crc32(f"{name}{support}{case}".encode()) % 1000)
    obj = get_objective(name, support=support, chunk_size=3)  # several chunks, views + gathers
    loss, grad = run(obj, logits, labels, mask)
    ref, ref_grad = ref_loss(name, logits, labels, mask, support)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)
    assert torch.all(grad[~mask] == 0)


@pytest.mark.parametrize("support", SUPPORTS)
@pytest.mark.parametrize("name", ALL)
def test_temperature_and_params_match_reference(name, support):
    params = {"jsd": {"beta": 0.3}, "skew_fkl": {"alpha": 0.25}, "skew_rkl": {"alpha": 0.4}, "akl": {"mu": 0.7}}
    kw = params.get(name, {})
    logits, labels, mask, _ = make_case(3, 4, 40, 6, seed=7)
    tau = 2.0
    obj = get_objective(name, support=support, temperature=tau, scale_t2=True, **kw)
    loss, grad = run(obj, logits, labels, mask)
    ref, ref_grad = ref_loss(name, logits, labels, mask, support, tau=tau, scale_t2=True, **kw)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("support", SUPPORTS)
@pytest.mark.parametrize("name", ALL)
def test_bfloat16_loose(name, support):
    logits, labels, mask, _ = make_case(2, 6, 64, 10, seed=3, dtype=torch.bfloat16)
    labels = SparseLabels(labels.ids, labels.logprobs.bfloat16(), labels.tail_logmass.bfloat16(), labels.target_ids)
    loss, grad = run(get_objective(name, support=support), logits, labels, mask)
    ref, ref_grad = ref_loss(name, logits, labels, mask, support)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), ref, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=2e-2, atol=1e-3)


def test_float64_tight():
    logits, labels, mask, _ = make_case(2, 5, 30, 6, seed=11, dtype=torch.float64)
    for name in ALL:
        loss, grad = run(get_objective(name), logits, labels, mask)
        ref, ref_grad = ref_loss(name, logits, labels, mask)
        torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("support", SUPPORTS)
@pytest.mark.parametrize("k", [24, 6])
@pytest.mark.parametrize("name", DIVERGENCES)
def test_zero_when_student_equals_teacher(name, support, k):
    _, labels, mask, teacher = make_case(2, 4, 24, k, seed=5)
    loss, grad = run(get_objective(name, support=support), teacher.float(), labels, mask)
    assert abs(loss.item()) < 1e-6
    if name != "tvd":  # |p - q| has no gradient at p = q (subgradient = sign of round-off)
        assert grad.abs().max().item() < 1e-6


def test_divergences_positive_when_different():
    logits, labels, mask, _ = make_case(2, 4, 24, 6, seed=5)
    for name in DIVERGENCES:
        for support in SUPPORTS:
            assert get_objective(name, support=support)(logits, labels, mask).item() > 1e-3


# ----------------------------------------------------------------------------- normalisation / masking


@pytest.mark.parametrize("spec", ["fkl", "akl", "0.5*jsd+0.5*ce"])
def test_global_token_normalisation(spec):
    logits, labels, mask, _ = make_case(4, 6, 20, 5, seed=9)
    obj = build_objective(spec)
    full, grad = run(obj, logits, labels, mask)
    n = int(mask.sum())
    total, grads = 0.0, []
    for sl in (slice(0, 2), slice(2, 4)):
        part = SparseLabels(labels.ids[sl], labels.logprobs[sl], labels.tail_logmass[sl], labels.target_ids[sl])
        loss, g = run(obj, logits[sl], part, mask[sl], num_valid_tokens=n)
        total, grads = total + loss, grads + [g]
    torch.testing.assert_close(total, full, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.cat(grads), grad, rtol=1e-6, atol=1e-8)
    # explicit count (int or tensor) == default mask.sum(); per-token sum via count 1
    torch.testing.assert_close(obj(logits, labels, mask, num_valid_tokens=torch.tensor(n)), full)
    torch.testing.assert_close(obj(logits, labels, mask, num_valid_tokens=1), full * n, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("support", SUPPORTS)
@pytest.mark.parametrize("name", ALL)
def test_masked_positions_contribute_nothing(name, support):
    logits, labels, mask, _ = make_case(3, 5, 20, 4, seed=13)
    obj = get_objective(name, support=support, chunk_size=2)
    loss, grad = run(obj, logits, labels, mask)
    noisy = logits.clone()
    noisy[~mask] = torch.randn_like(noisy[~mask]) * 100
    pad = (~mask).nonzero()
    noisy[pad[:, 0], pad[:, 1], 0] = float("inf")  # even non-finite garbage in masked rows
    bad = SparseLabels(
        labels.ids.masked_fill(~mask[..., None], 10**9),  # out-of-range ids
        labels.logprobs.masked_fill(~mask[..., None], float("nan")),
        labels.tail_logmass.masked_fill(~mask, float("-inf")),
        labels.target_ids.masked_fill(~mask, -100),
    )
    loss2, grad2 = run(obj, noisy, bad, mask)
    assert torch.equal(loss, loss2)
    assert torch.equal(grad, grad2)
    assert torch.all(grad2[~mask] == 0) and torch.isfinite(grad2).all()


def test_all_masked_is_zero_without_nan():
    logits, labels, mask, _ = make_case(2, 3, 10, 4, seed=1)
    none = torch.zeros_like(mask)
    for name in ALL:
        loss, grad = run(get_objective(name), logits, labels, none)
        assert loss.item() == 0.0
        assert torch.all(grad == 0)


@pytest.mark.parametrize("name", ["fkl", "akl", "ce"])
def test_chunking_and_noncontiguous_logits_invariant(name):
    B, T, V, k = 3, 9, 40, 7
    big, labels_full, _, _ = make_case(B, T + 1, V, k, seed=21, poison=False)
    labels = SparseLabels(
        labels_full.ids[:, :-1], labels_full.logprobs[:, :-1], labels_full.tail_logmass[:, :-1], labels_full.target_ids[:, :-1]
    )
    prompt = torch.arange(T)[None, :] >= torch.tensor([[2], [5], [0]])  # long runs (masked prompts)
    frag = torch.rand(B, T, generator=torch.Generator().manual_seed(0)) < 0.5  # short runs
    frag[0, 0] = True
    for mask in (prompt, frag):
        ref = None
        for chunk in (None, 1, 2, 5, 1000):
            for sliced in (False, True):
                x = big.detach().clone().requires_grad_()
                logits = x[:, :-1] if sliced else x[:, :-1].contiguous()
                assert logits.is_contiguous() == (not sliced)
                loss = get_objective(name, chunk_size=chunk)(logits, labels, mask)
                (g,) = torch.autograd.grad(loss, x)
                if ref is None:
                    ref = (loss.detach(), g)
                else:
                    torch.testing.assert_close(loss.detach(), ref[0], rtol=1e-6, atol=1e-7)
                    torch.testing.assert_close(g, ref[1], rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------- temperature / scale_t2


def test_scale_t2_multiplies_kd_terms_only():
    logits, labels, mask, _ = make_case(2, 5, 30, 6, seed=2)
    for name in DIVERGENCES:
        a = get_objective(name, temperature=3.0)(logits, labels, mask)
        b = get_objective(name, temperature=3.0, scale_t2=True)(logits, labels, mask)
        torch.testing.assert_close(b, 9.0 * a)
    ce1 = get_objective("ce")(logits, labels, mask)
    torch.testing.assert_close(get_objective("ce", temperature=3.0, scale_t2=True)(logits, labels, mask), ce1)
    mix = build_objective("fkl+ce", temperature=2.0, scale_t2=True)
    fkl2 = get_objective("fkl", temperature=2.0)(logits, labels, mask)
    torch.testing.assert_close(mix(logits, labels, mask), 4.0 * fkl2 + ce1)


def test_temperature_changes_result():
    logits, labels, mask, _ = make_case(2, 5, 30, 6, seed=2)
    a = get_objective("fkl")(logits, labels, mask)
    b = get_objective("fkl", temperature=2.0)(logits, labels, mask)
    assert abs(a.item() - b.item()) > 1e-3


# ----------------------------------------------------------------------------- akl head


def test_akl_head_selection_hand_made():
    p = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    assert akl_head_mask(p, 0.5).tolist() == [[True, True, False, False]]
    assert akl_head_mask(p, 0.4).tolist() == [[True, False, False, False]]  # reaches mu exactly
    assert akl_head_mask(p, 0.75).tolist() == [[True, True, True, False]]
    assert akl_head_mask(p, 1.0).tolist() == [[True, True, True, True]]
    assert akl_head_mask(torch.tensor([[0.1, 0.4, 0.2, 0.3]]), 0.5).tolist() == [[False, True, False, True]]


def test_akl_loss_hand_made():
    p = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    q = torch.tensor([0.7, 0.1, 0.1, 0.1], dtype=torch.float64)
    labels = SparseLabels(
        ids=torch.arange(4).view(1, 1, 4), logprobs=p.log().float().view(1, 1, 4), tail_logmass=torch.full((1, 1), NEG_INF)
    )
    logits = q.log().float().view(1, 1, 4)
    mask = torch.ones(1, 1, dtype=torch.bool)
    fkl = (p * (p / q).log()).sum()
    rkl = (q * (q / p).log()).sum()
    w = 0.5 / 0.6  # g_head = .3 + .2 (first two), g_tail = .1 + 0
    got = get_objective("akl", mu=0.5)(logits, labels, mask)
    assert abs(got.item() - (w * fkl + (1 - w) * rkl).item()) < 1e-6
    # head = first token only would give w = 0.5: make sure that is distinguishable
    assert abs(got.item() - (0.5 * fkl + 0.5 * rkl).item()) > 1e-3


# ----------------------------------------------------------------------------- mixtures


def test_mixture_equals_weighted_sum_and_logs_parts():
    logits, labels, mask, _ = make_case(2, 5, 30, 6, seed=4)
    for tau in (1.0, 2.0):  # tau == 1 shares one vocab pass between akl and ce
        mix = build_objective("0.3*akl + 0.7*ce", temperature=tau, mu=0.6)
        loss, grad = run(mix, logits, labels, mask)
        a, ga = run(get_objective("akl", temperature=tau, mu=0.6), logits, labels, mask)
        c, gc = run(get_objective("ce"), logits, labels, mask)
        torch.testing.assert_close(loss, 0.3 * a + 0.7 * c)
        torch.testing.assert_close(grad, 0.3 * ga + 0.7 * gc, rtol=1e-5, atol=1e-8)
        assert mix.last_parts.keys() == {"akl", "ce"}
        assert mix.last_parts["akl"] == pytest.approx(a.item(), rel=1e-6)
        assert mix.last_parts["ce"] == pytest.approx(c.item(), rel=1e-6)
    d = build_objective({"akl": 0.3, "ce": 0.7}, mu=0.6)(logits, labels, mask)
    torch.testing.assert_close(d, build_objective("0.3*akl+0.7*ce", mu=0.6)(logits, labels, mask))
    plain = build_objective("akl+ce")(logits, labels, mask)
    torch.testing.assert_close(plain, get_objective("akl")(logits, labels, mask) + get_objective("ce")(logits, labels, mask))
    single = build_objective("jsd", beta=0.2)
    torch.testing.assert_close(single(logits, labels, mask), get_objective("jsd", beta=0.2)(logits, labels, mask))
    assert list(single.last_parts) == ["jsd"]


def test_params_routed_to_accepting_components():
    logits, labels, mask, _ = make_case(2, 5, 30, 6, seed=4)
    mix = build_objective("akl+jsd+skew_rkl", mu=0.2, beta=0.9, alpha=0.3)
    mix(logits, labels, mask)
    parts = mix.last_parts
    assert parts["akl"] == pytest.approx(get_objective("akl", mu=0.2)(logits, labels, mask).item(), rel=1e-6)
    assert parts["jsd"] == pytest.approx(get_objective("jsd", beta=0.9)(logits, labels, mask).item(), rel=1e-6)
    assert parts["skew_rkl"] == pytest.approx(get_objective("skew_rkl", alpha=0.3)(logits, labels, mask).item(), rel=1e-6)
    assert parse_spec("1e-1*fkl + 2*ce") == [("fkl", 0.1), ("ce", 2.0)]


# ----------------------------------------------------------------------------- errors


def test_objective_names():
    assert set(OBJECTIVE_NAMES) == set(ALL)


@pytest.mark.parametrize("bad", ["kl", "FKL", "fk", "akl2", "", "jsd "])
def test_unknown_names_raise_listing_valid(bad):
    with pytest.raises(ValueError, match="fkl") as e:
        get_objective(bad)
    assert repr(bad) in str(e.value)


@pytest.mark.parametrize(
    "name, params, word",
    [
        ("fkl", {"beta": 0.5}, "beta"),
        ("jsd", {"alpha": 0.1}, "alpha"),
        ("jsd", {"betta": 0.1}, "betta"),
        ("akl", {"temperature_": 1.0}, "temperature_"),
        ("ce", {"mu": 0.5}, "mu"),
        ("jsd", {"beta": 1.5}, "beta"),
        ("skew_fkl", {"alpha": float("nan")}, "alpha"),
        ("akl", {"mu": "0.5"}, "mu"),
    ],
)
def test_bad_params_raise(name, params, word):
    with pytest.raises(ValueError, match=word):
        get_objective(name, **params)


def test_wrong_param_message_lists_valid_ones():
    with pytest.raises(ValueError, match="beta") as e:
        get_objective("jsd", alpha=0.1)
    assert "alpha" in str(e.value)


@pytest.mark.parametrize(
    "spec, params",
    [
        ("akl+ce", {"beta": 0.5}),
        ("akl+", {}),
        ("0.5*", {}),
        ("akl ce", {}),
        ("akl+akl", {}),
        ("0.5*kl+ce", {}),
        ({"akl": -1.0}, {}),
        ({"akl": float("inf")}, {}),
        ({}, {}),
        (["akl"], {}),
    ],
)
def test_bad_specs_raise(spec, params):
    with pytest.raises(ValueError):
        build_objective(spec, **params)


def test_bad_settings_raise():
    for kw in ({"support": "dense"}, {"temperature": 0.0}, {"temperature": -1.0}, {"temperature": math.inf},
               {"chunk_size": 0}, {"scale_t2": "yes"}):
        with pytest.raises(ValueError):
            get_objective("fkl", **kw)
    logits, labels, mask, _ = make_case(2, 3, 10, 4, seed=1)
    no_target = SparseLabels(labels.ids, labels.logprobs, labels.tail_logmass)
    with pytest.raises(ValueError, match="target_ids"):
        get_objective("ce")(logits, no_target, mask)
    with pytest.raises(ValueError, match="mask"):
        get_objective("fkl")(logits, labels, mask[:, :2])


def test_sparse_labels_validation_and_from_logits():
    with pytest.raises(ValueError):
        SparseLabels(torch.zeros(2, 3, 4, dtype=torch.long), torch.zeros(2, 3, 5), torch.zeros(2, 3))
    with pytest.raises(ValueError):
        SparseLabels(torch.zeros(2, 3, 4, dtype=torch.long), torch.zeros(2, 3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError):
        SparseLabels(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.zeros(2, 3))
    t = torch.randn(2, 3, 50)
    lab = SparseLabels.from_logits(t, 5)
    total = lab.logprobs.exp().sum(-1) + lab.tail_logmass.exp()
    torch.testing.assert_close(total, torch.ones(2, 3))
    assert torch.all(lab.logprobs[..., :-1] >= lab.logprobs[..., 1:])
    assert torch.isneginf(SparseLabels.from_logits(t, 50).tail_logmass).all()
