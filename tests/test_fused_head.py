"""The fused head (loss from hidden states + lm-head weight, vocabulary in blocks) equals the logits path.

Reference: ``objective(hidden @ weight.T, ...)`` evaluated in float64 (tests/test_objectives.py pins that path
to dense float64 definitions at 1e-10), and the same logits path at the test's own dtype.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from tasks.objectives import OBJECTIVE_NAMES, SUPPORTS, SparseLabels, build_objective, get_objective
from tasks.objectives.fused_head import FusedHead, FusedHeadError, check_plain_head, tile_shape

ALL = list(OBJECTIVE_NAMES)
NEG_INF = float("-inf")
PARAMS = {"jsd": {"beta": 0.3}, "skew_fkl": {"alpha": 0.25}, "skew_rkl": {"alpha": 0.4}, "akl": {"mu": 0.7}}


def make_case(B, T, H, V, k, seed=0, dtype=torch.float32, mask_p=0.7):
    """Hidden states, lm-head weight, labels from a random teacher (top-k + tail), a ragged mask with poisoned pads."""
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(B, T, H, generator=g, dtype=torch.float64)).to(dtype)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) * 2 / H**0.5).to(dtype)
    t_lp = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2, -1)
    top_lp, top_ids = t_lp.topk(k, -1)
    if k == V:
        tail = torch.full((B, T), NEG_INF, dtype=torch.float64)
    else:
        tail = t_lp.scatter(-1, top_ids, NEG_INF).logsumexp(-1)
    target = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < mask_p
    mask.view(-1)[0] = True
    labels = SparseLabels(
        ids=top_ids.masked_fill(~mask[..., None], 10**9),  # pads: out-of-range ids, NaNs, must never be read
        logprobs=top_lp.float().masked_fill(~mask[..., None], float("nan")),
        tail_logmass=tail.float().masked_fill(~mask, float("nan")),
        target_ids=target.masked_fill(~mask, -100),
    )
    return hidden, weight, labels, mask


def logits_path(objective, hidden, weight, labels, mask, dtype=None, **kw):
    """Today's path: logits = hidden @ weight.T, then the objective. Returns loss, d/dhidden, d/dweight."""
    h = hidden.detach().to(dtype or hidden.dtype).requires_grad_()
    w = weight.detach().to(dtype or weight.dtype).requires_grad_()
    loss = objective(h @ w.T, labels, mask, **kw)
    gh, gw = torch.autograd.grad(loss, (h, w))
    return loss.detach(), gh, gw


def fused_path(objective, hidden, weight, labels, mask, tile=None, **kw):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss = FusedHead(objective, tile=tile).loss(h, w, labels, mask, **kw)
    gh, gw = torch.autograd.grad(loss, (h, w))
    return loss.detach(), gh, gw


def _close(got, ref, rtol, atol):
    for a, b, what in zip(got, ref, ("loss", "grad hidden", "grad weight")):
        torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol, msg=what)


CASES = [(2, 5, 8, 37, 5), (3, 4, 16, 50, 50), (2, 6, 12, 61, 8)]
TILES = [(3, 7), (4, 16), None]  # several row tiles and vocabulary blocks (V not a multiple), and the default


@pytest.mark.parametrize("support", SUPPORTS)
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}T{}H{}V{}k{}".format(*c))
def test_float32_matches_logits_path_and_float64(name, support, case):
    hidden, weight, labels, mask = make_case(*case, seed=zlib.crc32(f"{name}{support}{case}".encode()) % 1000)
    obj = get_objective(name, support=support, **PARAMS.get(name, {}))
    ref64 = logits_path(obj, hidden, weight, labels, mask, dtype=torch.float64)
    ref32 = logits_path(obj, hidden, weight, labels, mask)
    for tile in TILES:
        got = fused_path(obj, hidden, weight, labels, mask, tile=tile)
        assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32 and got[2].dtype == torch.float32
        _close(got, ref64, rtol=1e-5, atol=1e-6)
        _close(got, ref32, rtol=1e-5, atol=1e-6)
        assert torch.all(got[1][~mask] == 0)


