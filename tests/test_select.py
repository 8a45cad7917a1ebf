"""Uncertainty selection (tasks/select): scores, the choice, growing r, files, prompt filtering; one vLLM run."""

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.errors import UserError
from tasks.data import PROMPT_SCHEMA
from tasks.select.scores import SelectionError, method_scores, position_stats, prompt_stats, random_score
from tasks.select.selection import filter_prompts, load_selection, select
from tasks.select.stage import run_selection


def test_position_stats_match_hand_computation():
    p = np.array([[0.5, 0.3, 0.1], [0.9, 0.05, 0.05]])
    tail = 1 - p.sum(1)  # 0.1, 0.0
    with np.errstate(divide="ignore"):
        s = position_stats(np.log(p), np.log(tail))
    ent0 = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.1 * math.log(0.1) + 0.1 * math.log(0.1))
    ent1 = -(0.9 * math.log(0.9) + 2 * 0.05 * math.log(0.05))  # empty tail bucket: 0 log 0 = 0
    np.testing.assert_allclose(s["entropy"], [ent0, ent1], rtol=1e-12)
    np.testing.assert_allclose(s["margin"], [0.2, 0.85], rtol=1e-12)
    np.testing.assert_allclose(s["confidence"], [0.5, 0.9], rtol=1e-12)
    rows = [{"example_id": "a", "prompt_ids": [1, 2, 3], "response_ids": [4, 5], "topk_logprobs": np.log(p),
             "tail_logmass": np.log(np.maximum(tail, 1e-300))}]
    stats = prompt_stats(rows)["a"]
    assert stats["prompt_tokens"] == 3 and stats["response_tokens"] == 2
    np.testing.assert_allclose(stats["margin"], (0.2 + 0.85) / 2)


def test_select_orders_grow_as_superset_and_refuse_shrinking():
    scores = {f"e{i}": float(s) for i, s in enumerate([0.3, 0.9, 0.1, 0.5, 0.7, 0.2, 0.8, 0.4, 0.6, 0.0])}
    first = select(scores, 0.3, "entropy")  # highest first
    assert first.selected == {"e1", "e6", "e4"} and first.new == first.selected and first.count == 3
    assert select(scores, 0.2, "margin").selected == {"e9", "e2"}  # smallest first
    # Growing r keeps the previous choice, even if the scores changed since, and reports only the difference.
    changed = {**scores, "e1": 0.0}
    grown = select(changed, 0.5, "entropy", previous=first.selected)
    assert grown.selected >= first.selected and len(grown.selected) == 5
    assert grown.new == grown.selected - first.selected == {"e8", "e3"}
    with pytest.raises(SelectionError, match="previous selection already holds 3"):
        select(scores, 0.2, "entropy", previous=first.selected)
    with pytest.raises(SelectionError, match=r"in \(0, 1\]"):
        select(scores, 0.0, "entropy")
    with pytest.raises(SelectionError, match="unknown selection method"):
        select(scores, 0.5, "loss")
    assert issubclass(SelectionError, UserError)
    # Random: seeded per example, independent of order; growing r is a superset without `previous`.
    r1 = method_scores({ex: {} for ex in scores}, "random", seed=3)
    assert r1 == {ex: random_score(3, ex) for ex in reversed(list(scores))}
    assert r1 != method_scores({ex: {} for ex in scores}, "random", seed=4)
    assert select(r1, 0.2, "random").selected <= select(r1, 0.6, "random").selected


class _FakeScorer:
    """Stands in for the vLLM student (the integration test below runs the real one)."""

    def __init__(self, stats):
        self.calls, self._stats = 0, stats

    def stats(self, prompts, k, temperature, max_new_tokens, seed):
        self.calls += 1
        return {p["example_id"]: self._stats[p["example_id"]] for p in prompts}


def _prompts_file(path, n):
    rows = [{"example_id": f"e{i}", "prompt": f"q{i}", "prompt_ids": list(range(1, 2 + i % 3)), "references": [f"a{i}"]}
            for i in range(n)]
    pq.write_table(pa.Table.from_pylist(rows, schema=PROMPT_SCHEMA), path)
    return path


