"""Evaluation metrics without vLLM: sampled ROUGE-L, reference perplexity, lm-eval skip, and the stage's metrics.json."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tasks.config import EvalConfig, PipelineConfig
from tasks.evaluate import generation
from tasks.evaluate.harness import parse_lm_eval_results, run_lm_eval
from tasks.evaluate.metrics import LOWER_IS_BETTER, METRIC_NAMES, known_metric_names, rouge_l, summarize, summarize_ratio
from tasks.evaluate.perplexity import reference_ids, reference_nll

# ---------- aggregation ----------

def test_summarize_ratio_is_token_weighted_with_bootstrap_interval():
    nll, tokens = [2.0, 9.0, 1.0, 4.0], [2, 3, 1, 4]
    s = summarize_ratio(nll, tokens, transform=np.exp)
    assert s["value"] == pytest.approx(math.exp(16 / 10)) and s["n"] == 4
    assert s["ci_low"] <= s["value"] <= s["ci_high"]
    assert summarize_ratio(nll, tokens, transform=np.exp) == s  # seeded: reproducible
    # examples without tokens or with NaN are dropped; nothing left gives NaN with n=0
    assert summarize_ratio([1.0, float("nan"), 3.0], [1, 2, 0])["n"] == 1
    empty = summarize_ratio([], [])
    assert empty["n"] == 0 and math.isnan(empty["value"])


def test_new_metrics_are_gateable():
    assert {"rouge_l_sampled", "perplexity"} <= set(METRIC_NAMES) and "perplexity" in LOWER_IS_BETTER
    assert known_metric_names(["arc_easy"]) == set(METRIC_NAMES) | {"lm_eval:arc_easy"}
    cfg = PipelineConfig.model_validate({"eval": {"sample_seeds": 3}, "promotion": {"gate": {"rules": [
        {"metric": "perplexity", "kind": "no_regression", "higher_is_better": False, "tolerance": 0.5},
        {"metric": "rouge_l_sampled", "kind": "relative_to_teacher", "threshold": 0.9}]}}})
    assert [r.metric for r in cfg.promotion.gate.rules] == ["perplexity", "rouge_l_sampled"]


def test_eval_config_defaults_are_fast_and_validated():
    cfg = EvalConfig()
    assert cfg.sample_seeds == 0 and cfg.lm_eval_tasks == [] and cfg.lm_eval_limit is None
    assert EvalConfig(sample_seeds=3).sample_seeds == 3
    with pytest.raises(Exception, match="sample_seeds"):
        EvalConfig(sample_seeds=-1)
    with pytest.raises(Exception, match="lm_eval_task"):
        EvalConfig(lm_eval_task=["x"])  # misspelt key is an error, not a silent default


# ---------- sampled generation ----------

class _Out:
    def __init__(self, ids):
        self.outputs = [type("C", (), {"token_ids": ids})()]


class _FakeLLM:
    """Records the one generate() call; answers each request with [request index, seed or -1]."""

    def __init__(self):
        self.calls = []

    def generate(self, requests, params, use_tqdm=False):
        self.calls.append((requests, params))
        return [_Out([i, -1 if p.seed is None else p.seed]) for i, p in enumerate(params)]


def test_replica_generates_greedy_and_all_seeds_in_one_engine_call():
    replica = object.__new__(generation.GenerationReplica)  # no engine start
    replica.llm = _FakeLLM()
    prompts = [[1, 2], [1, 3, 4], [1]]
    seeds = generation.sample_seed_values(2)
    out = replica.generate(prompts, 7, seeds)
    assert len(replica.llm.calls) == 1
    requests, params = replica.llm.calls[0]
    assert [r["prompt_token_ids"] for r in requests] == prompts * 3
    assert all(p.temperature == 0.0 and p.max_tokens == 7 for p in params[:3])
    assert all(p.temperature == 1.0 and p.top_p == 1.0 and p.max_tokens == 7 for p in params[3:])
    assert len({p.seed for p in params[3:]}) == 6  # one distinct, reproducible seed per (seed, prompt)
    assert [ids[0] for ids in out["greedy"]] == [0, 1, 2]
    assert [[ids[0] for ids in run] for run in out["sampled"]] == [[3, 4, 5], [6, 7, 8]]
    assert out["sampled"][1][2][1] == generation.request_seed(seeds[1], 2)
    assert replica.greedy(prompts, 7) == out["greedy"]


class _CharTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"w{i}" for i in ids)


def test_rouge_l_sampled_is_the_mean_over_seeds_per_example():
    prompts = [{"example_id": "a", "prompt": "p", "references": ["w1 w2"]}, {"example_id": "b", "prompt": "q", "references": []}]
    sampled = [[[1, 2], [5]], [[1], [5]], [[7], [5]]]  # 3 seeds x 2 prompts
    rows = generation.score_sampled(_CharTokenizer(), prompts, sampled)
    expected = np.mean([rouge_l("w1 w2", ["w1 w2"]), rouge_l("w1", ["w1 w2"]), rouge_l("w7", ["w1 w2"])])
    assert rows[0]["rouge_l_sampled"] == pytest.approx(expected) and rows[0]["responses"] == ["w1 w2", "w1", "w7"]
    assert math.isnan(rows[1]["rouge_l_sampled"])  # no references: excluded by summarize
    assert summarize([r["rouge_l_sampled"] for r in rows])["n"] == 1


# ---------- perplexity ----------

def test_reference_ids_join_prompt_and_end_with_eos(tiny_student):
    from tasks.models import load_tokenizer

    tok = load_tokenizer(tiny_student)
    prompt = tok("What is 3 plus 5?\nAnswer:")["input_ids"]
    ids = reference_ids(tok, prompt, "8")
    assert ids[-1] == tok.eos_token_id and tok.decode(ids[:-1]) == " 8"
    newline_prompt = tok("What is 3 plus 5?\n")["input_ids"]
    assert tok.decode(reference_ids(tok, newline_prompt, "8")[:-1]) == "8"


def test_reference_nll_matches_a_single_unpadded_forward(tiny_student):
    from tasks.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(tiny_student)
    texts = ["What is 3 plus 5?\nAnswer:", "Reverse the words: lamp pencil castle\nAnswer:", "Count: a b\nAnswer:"]
    prompts = [{"example_id": f"e{i}", "prompt_ids": tok(t)["input_ids"], "references": refs}
               for i, (t, refs) in enumerate(zip(texts, [["8", "The answer is 8."], ["castle pencil lamp"], []]))]
    rows = reference_nll(tiny_student, prompts, batch_size=2)
    assert [r["example_id"] for r in rows] == ["e0", "e1"]  # no references: not scored
    model = load_causal_lm(tiny_student).eval()
    for row, p in zip(rows, prompts):
        ref = reference_ids(tok, p["prompt_ids"], p["references"][0])  # the first reference only
        ids = torch.tensor([p["prompt_ids"] + ref])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        n = len(p["prompt_ids"])
        expected = -logp[torch.arange(n - 1, ids.shape[1] - 1), ids[0, n:]].sum()
        assert row["tokens"] == len(ref)
        assert row["nll"] == pytest.approx(float(expected), rel=1e-4)


# ---------- lm-eval-harness ----------

def test_distribution_scores_packed_equal_padded_per_example(tiny_student, tiny_labels):
    """The evaluation's student forward packs several held-out examples per row; every example's KL, reverse KL
    and top-1 agreement stay those of its own padded row."""
    from tasks.evaluate.distribution import distribution_scores

    padded = distribution_scores(tiny_student, tiny_labels, batch_size=7, packing=False)
    # the labels' sequences are 7-12 tokens: 24-token rows hold two or three
    packed = distribution_scores(tiny_student, tiny_labels, batch_size=7, packing=True, packing_max_tokens=24)
    assert [r["example_id"] for r in packed] == [r["example_id"] for r in padded] and len(padded) > 7
    for a, b in zip(padded, packed):
        assert b["tokens"] == a["tokens"] > 0
        for key in ("kl_to_teacher", "reverse_kl_to_teacher", "top1_agreement"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["example_id"], key)
    assert len({round(r["kl_to_teacher"], 6) for r in padded}) > 1  # per example, not one batch value
    from storage import soft_labels
    from tasks.train.packing import collate_packed

    assert collate_packed(list(soft_labels.read(tiny_labels))[:7], 0, 8, max_tokens=24)["input_ids"].shape[0] < 7


def test_lm_eval_missing_is_skipped_with_a_clear_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    messages = []
    res = run_lm_eval("/nowhere", ["arc_easy"], log_fn=messages.append)
    assert res["status"] == "skipped" and res["metrics"] == {} and res["tasks"] == ["arc_easy"]
    assert "not installed" in res["reason"] and "pip install lm-eval" in res["reason"]
    assert messages and "SKIPPED" in messages[0] and "arc_easy" in messages[0]


def test_lm_eval_failure_offline_is_skipped(monkeypatch):
    fake = type(sys)("lm_eval")

    def simple_evaluate(**kwargs):
        raise ConnectionError("hub unreachable")

    fake.simple_evaluate = simple_evaluate
    monkeypatch.setitem(sys.modules, "lm_eval", fake)
    res = run_lm_eval("/nowhere", ["arc_easy"], log_fn=lambda m: None)
    assert res["status"] == "skipped" and "ConnectionError: hub unreachable" in res["reason"] and "cache" in res["reason"]


def test_lm_eval_results_become_gateable_metrics_with_intervals():
    out = {"results": {"arc_easy": {"alias": "arc_easy", "acc,none": 0.5, "acc_stderr,none": 0.05, "acc_norm,none": 0.6, "acc_norm_stderr,none": 0.04},
                       "gsm8k": {"exact_match,strict-match": 0.1, "exact_match_stderr,strict-match": "N/A"}},
           "n-samples": {"arc_easy": {"original": 2376, "effective": 100}}}
    res = parse_lm_eval_results(out, ["arc_easy", "gsm8k", "missing_task"])
    arc = res["metrics"]["lm_eval:arc_easy"]
    assert arc["value"] == 0.6 and arc["source"] == "acc_norm,none" and arc["n"] == 100
    assert arc["ci_low"] == pytest.approx(0.6 - 1.96 * 0.04, abs=1e-3) and arc["ci_high"] == pytest.approx(0.6 + 1.96 * 0.04, abs=1e-3)
    gsm = res["metrics"]["lm_eval:gsm8k"]
    assert gsm["value"] == 0.1 and math.isnan(gsm["ci_low"])
    assert res["status"] == "partial" and "missing_task" in res["reason"]


# ---------- the stage, with generation faked (vLLM is covered by tests/test_e2e_flow.py) ----------

def test_eval_stage_writes_new_metrics_and_records_skips(tmp_path, monkeypatch, tiny_student, tiny_labels):
    from storage import soft_labels
    from tasks.evaluate import stage
    from tasks.models import load_tokenizer

    tok = load_tokenizer(tiny_student)
    records = list(soft_labels.read(tiny_labels))  # the held-out labels; the teacher's responses are the references
    refs = [tok.decode(r["response_ids"].tolist()).strip() for r in records]
    prompts_path = tmp_path / "test.parquet"
    pq.write_table(pa.Table.from_pylist([{"example_id": r["example_id"], "prompt": f"p{i}", "prompt_ids": r["prompt_ids"].tolist(),
                                          "references": [ref]} for i, (r, ref) in enumerate(zip(records, refs))]), prompts_path)
    eval_manifest = tiny_labels

    calls = []

    def fake_generate(model_dir, cfg, prompt_ids, max_new_tokens, seeds):
        calls.append(seeds)
        exact = [r["response_ids"].tolist() for r in records]
        return {"greedy": exact, "sampled": [exact if s == seeds[0] else [[5]] * len(exact) for s in seeds]}

    monkeypatch.setattr(stage, "generate_student", fake_generate)
    monkeypatch.setattr("tasks.ray_runtime.ensure_ray", lambda address=None, **kw: None)
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    logs = []
    cfg = EvalConfig(sample_seeds=2, lm_eval_tasks=["arc_easy"], max_new_tokens=4)
    # The tiny student doubles as the teacher: its teacher-side numbers must equal the student-side ones.
    result = stage.run_eval_stage(cfg, tiny_student, str(eval_manifest), str(prompts_path), tmp_path / "eval", log_fn=logs.append,
                                  teacher_dir=tiny_student)

    assert calls == [[10, 20], [10, 20]]  # one engine call with both seeds per model
    metrics = json.loads(Path(result["metrics_file"]).read_text())
    student = metrics["student"]
    assert student["exact_match"]["value"] == 1.0
    n = len(records)
    assert student["rouge_l_sampled"]["n"] == n and 0 < student["rouge_l_sampled"]["value"] < 1
    assert student["top1_agreement"]["n"] == n
    ppl = student["perplexity"]
    assert ppl["n"] == n and ppl["value"] > 1 and ppl["ci_low"] <= ppl["value"] <= ppl["ci_high"]
    assert metrics["sampling"]["seeds"] == [10, 20] and metrics["sampling"]["temperature"] == 1.0
    assert metrics["sampling"]["who"] == "student and teacher"
    teacher = metrics["teacher"]
    assert teacher["perplexity"] == ppl and teacher["rouge_l_sampled"] == student["rouge_l_sampled"]
    assert metrics["lm_eval"]["status"] == "skipped" and "not installed" in metrics["lm_eval"]["reason"]
    assert not any(k.startswith("lm_eval:") for k in student)
    assert any("SKIPPED" in m for m in logs)
    gens = [json.loads(line) for line in (tmp_path / "eval" / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == n and all(len(g["student_sampled"]) == 2 and len(g["teacher_sampled"]) == 2 for g in gens)


def test_eval_stage_default_is_greedy_only(tmp_path, monkeypatch, tiny_student, tiny_labels):
    """sample_seeds=0: no sampled requests, no rouge_l_sampled, no lm_eval record."""
    from tasks.evaluate import stage

    seen = []
    monkeypatch.setattr(stage, "generate_student", lambda *a: seen.append(a[-1]) or {"greedy": [], "sampled": []})
    monkeypatch.setattr("tasks.ray_runtime.ensure_ray", lambda address=None, **kw: None)
    prompts_path = tmp_path / "empty.parquet"
    pq.write_table(pa.Table.from_pylist([], schema=pa.schema([("example_id", pa.string()), ("prompt", pa.string()),
                                                              ("prompt_ids", pa.list_(pa.int32())), ("references", pa.list_(pa.string()))])), prompts_path)
    result = stage.run_eval_stage(EvalConfig(), tiny_student, tiny_labels, str(prompts_path), tmp_path / "eval", log_fn=lambda m: None)
    assert seen == [[]]
    assert "rouge_l_sampled" not in result["metrics"]["student"] and "lm_eval" not in result["metrics"] and "sampling" not in result["metrics"]
