"""Model cards: every registered version carries a README.md that huggingface_hub parses back to the entry's values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from storage.registry import ModelRegistry
from tasks.model_card import CARD_NAME, hub_id, write_card_for_entry, write_model_card


def make_model(folder: Path, tag: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "tag": tag}))
    (folder / "model.safetensors").write_bytes(tag.encode() * 64)
    return folder


def stat(value, low, high, n=300):
    return {"value": value, "ci_low": low, "ci_high": high, "n": n}


# The shapes the flow stores: metrics.json of the evaluate stage, the promotion record, the lineage.
METRICS = {
    "num_examples": 300,
    "student": {"exact_match": stat(0.73, 0.68, 0.78), "rouge_l": stat(0.81, 0.78, 0.84), "kl_to_teacher": stat(0.123, 0.11, 0.14),
                "perplexity": stat(float("nan"), float("nan"), float("nan"))},
    "teacher": {"exact_match": stat(0.97, 0.95, 0.99), "rouge_l": stat(0.95, 0.93, 0.97)},
}
DECISION = {
    "promoted": True, "summary": "all 2 rules passed", "champion_before": "v0001",
    "rules": [
        {"name": "exact_match>=0.2", "metric": "exact_match", "kind": "absolute", "value": 0.73, "threshold": 0.2, "passed": True, "reason": "0.73 >= 0.2"},
        {"name": "exact_match>=champion", "metric": "exact_match", "kind": "relative_to_champion", "value": 0.73, "threshold": 0.7,
         "passed": True, "status": "passed", "reason": "0.73 >= champion 0.70"},
    ],
}


def lineage(student: str = "Qwen/Qwen2.5-0.5B-Instruct", source: str | None = "my-org/prompts") -> dict:
    out = {
        "teacher": {"model": "Qwen/Qwen2.5-7B-Instruct", "hash": "teacherhash123", "dir": "/models/teacher"},
        "student_init": {"model": student, "dir": "/models/student"},
        "soft_labels_manifest": "/data/labels/manifest.json",
        "soft_labels_manifest_sha256": "labelsha456",
        "eval_set_sha256": "evalsha789",
        "train_config": {"student": student, "objective": "fkl+ce", "support": "tail_bucket", "temperature": 1.0,
                         "objective_params": {}, "steps": 300, "batch_size": 32, "learning_rate": 0.003},
        "train_key": "train-abcdef0123456789",
        "code_version": "0123456789abcdef",
    }
    if source is not None:
        out["data"] = {"source": source, "eval_split": "test"}
    return out


def test_registered_version_has_a_card_that_huggingface_hub_parses(tmp_path):
    reg = ModelRegistry(tmp_path / "reg")
    entry = reg.register(make_model(tmp_path / "student", "a"), lineage=lineage(), metrics=METRICS, decision=DECISION,
                         before_publish=write_card_for_entry)

    card_path = Path(entry.path) / CARD_NAME
    card = ModelCard.load(card_path)
    assert card.data.base_model == entry.lineage["student_init"]["model"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert card.data.datasets == ["my-org/prompts"]
    assert card.data.library_name == "transformers"
    assert "knowledge-distillation" in card.data.tags
    parsed = {r.metric_type: r.metric_value for r in card.data.eval_results}
    finite = {m: s["value"] for m, s in entry.metrics["student"].items() if s["value"] == s["value"]}
    assert parsed == finite, "every finite student metric, and only those (NaN perplexity is left out of the metadata)"
    assert {r.dataset_split for r in card.data.eval_results} == {"test"}

    body = card.text
    assert "Qwen/Qwen2.5-7B-Instruct" in body and "fkl+ce" in body and "| training steps | 300" in body
    assert "| exact_match | higher | 0.7300 [0.6800, 0.7800] (n=300) | 0.9700 [0.9500, 0.9900] (n=300) |" in body
    assert "all 2 rules passed" in body and "0.73 >= champion 0.70" in body
    for value in ("teacherhash123", "labelsha456", "evalsha789", "train-abcdef0123456789", "0123456789abcdef"):
        assert f"`{value}`" in body
    assert not list(reg.versions_dir.glob("*.tmp-*"))


def test_local_student_and_dataset_stay_out_of_the_metadata(tmp_path):
    local_student = make_model(tmp_path / "my-student", "s")
    (tmp_path / "version").mkdir()
    out = write_model_card(tmp_path / "version", lineage=lineage(student=str(local_student), source="demo"),
                           metrics={"exact_match": 0.5}, decision={"promoted": False, "summary": "1 rule failed", "rules": []},
                           version="v0007")
    card = ModelCard.load(out)
    assert card.data.base_model is None and card.data.datasets is None, "the Hub accepts only repo ids there"
    assert str(local_student) in card.text, "the body still names the initial student"
    assert [(r.metric_type, r.metric_value) for r in card.data.eval_results] == [("exact_match", 0.5)], "a flat metrics dict is the student's"
    assert card.data.model_name == "stillhouse-v0007" and "did not pass" in card.text


@pytest.mark.parametrize("ref, expected", [("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B"), ("gpt2", "gpt2"), ("demo", None),
                                           ("/abs/path/model", None), ("./rel/model", None), ("a/b/c", None), (None, None)])
def test_hub_id(ref, expected):
    assert hub_id(ref) == expected


def test_failing_card_hook_publishes_nothing(tmp_path):
    reg = ModelRegistry(tmp_path / "reg")

    def broken(folder, entry):
        raise RuntimeError("card writer crashed")

    with pytest.raises(RuntimeError, match="card writer crashed"):
        reg.register(make_model(tmp_path / "student", "a"), lineage=lineage(), metrics=METRICS, decision=DECISION, before_publish=broken)
    assert reg.versions() == [] and not list(reg.versions_dir.iterdir()), "no version without its card, no staging left"


def test_the_promotion_stage_registers_students_with_their_card(tmp_path):
    from tasks.config import PromotionConfig
    from tasks.promote import run_promotion_stage

    cfg = PromotionConfig.model_validate({"gate": {"rules": [{"metric": "exact_match", "kind": "absolute", "threshold": 0.5}]}})
    record = run_promotion_stage(cfg, str(tmp_path / "reg"), str(make_model(tmp_path / "student", "a")), METRICS, lineage(),
                                 log_fn=lambda _: None)
    card = ModelCard.load(Path(record["registry_path"]) / CARD_NAME)
    assert card.data.base_model == "Qwen/Qwen2.5-0.5B-Instruct" and card.data.model_name == f"stillhouse-{record['version']}"
    assert {r.metric_type: r.metric_value for r in card.data.eval_results}["exact_match"] == 0.73
    assert record["summary"] in card.text