@pytest.mark.parametrize("support", SUPPORTS)
@pytest.mark.parametrize("name", ALL)
def test_temperature_and_scale_t2(name, support):
    hidden, weight, labels, mask = make_case(3, 4, 8, 40, 6, seed=7)
    obj = get_objective(name, support=support, temperature=2.0, scale_t2=True, **PARAMS.get(name, {}))
    _close(fused_path(obj, hidden, weight, labels, mask, tile=(5, 9)),
           logits_path(obj, hidden, weight, labels, mask, dtype=torch.float64), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tau", [1.0, 2.0])  # tau == 1: KD and CE share one pass over V; else two groups
@pytest.mark.parametrize("spec", ["fkl+ce", "0.3*akl+0.7*ce", "jsd+tvd+ce"])
def test_mixtures_and_parts(spec, tau):
    hidden, weight, labels, mask = make_case(2, 6, 8, 45, 7, seed=3)
    obj = build_objective(spec, temperature=tau)
    ref = logits_path(obj, hidden, weight, labels, mask, dtype=torch.float64)
    ref_parts = obj.last_parts
    head = FusedHead(obj, tile=(4, 10))
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = head.loss(h, w, labels, mask)
    _close((loss.detach(), *torch.autograd.grad(loss, (h, w))), ref, rtol=1e-5, atol=1e-6)
    assert head.last_parts.keys() == ref_parts.keys()
    for part in ref_parts:
        assert head.last_parts[part] == pytest.approx(ref_parts[part], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("support", SUPPORTS)
@pytest.mark.parametrize("name", ALL)
def test_bfloat16_loose(name, support):
    hidden, weight, labels, mask = make_case(2, 6, 16, 64, 10, seed=5, dtype=torch.bfloat16)
    labels = SparseLabels(labels.ids, labels.logprobs.bfloat16(), labels.tail_logmass.bfloat16(), labels.target_ids)
    obj = get_objective(name, support=support)
    got = fused_path(obj, hidden, weight, labels, mask, tile=(5, 24))
    assert got[1].dtype == torch.bfloat16 and got[2].dtype == torch.bfloat16
    ref16 = logits_path(obj, hidden, weight, labels, mask)  # today's path in bf16
    ref64 = logits_path(obj, hidden, weight, labels, mask, dtype=torch.float64)
    # bf16 logits round at ~4e-3 relative; both bf16 paths sit within that of the exact result and of each other
    _close(got, ref64, rtol=3e-2, atol=3e-3)
    _close(got, ref16, rtol=3e-2, atol=3e-3)


@pytest.mark.parametrize("spec", ["fkl", "akl+ce"])
def test_global_token_normalisation(spec):
    """Two halves with the global count sum to the whole batch, loss and gradients (as on the logits path)."""
    hidden, weight, labels, mask = make_case(4, 5, 8, 30, 5, seed=9)
    obj = build_objective(spec)
    full = fused_path(obj, hidden, weight, labels, mask, tile=(3, 8))
    n = int(mask.sum())
    halves = []
    for sl in (slice(0, 2), slice(2, 4)):
        part = SparseLabels(labels.ids[sl], labels.logprobs[sl], labels.tail_logmass[sl], labels.target_ids[sl])
        halves.append(fused_path(obj, hidden[sl], weight, part, mask[sl], tile=(3, 8), num_valid_tokens=n))
    torch.testing.assert_close(halves[0][0] + halves[1][0], full[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.cat([halves[0][1], halves[1][1]]), full[1], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(halves[0][2] + halves[1][2], full[2], rtol=1e-5, atol=1e-7)


def test_all_masked_is_zero_and_noncontiguous_hidden():
    hidden, weight, labels, mask = make_case(2, 4, 8, 20, 4, seed=1)
    got = fused_path(build_objective("fkl+ce"), hidden, weight, labels, torch.zeros_like(mask))
    assert got[0].item() == 0.0 and torch.all(got[1] == 0) and torch.all(got[2] == 0)
    # hidden[:, :-1] of a [B, T+1, H] tensor (the caller's shift) is not contiguous
    big = torch.cat([hidden, torch.randn(2, 1, 8)], dim=1).requires_grad_()
    loss = FusedHead(build_objective("fkl+ce")).loss(big[:, :-1], weight, labels, mask)
    (g,) = torch.autograd.grad(loss, big)
    ref = logits_path(build_objective("fkl+ce"), hidden, weight, labels, mask)
    torch.testing.assert_close(loss.detach(), ref[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g[:, :-1], ref[1], rtol=1e-5, atol=1e-7)
    assert torch.all(g[:, -1] == 0)


def test_cpu_autocast_runs_tiles_in_bf16_like_the_lm_head():
    hidden, weight, labels, mask = make_case(2, 5, 16, 48, 6, seed=4)
    obj = build_objective("fkl+ce")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        fused = FusedHead(obj, tile=(4, 16)).loss(h, w, labels, mask)
        h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        plain = obj(torch.nn.functional.linear(h2, w2), labels, mask)
    g_fused = torch.autograd.grad(fused, (h, w))
    g_plain = torch.autograd.grad(plain, (h2, w2))
    assert g_fused[1].dtype == torch.float32  # the float32 master weight gets a float32 gradient
    torch.testing.assert_close(fused.detach(), plain.detach(), rtol=1e-2, atol=1e-3)
    for a, b in zip(g_fused, g_plain):
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-3)


def test_tile_shape_bounds_memory():
    rows, block = tile_shape(8192, 151936)
    assert rows * block <= 1 << 22 and block >= 256
    assert tile_shape(3, 50) == (3, 50)


def test_plain_head_check():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    model = LlamaForCausalLM(cfg)
    assert check_plain_head(model) is model.lm_head.weight
    model.lm_head = torch.nn.Linear(16, 64, bias=True)
    with pytest.raises(FusedHeadError, match="bias"):
        check_plain_head(model)
    model.lm_head = torch.nn.Linear(16, 64, bias=False)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(FusedHeadError, match="final_logit_softcapping"):
        check_plain_head(model)


def _train_weights(tiny_student, tiny_labels, out_dir, **settings):
    from safetensors.torch import load_file

    from tasks.config import TrainConfig
    from tasks.train.loop import train
    from tasks.train.loop_config import LoopConfig
    from tasks.train.runtime import LocalRuntime

    cfg = TrainConfig(objective="fkl+ce", steps=3, batch_size=8, learning_rate=1e-2, warmup_steps=1, checkpoint_every=3,
                      grad_accum_steps=2, **settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    train(LoopConfig.build(cfg, student_dir=tiny_student, manifest=tiny_labels, out_dir=out_dir), LocalRuntime())
    return load_file(out_dir / "student" / "model.safetensors")


def test_loop_gradients_with_the_fused_head_equal_the_logits_path(tiny_student, tiny_labels):
    """accumulate_gradients (two micro-batches, global token count) through the real HF forward: same gradients."""
    from storage import soft_labels
    from tasks.models import load_causal_lm, load_tokenizer
    from tasks.train.batches import collate
    from tasks.train.loop import accumulate_gradients
    from tasks.train.runtime import LocalRuntime

    tok = load_tokenizer(tiny_student)
    records = list(soft_labels.read(tiny_labels))
    micro = [collate(records[i::2], tok.pad_token_id, 8) for i in range(2)]
    objective = build_objective("akl+ce")
    grads, stats = [], []
    for fused in (None, FusedHead(objective)):
        model = load_causal_lm(tiny_student)
        stats.append(accumulate_gradients(model, objective, micro, LocalRuntime(), fused))
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert stats[1][0] == pytest.approx(stats[0][0], rel=1e-6)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


def test_training_with_the_fused_head_gives_the_plain_weights(tiny_student, tiny_labels, tmp_path):
    """Three optimizer steps (two micro-batches each) through the loop: train.fused_head=true = the logits path.
    Same losses to 1e-6; weights to 2e-4 absolute after 3 AdamW steps at lr 1e-2: Adam divides each gradient
    entry by its own magnitude, so float round-off in entries near zero moves the weights by up to ~lr * 1e-2
    (the gradients themselves agree to 1e-5 relative: the test above)."""
    import json

    plain = _train_weights(tiny_student, tiny_labels, tmp_path / "plain")
    fused = _train_weights(tiny_student, tiny_labels, tmp_path / "fused", fused_head=True)
    assert plain.keys() == fused.keys()
    for name in plain:
        torch.testing.assert_close(fused[name], plain[name], rtol=1e-4, atol=2e-4, msg=name)
    logs = [[json.loads(line) for line in (tmp_path / run / "train_log.jsonl").read_text().splitlines()] for run in ("plain", "fused")]
    assert len(logs[0]) == len(logs[1]) == 3
    for a, b in zip(*logs):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6) and b["loss_fkl"] == pytest.approx(a["loss_fkl"], rel=1e-6)


def test_fused_head_with_fsdp_is_refused():
    from tasks.config import TrainConfig

    with pytest.raises(ValueError, match="fused_head"):
        TrainConfig(fused_head=True, strategy="fsdp")
