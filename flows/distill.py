"""The distillation DAG: prepare → teacher labels → train student → evaluate → gate and promote.

Composition only: each task calls one stage. Stages take typed inputs and return
typed, frozen outputs (tasks.contracts) that are also their on-disk records; the
cacheable ones run through tasks.stage_cache, which reuses finished work by content key.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from storage.atomic import write_json
from tasks import gate_and_promote as promotion
from tasks import prepare
from tasks.config import PipelineConfig
from tasks.contracts import Evaluation, PreparedData, PromotionOutcome, TeacherLabels, TrainedStudent
from tasks.evaluate import stage as eval_stage
from tasks.faults import FaultPlan
from tasks.ray_logs import ray_output_to
from tasks.runs import claim_run_dir, write_failure, write_success
from tasks.stage_cache import run_cached
from tasks.teacher import stage as teacher_stage
from tasks.train import stage as train_stage


def _log():
    return get_run_logger().info


def _cache(config: PipelineConfig, faults: FaultPlan) -> dict:
    return {"cache_root": Path(config.data_dir) / "cache", "log": _log(), "faults": faults, "ray_address": config.train.ray_address}


@task(name="prepare-data")
def prepare_data(config: PipelineConfig, run_dir: str) -> PreparedData:
    return prepare.run(config, Path(run_dir), log=_log())


@task(name="teacher-labels")
def teacher_labels(config: PipelineConfig, prepared: PreparedData, faults: FaultPlan) -> TeacherLabels:
    with ray_output_to(_log()):
        return run_cached(teacher_stage.STAGE, config.teacher, prepared, **_cache(config, faults))


@task(name="train-student")
def train_student(config: PipelineConfig, prepared: PreparedData, labels: TeacherLabels, faults: FaultPlan) -> TrainedStudent:
    inputs = train_stage.TrainInputs(student_dir=prepared.student_dir, labels=labels)
    with ray_output_to(_log()):
        return run_cached(train_stage.STAGE, config.train, inputs, **_cache(config, faults))


@task(name="evaluate")
def evaluate(config: PipelineConfig, prepared: PreparedData, labels: TeacherLabels, student: TrainedStudent) -> Evaluation:
    inputs = eval_stage.EvalInputs(prepared=prepared, labels=labels, student=student)
    with ray_output_to(_log()):
        evaluation = run_cached(eval_stage.STAGE, config.eval, inputs, **_cache(config, FaultPlan()))
    create_table_artifact(key="eval-metrics", table=promotion.metric_rows(evaluation),
                          description="Held-out metrics with 95% bootstrap intervals")
    return evaluation


@task(name="gate-and-promote")
def gate_and_promote(config: PipelineConfig, inputs: promotion.PromotionInputs, run_dir: str) -> PromotionOutcome:
    outcome, report = promotion.run(config, inputs, Path(run_dir), log=_log())
    create_markdown_artifact(key="run-report", markdown=report["markdown"])
    create_table_artifact(key="run-comparison", table=report["table"])
    return outcome


@flow(name="distill", log_prints=True)
def distill(config: PipelineConfig = PipelineConfig(), faults: FaultPlan = FaultPlan()) -> str:
    """Distil a student from a teacher and decide whether to promote it; returns the run.json path.

    `faults` is for tests only (tasks.faults); leave it empty."""
    started = time.time()
    run_dir = claim_run_dir(Path(config.data_dir) / "runs", config.run_name, owner=str(flow_run.get_id() or started))
    write_json(run_dir / "config.json", config.model_dump(mode="json"))
    stage = "prepare-data"
    try:
        prepared = prepare_data(config, str(run_dir))
        stage = "teacher-labels"
        labels = teacher_labels(config, prepared, faults)
        stage = "train-student"
        student = train_student(config, prepared, labels, faults)
        stage = "evaluate"
        evaluation = evaluate(config, prepared, labels, student)
        reused = [name for name, out in (("teacher-labels", labels), ("train-student", student), ("evaluate", evaluation)) if out.reused]
        if len(reused) == 3:
            get_run_logger().info("nothing new since an earlier run (same data, teacher, student and settings): "
                                  "labels, student and evaluation all reused from the stage cache")
        stage = "gate-and-promote"
        outcome = gate_and_promote(config, promotion.PromotionInputs(prepared=prepared, labels=labels, student=student,
                                                                     evaluation=evaluation, reused_stages=reused), str(run_dir))
    except BaseException as exc:
        write_failure(run_dir, stage, exc)
        raise
    path = write_success(run_dir, {
        "run_name": run_dir.name,
        "run_dir": str(run_dir),
        "soft_labels_manifest": labels.train_manifest,
        "heldout_labels_manifest": labels.eval_manifest,
        "student_checkpoint": student.checkpoint,
        "train_log": student.log,
        "metrics_file": evaluation.metrics_file,
        "metrics": {who: evaluation.values(who) for who in ("student", "teacher")},
        "data_checks": prepared.checks,
        "decision": outcome.decision,
        "reused_stages": reused,
        "wall_seconds": round(time.time() - started, 1),
    })
    get_run_logger().info(f"run written to {path}")
    return str(path)
