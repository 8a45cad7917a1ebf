"""Run report: report.md tables match the metrics and rules, report.png is a real image, and the markdown
is accepted as an artifact by a real (test) Prefect server."""

import json
import re
import uuid
from pathlib import Path

import pytest

from tasks.report import format_cell, write_report

METRICS = {
    "num_examples": 40,
    "student": {"exact_match": {"value": 0.425, "ci_low": 0.275, "ci_high": 0.575, "n": 40},
                "rouge_l": {"value": 0.7123, "ci_low": 0.65, "ci_high": 0.77, "n": 40},
                "kl_to_teacher": {"value": 0.0674, "ci_low": 0.0629, "ci_high": 0.072, "n": 40},
                "perplexity": {"value": 2.31, "ci_low": 2.2, "ci_high": 2.45, "n": 40},
                "lm_eval:arc_easy": {"value": 0.31, "ci_low": 0.27, "ci_high": 0.35, "n": 100, "source": "acc_norm,none"}},
    "teacher": {"exact_match": {"value": 0.5, "ci_low": 0.35, "ci_high": 0.65, "n": 40},
                "rouge_l": {"value": 0.76, "ci_low": 0.7, "ci_high": 0.81, "n": 40}},
    "lm_eval": {"status": "skipped", "tasks": ["hellaswag"], "reason": "lm-eval-harness is not installed"},
}
CHAMPION = {"exact_match": {"value": 0.4, "ci_low": 0.25, "ci_high": 0.55, "n": 40}, "rouge_l": 0.7}
DECISION = {
    "promoted": False, "version": "v0002", "champion_before": "v0001", "champion_after": "v0001",
    "summary": "not promoted: 1 of 2 rule(s) failed: rouge_l>=champion+0.05: value 0.7123 < 0.75",
    "rules": [
        {"name": "exact_match>=0.2", "metric": "exact_match", "kind": "absolute", "value": 0.425, "threshold": 0.2, "passed": True,
         "reason": "value 0.425 >= 0.2 (absolute threshold)"},
        {"name": "rouge_l>=champion+0.05", "metric": "rouge_l", "kind": "relative_to_champion", "value": 0.7123, "threshold": 0.75,
         "passed": False, "reason": "value 0.7123 < 0.75 (champion 0.7 + margin 0.05)"},
    ],
}


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "runs" / "run-1"
    (run / "eval").mkdir(parents=True)
    (run / "train" / "student").mkdir(parents=True)
    (run / "eval" / "metrics.json").write_text(json.dumps(METRICS))
    (run / "eval" / "generations.jsonl").write_text("")
    (run / "config.json").write_text("{}")
    log = run / "train" / "train_log.jsonl"
    log.write_text("\n".join(json.dumps({"step": s, "loss": 5 / s, "loss_fkl": 3 / s, "loss_ce": 2 / s, "lr": 0.001}) for s in range(1, 40, 3)) + "\n")
    return run


def _table(markdown: str, header_start: str) -> list[list[str]]:
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


