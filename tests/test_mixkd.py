"""MixKD: plan reproducibility and resume, alignment, teacher labels on mixed embeddings, the three-term loss."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from storage import soft_labels
from tasks.augment import (
    MixKDConfig,
    MixKDLoss,
    MixKDWeights,
    align_pair,
    collate,
    draw_epoch,
    frame_logits,
    interpolated_labels,
    load_plan,
    load_sequences,
    mixed_batch,
    mixed_embeddings,
    read_epoch,
    run_mixkd_teacher_stage,
    run_plan_stage,
    write_plan,
)
from tasks.augment.plan import PlanError
from tasks.objectives import SparseLabels, build_objective

IDS = [f"s{i:02d}" for i in range(10)]


def _plan_bytes(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_plan_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = write_plan(tmp_path / "a", IDS, epochs=3, alpha=0.4, seed=5, log_fn=lambda _: None).parent
    b = write_plan(tmp_path / "b", IDS, epochs=3, alpha=0.4, seed=5, log_fn=lambda _: None).parent
    c = write_plan(tmp_path / "c", IDS, epochs=3, alpha=0.4, seed=6, log_fn=lambda _: None).parent
    assert _plan_bytes(a) == _plan_bytes(b)
    for name in ("epoch-0000.parquet", "epoch-0001.parquet", "epoch-0002.parquet"):
        assert (a / name).read_bytes() != (c / name).read_bytes()
    plan = load_plan(a)
    rows = [r for e in range(3) for r in read_epoch(plan, e)]
    assert len(rows) == 30 and all(r["i"] != r["j"] for r in rows)
    assert all(0.0 < r["lam"] < 1.0 for r in rows)
    for e in range(3):  # i runs over a permutation: every sequence is side i once per epoch
        assert sorted(r["i"] for r in read_epoch(plan, e)) == list(range(10))
    assert [r["plan_row_id"] for r in read_epoch(plan, 1)][:2] == ["e0001-r000000", "e0001-r000001"]
    assert all(r["id_i"] == IDS[r["i"]] and r["id_j"] == IDS[r["j"]] for r in rows)
    assert json.loads((a / "manifest.json").read_text())["seed"] == 5


def test_plan_resumes_by_epoch(tmp_path):
    d = write_plan(tmp_path / "p", IDS, epochs=2, alpha=0.4, seed=1, log_fn=lambda _: None).parent
    before = _plan_bytes(d)
    stat0 = (d / "epoch-0000.parquet").stat()
    (d / "epoch-0001.parquet").unlink()
    (d / "manifest.json").unlink()
    logs = []
    write_plan(d, IDS, epochs=3, alpha=0.4, seed=1, log_fn=logs.append)  # epoch 1 redrawn, epoch 2 added
    assert logs == ["mixup plan: epoch 0 already drawn, kept"]
    assert (d / "epoch-0000.parquet").stat().st_mtime_ns == stat0.st_mtime_ns
    assert (d / "epoch-0001.parquet").read_bytes() == before["epoch-0001.parquet"]
    assert pq.read_table(d / "epoch-0002.parquet").equals(draw_epoch(IDS, 2, alpha=0.4, seed=1))
    write_plan(d, IDS, epochs=3, alpha=0.2, seed=1, log_fn=logs.append)  # other settings: every epoch redrawn
    assert len(logs) == 1
    (d / "epoch-0002.parquet").write_bytes(b"junk")
    with pytest.raises(PlanError, match="checksum"):
        read_epoch(load_plan(d), 2)
    with pytest.raises(PlanError, match="at least 2"):
        draw_epoch(["only"], 0, alpha=0.4, seed=0)


def test_align_pair_exact():
    p = align_pair([1, 2, 3], [10, 11], [4], [20, 21, 22, 23, 24], pad_id=0)
    # x_i = 1 2 3 10 11 0 ; x_j = 4 20 21 22 23 24 ; L = 6 ; frame starts at s = min(3, 1) = 1
    assert p["x_i"].tolist() == [1, 2, 3, 10, 11, 0] and p["x_j"].tolist() == [4, 20, 21, 22, 23, 24]
    assert p["frame_start"] == 1 and p["length"] == 6
    assert p["mask_i"].tolist() == [False, False, True, True, False]   # tokens 1..5: i's response is tokens 3, 4
    assert p["mask_j"].tolist() == [True, True, True, True, True]
    b = collate([p], [0.25], pad_id=0)
    assert b.positions.tolist() == [[0, 1, 2, 3, 4]] and b.target_j.tolist() == [[20, 21, 22, 23, 24]]


@pytest.fixture(scope="module")
def teacher(tiny_student):
    from tasks.models import load_causal_lm

    return load_causal_lm(tiny_student).eval()


def test_mixed_embeddings_and_endpoints(teacher):
    pairs = [align_pair([5, 6, 7], [8, 9], [10, 11], [12, 13, 14, 15], pad_id=0)] * 3
    batch = collate(pairs, [1.0, 0.0, 0.3], pad_id=0)
    emb = teacher.get_input_embeddings()
    e = mixed_embeddings(teacher, batch)
    torch.testing.assert_close(e[2], 0.3 * emb(batch.x_i[2]) + 0.7 * emb(batch.x_j[2]), rtol=0, atol=1e-6)
    with torch.no_grad():
        logits = frame_logits(teacher, batch)
        plain_i = teacher(input_ids=batch.x_i[:1]).logits[0]
        plain_j = teacher(input_ids=batch.x_j[:1]).logits[0]
    s = pairs[0]["frame_start"]  # lam = 1 is sequence i teacher-forced, lam = 0 sequence j
    torch.testing.assert_close(logits[0], plain_i[s - 1 : -1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[1], plain_j[s - 1 : -1], rtol=1e-5, atol=1e-5)


def test_teacher_stage_stores_mixed_labels(tmp_path, tiny_student, tiny_labels, teacher):
    cfg = MixKDConfig(epochs=2, top_k=8, batch_size=3, shard_rows=5, seed=3)
    plan_manifest = run_plan_stage(tiny_labels, tmp_path / "plan", cfg, log_fn=lambda _: None)
    logs = []
    manifests = run_mixkd_teacher_stage(tiny_student, tiny_labels, tmp_path / "plan", tmp_path / "mix", cfg,
                                        codec="plain-f32", log_fn=logs.append)
    assert len(manifests) == 2 and len(logs) == 8  # 16 pairs per epoch, 5 per shard -> 4 shards each
    plan = load_plan(plan_manifest.parent)
    sequences = load_sequences(tiny_labels)
    pad = soft_labels.load_manifest(manifests[0])["metadata"]["pad_token_id"]
    meta = soft_labels.load_manifest(manifests[1])["metadata"]
    assert meta["response_source"] == "mixup" and meta["mixup_plan"]["epoch"] == 1 and meta["k"] == 8
    records = list(soft_labels.read(manifests[1]))
    rows = {r["plan_row_id"]: r for r in read_epoch(plan, 1)}
    assert [r["example_id"] for r in records] == sorted(rows)
    batch, stored = mixed_batch(records, rows, sequences, pad)
    with torch.no_grad():
        direct = SparseLabels.from_logits(frame_logits(teacher, batch), 8)
    fm = batch.frame_mask
    assert torch.equal(stored.ids[fm], direct.ids[fm])
    torch.testing.assert_close(stored.logprobs[fm], direct.logprobs[fm], rtol=0, atol=1e-5)
    torch.testing.assert_close(stored.tail_logmass[fm], direct.tail_logmass[fm], rtol=0, atol=1e-5)
    first = records[0]
    row = rows[first["example_id"]]
    p = align_pair(*sequences[row["id_i"]], *sequences[row["id_j"]], pad)
    assert first["prompt_ids"].tolist() == p["x_i"][: p["frame_start"]].tolist()
    # a rerun reuses every shard
    shard = soft_labels.shard_paths(soft_labels.load_manifest(manifests[0]))[0]
    mtime = shard.stat().st_mtime_ns
    logs.clear()
    run_mixkd_teacher_stage(tiny_student, tiny_labels, tmp_path / "plan", tmp_path / "mix", cfg, codec="plain-f32", log_fn=logs.append)
    assert all("already complete" in line for line in logs) and shard.stat().st_mtime_ns == mtime


def _dense_sm(logits, batch):
    """Reference: mixup cross-entropy minus the target entropy, float64, per the docstring's rules."""
    lp = torch.log_softmax(logits.double(), -1)
    total, n = 0.0, 0
    for b in range(lp.shape[0]):
        lam = float(batch.lam[b])
        for t in range(lp.shape[1]):
            mi, mj = bool(batch.mask_i[b, t]), bool(batch.mask_j[b, t])
            if not (mi or mj):
                continue
            yi, yj = int(batch.target_i[b, t]), int(batch.target_j[b, t])
            target = {}
            if mi and mj:
                target[yi] = target.get(yi, 0.0) + lam
                target[yj] = target.get(yj, 0.0) + 1 - lam
            else:
                target[yi if mi else yj] = 1.0
            total += sum(w * (np.log(w) - lp[b, t, y]) for y, w in target.items() if w > 0)
            n += 1
    return float(total) / n


