"""Multi-teacher merge and routing (tasks/teacher/merge.py) against dense float64 references."""

import numpy as np
import pytest

from storage import soft_labels
from storage.errors import UserError
from tasks.teacher.extract import tail_logmass
from tasks.teacher.merge import MERGE_RULE, MergeError, merge_label_sets, route_label_sets, routing_from_column

V = 12
TOK = "tok"


def _dense(seed, n_rows, lengths, scale=2.0):
    """Per row, per member-independent dense log-probs [T, V] (float64)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_rows):
        logits = rng.normal(size=(lengths[i], V)) * scale
        out.append(logits - np.logaddexp.reduce(logits, axis=1, keepdims=True))
    return out


def _write_member(out, dense, k, responses, *, teacher, codec="plain-f32", split="train", tokenizer=TOK,
                  source="reference", shard_rows=3, example_ids=None):
    meta = {"k": k, "tokenizer_hash": tokenizer, "vocab_size": V, "codec": codec, "split": split, "mode": "score",
            "response_source": source, "teacher_model": teacher, "teacher_hash": f"h-{teacher}",
            "teacher_key": f"key-{teacher}", "logprobs_mode": "raw_logprobs"}
    rows = []
    for i, (lp, resp) in enumerate(zip(dense, responses)):
        lp32 = lp.astype(np.float32)
        order = np.argsort(-lp32, axis=1, kind="stable")[:, :k]
        top = np.take_along_axis(lp32, order, axis=1)
        rows.append({
            "sample_id": f"{teacher}-{i}", "example_id": (example_ids or [f"e{j}" for j in range(len(dense))])[i],
            "split": split, "response_source": source, "prompt_ids": [1, 2, 3 + i % 4], "response_ids": list(resp),
            "topk_ids": order, "topk_logprobs": top, "token_logprob": lp32[np.arange(len(resp)), resp],
            "tail_logmass": tail_logmass(top).astype(np.float32),
        })
    records = [soft_labels.write_shard(out, s, rows[i:i + shard_rows], meta)
               for s, i in enumerate(range(0, len(rows), shard_rows))]
    return str(soft_labels.write_manifest(out, records, meta))


def _setup(tmp_path, ks, n_rows=5, seed=0, weights=None, **kw):
    lengths = [2 + i % 3 for i in range(n_rows)]
    rng = np.random.default_rng(99)
    responses = [rng.integers(0, V, size=t).tolist() for t in lengths]
    dense = [_dense(seed + m, n_rows, lengths) for m in range(len(ks))]
    manifests = [_write_member(tmp_path / f"m{m}", dense[m], k, responses, teacher=f"t{m}", **kw) for m, k in enumerate(ks)]
    return manifests, dense, responses


def _reference_lower_bounds(dense, ks, weights, resp_row, row):
    """Dense float64 reference of the rule: lb[t, x] = sum_m w_m p_m(x) [x in top-k_m or x realised]."""
    t_len = len(resp_row)
    lb = np.zeros((t_len, V))
    for lp_all, k, w in zip(dense, ks, weights):
        lp32 = lp_all[row].astype(np.float32).astype(np.float64)
        top = np.argsort(-lp_all[row].astype(np.float32), axis=1, kind="stable")[:, :k]
        known = np.zeros((t_len, V), bool)
        np.put_along_axis(known, top, True, axis=1)
        known[np.arange(t_len), resp_row] = True
        lb += w * np.where(known, np.exp(lp32), 0.0)
    return lb


def test_full_vocabulary_merge_equals_dense_mean(tmp_path):
    manifests, dense, responses = _setup(tmp_path, [V, V, V])
    out = merge_label_sets(manifests, tmp_path / "merged", log_fn=lambda _: None)
    rows = list(soft_labels.read(out))
    assert len(rows) == 5
    for i, r in enumerate(rows):
        mean = np.mean([np.exp(d[i]) for d in dense], axis=0)  # [T, V]
        got = np.zeros_like(mean)
        np.put_along_axis(got, r["topk_ids"], np.exp(r["topk_logprobs"].astype(np.float64)), axis=1)
        np.testing.assert_allclose(got, mean, rtol=1e-5, atol=1e-7)
        # The members' own tails (float32 round-off of 1 - sum, k = V) are all that is left over.
        assert np.all(np.exp(r["tail_logmass"].astype(np.float64)) < 1e-6)
        np.testing.assert_allclose(np.exp(r["token_logprob"]), mean[np.arange(len(responses[i])), responses[i]], rtol=1e-5)
        assert np.all(np.diff(r["topk_logprobs"], axis=1) <= 0)


@pytest.mark.parametrize("ks,weights", [([4, 4], None), ([3, 5, 4], [0.5, 0.3, 0.2])])
def test_topk_merge_is_exact_lower_bound_and_sums_to_one(tmp_path, ks, weights):
    manifests, dense, responses = _setup(tmp_path, ks)
    out = merge_label_sets(manifests, tmp_path / "merged", weights=weights, log_fn=lambda _: None)
    w = np.full(len(ks), 1 / len(ks)) if weights is None else np.asarray(weights) / sum(weights)
    manifest = soft_labels.load_manifest(out)
    assert manifest["metadata"]["k"] == max(ks)
    for i, r in enumerate(soft_labels.read(out)):
        resp = np.asarray(responses[i])
        t_len = resp.size
        mean = sum(wm * np.exp(d[i]) for wm, d in zip(w, dense))
        lb = _reference_lower_bounds(dense, ks, w, resp, i)
        p = np.exp(r["topk_logprobs"].astype(np.float64))
        # The entries are the rule's lower bounds, which never exceed the dense mean.
        np.testing.assert_allclose(p, np.take_along_axis(lb, r["topk_ids"], axis=1), rtol=1e-5, atol=1e-8)
        assert np.all(p <= np.take_along_axis(mean, r["topk_ids"], axis=1) * (1 + 1e-5) + 1e-8)
        # The kept ids are the k largest lower bounds.
        np.testing.assert_allclose(p, -np.sort(-lb, axis=1)[:, :max(ks)], rtol=1e-5, atol=1e-8)
        # Entries + tail = 1; the tail is what the entries leave.
        np.testing.assert_allclose(p.sum(1) + np.exp(r["tail_logmass"].astype(np.float64)), 1.0, atol=1e-5)
        np.testing.assert_allclose(np.exp(r["tail_logmass"].astype(np.float64)), 1 - p.sum(1), atol=1e-5)
        # The realised token is exact (every member stores its log-prob), inside the top-k or not.
        np.testing.assert_allclose(np.exp(r["token_logprob"]), mean[np.arange(t_len), resp], rtol=1e-5)
        inside = (r["topk_ids"] == resp[:, None])
        if inside.any():
            rows_in = inside.any(1)
            np.testing.assert_allclose(p[inside], mean[np.arange(t_len), resp][rows_in], rtol=1e-5)


def test_merge_metadata_records_members_weights_and_rule(tmp_path):
    manifests, _, _ = _setup(tmp_path, [4, 6])
    out = merge_label_sets(manifests, tmp_path / "merged", weights=[3, 1], k=5, log_fn=lambda _: None)
    meta = soft_labels.load_manifest(out)["metadata"]
    merge = meta["merge"]
    assert merge["rule"] == MERGE_RULE and merge["weights"] == [0.75, 0.25] and merge["k_cap"] == 5 and meta["k"] == 5
    assert [m["teacher_key"] for m in merge["members"]] == ["key-t0", "key-t1"]
    assert [m["teacher_hash"] for m in merge["members"]] == ["h-t0", "h-t1"]
    assert [m["manifest"] for m in merge["members"]] == manifests
    assert meta["response_source"] == "reference" and meta["tokenizer_hash"] == TOK
    assert meta["teacher_key"] not in ("key-t0", "key-t1")
    other = merge_label_sets(manifests, tmp_path / "merged2", weights=[1, 3], k=5, log_fn=lambda _: None)
    assert soft_labels.load_manifest(other)["metadata"]["teacher_key"] != meta["teacher_key"]


def test_merge_rerun_writes_nothing_and_compact_codec_reads(tmp_path):
    manifests, _, _ = _setup(tmp_path, [4, 4], codec="compact-v1")
    out = merge_label_sets(manifests, tmp_path / "merged", shard_rows=2, log_fn=lambda _: None)
    folder = tmp_path / "merged"
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    lines = []
    merge_label_sets(manifests, folder, shard_rows=2, log_fn=lines.append)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    assert "3 already complete" in lines[0]
    assert not any(".tmp-" in p.name for p in folder.iterdir())
    assert soft_labels.load_manifest(out)["metadata"]["codec"] == "compact-v1"
    assert len(list(soft_labels.read(out))) == 5


def test_merge_refuses_different_responses_tokenizers_and_bad_settings(tmp_path):
    lengths = [2, 3, 4]
    dense = _dense(0, 3, lengths)
    a = _write_member(tmp_path / "a", dense, 4, [[1, 2], [3, 4, 5], [6, 7, 8, 9]], teacher="a")
    b = _write_member(tmp_path / "b", dense, 4, [[1, 2], [3, 4, 6], [6, 7, 8, 9]], teacher="b", source="teacher_sample")
    with pytest.raises(MergeError, match=r"b/manifest.json: row 1 \(sample b-1, example e1\) differs from .*a/manifest.json "
                                         r"\(sample a-1, example e1\) in field response_ids; members generated different"):
        merge_label_sets([a, b], tmp_path / "out", log_fn=lambda _: None)
    c = _write_member(tmp_path / "c", dense, 4, [[1, 2], [3, 4, 5], [6, 7, 8, 9]], teacher="c", tokenizer="other")
    with pytest.raises(MergeError, match="c/manifest.json: field tokenizer_hash is 'other'"):
        merge_label_sets([a, c], tmp_path / "out", log_fn=lambda _: None)
    with pytest.raises(MergeError, match="largest member k"):
        merge_label_sets([a, a], tmp_path / "out", k=5, log_fn=lambda _: None)
    with pytest.raises(MergeError, match="weights"):
        merge_label_sets([a, a], tmp_path / "out", weights=[1, 0], log_fn=lambda _: None)
    with pytest.raises(MergeError, match="at least 2"):
        merge_label_sets([a], tmp_path / "out", log_fn=lambda _: None)
    assert issubclass(MergeError, UserError)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_routing_takes_each_example_from_its_member(tmp_path):
    lengths = [2, 3, 4, 2]
    dense0, dense1 = _dense(0, 4, lengths), _dense(1, 4, lengths)
    rng = np.random.default_rng(5)
    resp0 = [rng.integers(0, V, size=t).tolist() for t in lengths]
    resp1 = [rng.integers(0, V, size=t).tolist() for t in lengths]  # routing allows different responses
    m0 = _write_member(tmp_path / "m0", dense0, 6, resp0, teacher="t0", source="teacher_sample")
    m1 = _write_member(tmp_path / "m1", dense1, 4, resp1, teacher="t1", source="teacher_sample")
    table = [{"example_id": f"e{i}", "task": ["arith", "colours"][i % 2]} for i in range(4)]
    routing = routing_from_column(table, "task", {"arith": 0, "colours": 1})
    assert routing == {"e0": 0, "e1": 1, "e2": 0, "e3": 1}
    out = route_label_sets([m0, m1], {**routing, "elsewhere": 1}, tmp_path / "routed", routing_source="task",
                           log_fn=lambda _: None)
    meta = soft_labels.load_manifest(out)["metadata"]
    assert meta["k"] == 4 and meta["merge"]["rule"] == "route-v1" and meta["merge"]["routing_source"] == "task"
    rows = list(soft_labels.read(out))
    assert [r["example_id"] for r in rows] == ["e0", "e1", "e2", "e3"]
    for i, r in enumerate(rows):
        dense, resp = ((dense0, resp0) if routing[f"e{i}"] == 0 else (dense1, resp1))
        lp = dense[i].astype(np.float32).astype(np.float64)
        assert r["response_ids"].tolist() == resp[i]
        top = np.argsort(-dense[i].astype(np.float32), axis=1, kind="stable")[:, :4]
        np.testing.assert_array_equal(r["topk_ids"], top)
        kept = np.take_along_axis(lp, top, axis=1)
        np.testing.assert_allclose(r["topk_logprobs"], kept, rtol=1e-6)
        np.testing.assert_allclose(np.exp(r["tail_logmass"].astype(np.float64)), 1 - np.exp(kept).sum(1), atol=1e-6)
    with pytest.raises(MergeError, match="example e3 .* has no routing entry"):
        route_label_sets([m0, m1], {"e0": 0, "e1": 1, "e2": 0}, tmp_path / "r2", log_fn=lambda _: None)
    with pytest.raises(MergeError, match="members are 0..1"):
        route_label_sets([m0, m1], {"e0": 2}, tmp_path / "r3", log_fn=lambda _: None)
    with pytest.raises(MergeError, match="'maths' is not in the routing table"):
        routing_from_column([{"example_id": "e0", "task": "maths"}], "task", {"arith": 0})