def test_report_files_and_tables_match_metrics_and_rules(run_dir):
    out = write_report(run_dir, METRICS, DECISION, {"student": CHAMPION}, run_dir / "train" / "train_log.jsonl")
    md, png = Path(out["report_md"]), Path(out["report_png"])
    assert md == run_dir / "report.md" and png == run_dir / "report.png"
    assert md.read_text() == out["markdown"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert not list(run_dir.glob("*.tmp-*"))
    text = out["markdown"]
    assert "**Not promoted: v0002**" in text and DECISION["summary"] in text

    metric_rows = {r[0]: r for r in _table(text, "| metric |")}
    assert list(metric_rows) == ["exact_match", "rouge_l", "kl_to_teacher", "perplexity", "lm_eval:arc_easy"]
    for name, row in metric_rows.items():
        assert row[2] == format_cell(METRICS["student"][name] | {"n": METRICS["student"][name]["n"]})
    assert metric_rows["exact_match"][2:] == ["0.4250 [0.2750, 0.5750] (n=40)", "0.5000 [0.3500, 0.6500] (n=40)", "0.4000 [0.2500, 0.5500] (n=40)"]
    assert metric_rows["rouge_l"][4] == "0.7000"  # a bare number from an older champion: no interval
    assert metric_rows["kl_to_teacher"][1] == "lower" and metric_rows["perplexity"][1] == "lower" and metric_rows["rouge_l"][1] == "higher"
    assert metric_rows["kl_to_teacher"][3] == "—"  # the teacher has no KL to itself
    assert "champion (v0001)" in text
    assert "hellaswag: **skipped** — lm-eval-harness is not installed" in text
    table = {(r["metric"], r["model"]): r for r in out["table"]}
    assert table[("exact_match", "champion")] == {"metric": "exact_match", "model": "champion", "value": 0.4, "ci_low": 0.25,
                                                  "ci_high": 0.55, "n": 40, "better": "higher"}
    assert table[("rouge_l", "champion")]["ci_low"] is None and ("kl_to_teacher", "teacher") not in table
    assert len(out["table"]) == 5 + 2 + 2  # student metrics + teacher metrics + champion metrics

    rule_rows = _table(text, "| rule |")
    assert len(rule_rows) == 2
    for row, rule in zip(rule_rows, DECISION["rules"]):
        name, metric, kind, value, threshold, passed, reason = row
        assert (name, metric, kind, reason) == (rule["name"], rule["metric"], rule["kind"], rule["reason"])
        assert float(value) == pytest.approx(rule["value"], abs=1e-4) and float(threshold) == pytest.approx(rule["threshold"], abs=1e-4)
        assert passed == ("pass" if rule["passed"] else "FAIL")

    links = dict(re.findall(r"\| \[([^\]]+)\]\(([^)]+)\) \|", text))
    assert {"config.json", "eval/metrics.json", "eval/generations.jsonl", "train/train_log.jsonl", "student checkpoint", "report.png", "run.json"} <= set(links)
    for label, target in links.items():
        if label != "run.json":  # run.json is written by the flow after the report
            assert (run_dir / target).exists(), (label, target)


def test_report_without_champion_or_training_log(run_dir, tmp_path):
    decision = {**DECISION, "promoted": True, "champion_before": None, "champion_after": "v0001", "version": "v0001",
                "summary": "promoted: all rules passed", "registry_path": str(tmp_path / "registry" / "versions" / "v0001")}
    cached = tmp_path / "cache" / "eval" / "k1" / "metrics.json"  # stage outputs kept outside the run folder
    cached.parent.mkdir(parents=True)
    cached.write_text("{}")
    out = write_report(run_dir, METRICS, decision, None, run_dir / "train" / "missing.jsonl", files={"eval/metrics.json": cached},
                       reused_stages=["teacher-labels", "train-student"])
    assert "Reused from the stage cache (same inputs and settings as an earlier run): teacher-labels, train-student." in out["markdown"]
    assert "| [eval/metrics.json](../../cache/eval/k1/metrics.json) |" in out["markdown"]
    rows = {r[0]: r for r in _table(out["markdown"], "| metric |")}
    assert all(r[4] == "—" for r in rows.values())
    assert "No champion before this run" in out["markdown"] and "**Promoted: v0001**" in out["markdown"]
    assert "[registry entry v0001](../../registry/versions/v0001)" in out["markdown"]
    assert Path(out["report_png"]).stat().st_size > 10_000


def test_report_markdown_is_a_prefect_artifact(prefect_server, run_dir):
    from prefect import flow, get_client
    from prefect.artifacts import create_markdown_artifact, create_table_artifact
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    key = f"run-report-{uuid.uuid4().hex[:8]}"

    @flow(name="report-artifact-test")
    def publish() -> str:
        out = write_report(run_dir, METRICS, DECISION, {"student": CHAMPION}, run_dir / "train" / "train_log.jsonl")
        create_markdown_artifact(key=key, markdown=out["markdown"], description="run report")
        create_table_artifact(key=key + "-table", table=out["table"], description="student vs teacher vs champion")
        return out["markdown"]

    markdown = publish()
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key, key + "-table"])))
    by_key = {a.key: a for a in arts}
    assert by_key[key].type == "markdown" and by_key[key].data == markdown
    assert by_key[key + "-table"].type == "table" and "exact_match" in str(by_key[key + "-table"].data)
