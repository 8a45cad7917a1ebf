"""The real flow end to end: real vLLM (CPU), Ray Train, Prefect server and Parquet, on tiny models.

Three runs share one data folder: a KD student, then a CE-only student gated
against the first one as champion, then the CE run again with nothing new (a
scheduled run): every stage comes from the cache and the registry is unchanged.
"""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tasks.config import PipelineConfig

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]  # the module fixture builds demo assets and runs whole flows

BASE = {
    "data": {"max_train_examples": 96, "max_eval_examples": 40, "demo_teacher_steps": 40, "demo_base_steps": 20},
    "teacher": {"top_k": 8, "shard_rows": 40, "max_new_tokens": 12},
    "train": {"steps": 12, "batch_size": 16, "warmup_steps": 2},
    "eval": {"max_new_tokens": 12},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, prefect_server, ray_local):
    from flows.distill import distill

    data_dir = tmp_path_factory.mktemp("e2e")
    kd = {**BASE, "data_dir": str(data_dir), "run_name": "kd",
          "promotion": {"gate": {"rules": [{"metric": "exact_match", "kind": "absolute", "threshold": 0.0}]}}}
    ce = {**BASE, "data_dir": str(data_dir), "run_name": "ce", "train": {**BASE["train"], "objective": "ce"},
          "promotion": {"gate": {"rules": [{"metric": "rouge_l", "kind": "relative_to_champion", "margin": 0.0}]}}}
    again = {**ce, "run_name": "again"}
    paths = [distill(PipelineConfig.model_validate(c)) for c in (kd, ce, again)]
    return data_dir, [json.loads(Path(p).read_text()) for p in paths]


def test_run_json_points_at_existing_outputs(runs):
    _, (kd, ce, _) = runs
    for run in (kd, ce):
        for key in ("soft_labels_manifest", "student_checkpoint", "metrics_file"):
            assert Path(run[key]).exists(), key
        assert set(run["metrics"]["student"]) >= {"exact_match", "rouge_l", "kl_to_teacher", "top1_agreement"}
        assert isinstance(run["decision"]["promoted"], bool) and run["decision"]["rules"]


def test_soft_label_shards_satisfy_invariants(runs):
    from storage import soft_labels

    _, (kd, _, _) = runs
    manifest = json.loads(Path(kd["soft_labels_manifest"]).read_text())
    k = manifest["metadata"]["k"]
    assert k == 8 and manifest["metadata"]["logprobs_mode"] == "raw_logprobs"
    assert manifest["num_rows"] == 96 and len(manifest["shards"]) == 3
    for shard in manifest["shards"]:  # every shard is plain Parquet with the row count the manifest states
        assert pq.read_metadata(Path(kd["soft_labels_manifest"]).parent / shard["path"]).num_rows == shard["rows"]
    rows = 0
    for row in soft_labels.read(kd["soft_labels_manifest"]):
        t = len(row["response_ids"])
        ids, lp = row["topk_ids"], row["topk_logprobs"]
        assert t > 0 and ids.shape == (t, k) and lp.shape == (t, k), "one label row per response token"
        assert len(row["token_logprob"]) == t and len(row["tail_logmass"]) == t
        assert all(len(set(r.tolist())) == k for r in ids), "top-k ids unique per position"
        assert np.all(lp <= 1e-6) and np.all(np.diff(lp, axis=1) <= 1e-6), "log-probs <= 0, sorted descending"
        mass = np.exp(lp.astype(np.float64)).sum(axis=1)
        assert np.all(mass <= 1 + 1e-3)
        np.testing.assert_allclose(np.exp(row["tail_logmass"]), np.clip(1 - mass, 0, 1), atol=5e-3)  # compact-v1 bound, storage/FORMAT.md
        for pos, token in enumerate(row["response_ids"]):  # realised token's log-prob agrees with the top-k
            hit = np.flatnonzero(ids[pos] == token)
            if hit.size:
                assert abs(lp[pos, hit[0]] - row["token_logprob"][pos]) < 2e-2
            else:
                assert row["token_logprob"][pos] <= lp[pos, -1] + 2e-2
        rows += 1
    assert rows == 96


