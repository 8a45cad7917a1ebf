"""gate-and-promote stage as the flow runs it: record lineage, apply the gate, register, write the report.

The gate and the registry moves are `tasks.promote`; this module gathers what
they need from the upstream stage outputs and writes the run's report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from storage import soft_labels
from storage.atomic import sha256_json
from tasks.config import PipelineConfig
from tasks.contracts import Evaluation, Frozen, PreparedData, PromotionOutcome, TeacherLabels, TrainedStudent
from tasks.identity import code_version
from tasks.prepare import registry_dir


class PromotionInputs(Frozen):
    prepared: PreparedData
    labels: TeacherLabels
    student: TrainedStudent
    evaluation: Evaluation
    reused_stages: list[str]


def lineage(config: PipelineConfig, inputs: PromotionInputs) -> dict[str, Any]:
    """Where the student came from, stored with its registry version."""
    manifest = soft_labels.load_manifest(inputs.labels.train_manifest)
    return {
        "teacher": {"model": config.teacher.model, "hash": manifest["metadata"]["teacher_hash"], "dir": inputs.prepared.teacher_dir},
        "student_init": {"model": config.train.student, "dir": inputs.prepared.student_dir, "init": config.train.init},
        "soft_labels_manifest": inputs.labels.train_manifest,
        "soft_labels_manifest_sha256": sha256_json(manifest["shards"]),
        "eval_set_sha256": inputs.prepared.eval.sha256,
        "data": {"source": config.data.source, "eval_split": config.data.eval_split},
        "train_config": config.train.model_dump(mode="json"),
        "train_key": inputs.student.key,
        "code_version": code_version(),
    }


def run(config: PipelineConfig, inputs: PromotionInputs, run_dir: Path, log: Callable[[str], None] = print) -> tuple[PromotionOutcome, dict]:
    """Stage entry point: the outcome, and the report's markdown and comparison rows (for the UI's artifacts)."""
    from storage.registry import ModelRegistry
    from tasks.approval import request_approval
    from tasks.promote import run_promotion_stage
    from tasks.report import write_report

    registry = registry_dir(config)
    approve = (lambda record: request_approval(record, config.promotion.approval_timeout_s)) if config.promotion.require_approval else None
    decision = run_promotion_stage(config.promotion, str(registry), inputs.student.checkpoint, inputs.evaluation.metrics,
                                   lineage(config, inputs), log_fn=log, approve=approve)
    before = decision["champion_before"]
    champion_metrics = ModelRegistry(registry).get(before).metrics.get("student") if before else None
    metrics_file = Path(inputs.evaluation.metrics_file)
    report = write_report(Path(run_dir), inputs.evaluation.metrics, decision, champion_metrics, Path(inputs.student.log),
                          files={"eval/metrics.json": metrics_file, "eval/generations.jsonl": metrics_file.parent / "generations.jsonl",
                                 "student checkpoint": inputs.student.checkpoint, "labels (train manifest)": inputs.labels.train_manifest},
                          reused_stages=inputs.reused_stages)
    decision["report"] = {"md": report["report_md"], "png": report["report_png"]}
    outcome = PromotionOutcome(promoted=bool(decision["promoted"]), version=decision.get("version"), champion_before=before,
                               champion_after=decision.get("champion_after"), summary=decision["summary"],
                               report_md=report["report_md"], report_png=report.get("report_png"), decision=decision)
    return outcome, {"markdown": report["markdown"], "table": report["table"]}


def metric_rows(evaluation: Evaluation) -> list[dict[str, Any]]:
    """Student and teacher metrics with intervals, one row each (the UI's eval-metrics table)."""
    rows = []
    for who in ("student", "teacher"):
        for metric, stat in evaluation.metrics[who].items():
            if isinstance(stat, dict):
                rows.append({"model": who, "metric": metric, "value": round(stat["value"], 4),
                             "ci_low": round(stat["ci_low"], 4), "ci_high": round(stat["ci_high"], 4), "n": stat["n"]})
    return rows