def test_mixkd_loss_terms_exact():
    gen = torch.Generator().manual_seed(0)
    vocab, k = 13, 4
    pairs = [align_pair([1, 2], [3, 4, 5], [1], [3, 7, 8, 9, 10], pad_id=0),
             align_pair([2, 2, 2], [6], [4, 5], [6, 11], pad_id=0)]
    batch = collate(pairs, [0.3, 0.8], pad_id=0)
    bsz, t = batch.target_i.shape
    mix_logits = torch.randn(bsz, t, vocab, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher_mix = SparseLabels.from_logits(torch.randn(bsz, t, vocab, generator=gen) * 2, k)
    orig_logits = torch.randn(2, 3, vocab, generator=gen, requires_grad=True)
    orig_labels = SparseLabels.from_logits(torch.randn(2, 3, vocab, generator=gen), k, target_ids=torch.randint(0, vocab, (2, 3), generator=gen))
    orig_mask = torch.tensor([[True, True, False], [True, True, True]])
    loss_fn = MixKDLoss("fkl+ce", "fkl", MixKDWeights(kd=0.5, sm=2.0, tmkd=3.0))
    total = loss_fn(orig_logits, orig_labels, orig_mask, mix_logits, batch, teacher_mix)
    parts = loss_fn.last_parts
    assert parts["sm"] == pytest.approx(_dense_sm(mix_logits.detach(), batch), rel=1e-5)
    union = batch.mask_i | batch.mask_j
    assert parts["tmkd"] == pytest.approx(float(build_objective("fkl")(mix_logits, teacher_mix, union).detach()), rel=1e-6)
    assert parts["kd"] == pytest.approx(float(build_objective("fkl+ce")(orig_logits, orig_labels, orig_mask).detach()), rel=1e-6)
    assert float(total) == pytest.approx(0.5 * parts["kd"] + 2.0 * parts["sm"] + 3.0 * parts["tmkd"], rel=1e-6)
    assert set(parts) == {"kd", "sm", "tmkd", "kd/fkl", "kd/ce"}
    # the SM gradient is the mixup cross-entropy's
    sm_only = MixKDLoss("ce", "fkl", MixKDWeights(kd=0.0, sm=1.0, tmkd=0.0))
    g = torch.autograd.grad(sm_only(orig_logits, orig_labels, orig_mask, mix_logits, batch, teacher_mix), mix_logits)[0]
    x = mix_logits.detach().clone().requires_grad_(True)
    ref = torch.autograd.grad(_dense_sm_tensor(x, batch), x)[0]
    torch.testing.assert_close(g, ref, rtol=1e-6, atol=1e-9)


def _dense_sm_tensor(logits, batch):
    lp = torch.log_softmax(logits, -1)
    lam = batch.lam.to(lp.dtype)[:, None]
    ce_i = -lp.gather(-1, batch.target_i[..., None])[..., 0]
    ce_j = -lp.gather(-1, batch.target_j[..., None])[..., 0]
    both = batch.mask_i & batch.mask_j
    per = torch.where(both, lam * ce_i + (1 - lam) * ce_j, torch.where(batch.mask_i, ce_i, ce_j))
    union = batch.mask_i | batch.mask_j
    return per[union].sum() / union.sum()


def test_interpolated_labels_same_token_and_one_side():
    p = align_pair([1], [5, 6], [1], [5, 7, 8], pad_id=0)  # tokens 1..3: (5,5) same, (6,7) both, (pad,8) j only
    lab = interpolated_labels(collate([p], [0.25], pad_id=0), vocab_size=10)
    assert lab.ids[0, 0, 0] == 5 and lab.logprobs[0, 0].tolist() == [0.0, float("-inf")]
    assert lab.ids[0, 1].tolist() == [7, 6] and lab.logprobs[0, 1].tolist() == pytest.approx([np.log(0.75), np.log(0.25)])
    assert lab.ids[0, 2, 0] == 8 and lab.logprobs[0, 2].tolist() == [0.0, float("-inf")]


def test_mixed_objective_must_be_a_divergence():
    with pytest.raises(ValueError, match="hard targets"):
        MixKDLoss(mixed="fkl+ce")


@pytest.mark.integration
def test_teacher_stage_in_ray_actor_matches_in_process(tmp_path, ray_local, tiny_student, tiny_labels):
    cfg = MixKDConfig(epochs=1, top_k=8, batch_size=4, seed=9)
    run_plan_stage(tiny_labels, tmp_path / "plan", cfg, log_fn=lambda _: None)
    local = run_mixkd_teacher_stage(tiny_student, tiny_labels, tmp_path / "plan", tmp_path / "a", cfg, log_fn=lambda _: None)
    remote = run_mixkd_teacher_stage(tiny_student, tiny_labels, tmp_path / "plan", tmp_path / "b", cfg, use_ray=True)
    la, lb = soft_labels.load_manifest(local[0]), soft_labels.load_manifest(remote[0])
    assert [s["sha256"] for s in la["shards"]] == [s["sha256"] for s in lb["shards"]]