def test_run_selection_manifest_tokens_saved_growth_and_filter(tmp_path, tiny_student):
    prompts = _prompts_file(tmp_path / "prompts.parquet", 10)
    rng = np.random.default_rng(0)
    stats = {f"e{i}": {"entropy": float(rng.random()), "margin": float(rng.random()), "confidence": float(rng.random()),
                       "prompt_tokens": 1 + i % 3, "response_tokens": 2 + i} for i in range(10)}
    scorer = _FakeScorer(stats)
    lines = []
    m1 = run_selection(prompts, tiny_student, tmp_path / "sel1", method="margin", fraction=0.3, top_k=8,
                       scorer=scorer, log_fn=lines.append)
    manifest, table = load_selection(m1)
    chosen = {ex for ex, _ in sorted(stats.items(), key=lambda kv: kv[1]["margin"])[:3]}
    assert {r["example_id"] for r in table if r["selected"]} == chosen
    assert [r["example_id"] for r in table] == [f"e{i}" for i in range(10)]
    cost = {ex: s["prompt_tokens"] + s["response_tokens"] for ex, s in stats.items()}
    assert manifest["teacher_tokens"]["estimate"] == "prompt_plus_student_response"
    assert manifest["teacher_tokens_saved"] == sum(cost.values()) - sum(cost[ex] for ex in chosen)
    assert (manifest["method"], manifest["fraction"], manifest["seed"], manifest["order"]) == ("margin", 0.3, 0, "ascending")
    assert (manifest["num_prompts"], manifest["num_selected"], manifest["num_to_label"]) == (10, 3, 3)
    assert not any(".tmp-" in p.name for p in (tmp_path / "sel1").iterdir())
    # Growing r reuses the student's scores (no second student pass) and labels only the difference.
    m2 = run_selection(prompts, tiny_student, tmp_path / "sel2", method="margin", fraction=0.6, top_k=8,
                       previous=m1, scorer=scorer, log_fn=lines.append)
    assert scorer.calls == 1 and "reusing" in lines[-2]
    manifest2, table2 = load_selection(m2)
    selected2 = {r["example_id"] for r in table2 if r["selected"]}
    new2 = {r["example_id"] for r in table2 if r["new"]}
    assert selected2 >= chosen and new2 == selected2 - chosen and len(selected2) == 6
    assert manifest2["num_to_label"] == 3 and manifest2["num_previously_selected"] == 3
    assert manifest2["teacher_tokens"]["to_label"] == sum(cost[ex] for ex in new2)
    assert manifest2["previous"] == str(m1)
    # The filtered prompts are the selected rows, in prompt order, with the prompts schema.
    out = filter_prompts(prompts, m2, tmp_path / "only_new.parquet", only_new=True)
    got = pq.read_table(out["path"])
    assert got.schema.equals(PROMPT_SCHEMA) and out["rows"] == 3
    assert got.column("example_id").to_pylist() == [f"e{i}" for i in range(10) if f"e{i}" in new2]
    # A modified table is refused.
    (tmp_path / "sel2" / "selection.parquet").write_bytes(b"x")
    with pytest.raises(SelectionError, match="does not match the checksum"):
        filter_prompts(prompts, m2, tmp_path / "x.parquet")


@pytest.mark.integration
def test_selection_with_vllm_labels_only_the_chosen_prompts(ray_local, tiny_student, prompts, tmp_path):
    import ray

    from storage import soft_labels
    from tasks.config import EngineConfig
    from tasks.select.stage import StudentScorer

    path = tmp_path / "prompts.parquet"
    pq.write_table(pa.Table.from_pylist([{**p, "prompt": None} for p in prompts], schema=PROMPT_SCHEMA), path)
    # One engine: the tiny model scores its own uncertainty, then labels (as a teacher) what was selected.
    actor = ray.remote(StudentScorer).options(num_cpus=1).remote(tiny_student, EngineConfig(max_model_len=128), 8)
    try:
        sel = run_selection(path, tiny_student, tmp_path / "sel", method="entropy", fraction=0.4, top_k=8,
                            max_new_tokens=6, scorer=actor, log_fn=lambda _: None)
        manifest, table = load_selection(sel)
        chosen = {r["example_id"] for r in table if r["selected"]}
        assert len(chosen) == 2 == manifest["num_selected"]
        by_entropy = sorted(table, key=lambda r: (-r["entropy"], r["example_id"]))
        assert chosen == {r["example_id"] for r in by_entropy[:2]}
        assert all(r["response_tokens"] >= 1 and 0 <= r["margin"] <= r["confidence"] <= 1 for r in table)
        assert 0 < manifest["teacher_tokens_saved"] < manifest["teacher_tokens"]["all"]
        filtered = filter_prompts(path, sel, tmp_path / "selected.parquet")
        meta = {"k": 8, "tokenizer_hash": "tiny", "teacher_key": "test", "codec": "compact-v1"}
        sampling = dict(temperature=1.0, top_p=1.0, max_new_tokens=6, n=1, seed=0)
        from tasks.teacher.stage import capture_on_replicas

        labels, _, _ = capture_on_replicas([actor], pq.read_table(filtered["path"]).to_pylist(), tmp_path / "labels",
                                           split="train", metadata=meta, shard_rows=2, sampling=sampling)
        assert {r["example_id"] for r in soft_labels.read(labels)} == chosen
    finally:
        ray.kill(actor)