def test_run_report_written(runs):
    _, (kd, _, _) = runs
    report = Path(kd["run_dir"]) / "report.md"
    assert report.exists() and (Path(kd["run_dir"]) / "report.png").stat().st_size > 1000
    text = report.read_text()
    for rule in kd["decision"]["rules"]:
        assert rule["name"] in text


def test_student_checkpoint_loads_in_transformers_and_ran_in_vllm(runs):
    from transformers import AutoModelForCausalLM

    _, (kd, _, _) = runs
    ckpt = Path(kd["student_checkpoint"])
    assert (ckpt / "model.safetensors").exists() and not list(ckpt.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(ckpt, use_safetensors=True)
    assert model.config.num_hidden_layers == 2
    # The evaluation stage generated with this checkpoint in vLLM: one answer per held-out prompt.
    gens = [json.loads(line) for line in (Path(kd["metrics_file"]).parent / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 40 and all("student" in g for g in gens)


def test_metrics_have_intervals_and_match_generations(runs):
    _, (kd, _, _) = runs
    metrics = json.loads(Path(kd["metrics_file"]).read_text())
    gens = [json.loads(line) for line in (Path(kd["metrics_file"]).parent / "generations.jsonl").read_text().splitlines()]
    em = metrics["student"]["exact_match"]
    assert em["n"] == 40 and em["ci_low"] <= em["value"] <= em["ci_high"]
    assert em["value"] == pytest.approx(np.mean([g["student_exact_match"] for g in gens]))
    assert metrics["teacher"]["exact_match"]["value"] == pytest.approx(np.mean([g["teacher_exact_match"] for g in gens]))
    assert 0 <= metrics["student"]["top1_agreement"]["value"] <= 1 and metrics["student"]["kl_to_teacher"]["value"] >= 0


def test_decisions_follow_the_rules_and_registry(runs):
    from storage.registry import ModelRegistry

    data_dir, (kd, ce, _) = runs
    assert kd["decision"]["promoted"] is True  # exact_match >= 0.0 always holds
    expected = ce["metrics"]["student"]["rouge_l"] >= kd["metrics"]["student"]["rouge_l"]
    assert ce["decision"]["promoted"] is expected
    registry = ModelRegistry(data_dir / "registry")
    assert [v.version for v in registry.versions()] == ["v0001", "v0002"]
    assert registry.alias("champion").version == ("v0002" if expected else "v0001")
    assert registry.alias("challenger").version == "v0002"
    assert registry.get("v0002").lineage["train_config"]["objective"] == "ce"


def test_prefect_artifacts_recorded(runs):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def keys():
        async with get_client() as client:
            arts = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["eval-metrics", "run-report", "run-comparison"])))
            return {a.key for a in arts}

    assert asyncio.run(keys()) == {"eval-metrics", "run-report", "run-comparison"}


def test_rerun_with_nothing_new_reuses_every_stage_and_keeps_the_registry(runs):
    from storage.registry import ModelRegistry

    data_dir, (_, ce, again) = runs
    assert again["reused_stages"] == ["teacher-labels", "train-student", "evaluate"]
    assert again["soft_labels_manifest"] == ce["soft_labels_manifest"] and again["student_checkpoint"] == ce["student_checkpoint"]
    assert again["decision"]["already_registered"] is True and again["decision"]["version"] == "v0002"
    assert [v.version for v in ModelRegistry(data_dir / "registry").versions()] == ["v0001", "v0002"]
    report = Path(again["decision"]["report"]["md"]).read_text()
    assert "Reused from the stage cache (same inputs and settings as an earlier run): teacher-labels, train-student, evaluate." in report
