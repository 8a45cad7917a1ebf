"""The distillation DAG: prepare → teacher labels → train student → evaluate → gate and promote.

Each task returns a small manifest of paths and numbers; data stays on disk.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from storage.atomic import sha256_json, write_json
from tasks.config import PipelineConfig
from tasks.ray_logs import ray_output_to


def _log():
    return get_run_logger().info


@task(name="prepare-data")
def prepare_data(config: PipelineConfig, run_dir: str) -> dict[str, Any]:
    from tasks.data import prepare
    from tasks.models import resolve_model_dir

    demo = {}
    source = config.data.source
    if source == "demo" or "demo" in (config.teacher.model, config.train.student):
        from tasks.demo.assets import ensure_demo_assets

        demo = ensure_demo_assets(Path(config.data_dir), seed=config.data.demo_seed, teacher_steps=config.data.demo_teacher_steps, log_fn=_log())
        if source == "demo":
            source = demo["dataset"]
    teacher_dir = resolve_model_dir(config.teacher.model, demo.get("teacher"), config.teacher.revision, "teacher.model")
    student_dir = resolve_model_dir(config.train.student, demo.get("student"), None, "train.student")
    return prepare(config.data, source, teacher_dir, student_dir, Path(run_dir) / "prompts", config.teacher.max_new_tokens)


def _labels_complete(out_dir: Path) -> dict[str, str] | None:
    """Manifests of a finished capture whose shards all still verify, else None."""
    from storage import soft_labels

    manifests = {}
    for role in ("train", "eval"):
        path = out_dir / role / soft_labels.MANIFEST_NAME
        if not path.exists():
            return None
        manifest = soft_labels.load_manifest(path)
        for index, record in enumerate(manifest["shards"]):
            done = soft_labels.finished_shard(out_dir / role, index)
            if done is None or done["sha256"] != record["sha256"]:
                return None
        manifests[role] = str(path)
    return manifests


# Where the teacher runs, not what it labels: changing these reuses finished labels.
PLACEMENT_ONLY = {"replicas", "cpus_per_replica", "use_gpu"}


@task(name="teacher-labels")
def teacher_labels(config: PipelineConfig, prepared: dict[str, Any]) -> dict[str, str]:
    from tasks.identity import model_identity, stage_key
    from tasks.teacher.stage import run_teacher_stage

    key = stage_key("labels", teacher=config.teacher.model_dump(exclude=PLACEMENT_ONLY), teacher_model=model_identity(prepared["teacher_dir"]),
                    prompts={s: v["sha256"] for s, v in prepared["splits"].items()})
    out_dir = Path(config.data_dir).resolve() / "cache" / "labels" / key
    done = _labels_complete(out_dir)
    if done is not None:
        _log()(f"teacher: reusing finished labels {out_dir} (same teacher, prompts and settings)")
        return {**done, "key": key, "reused": True}
    with ray_output_to(_log()):
        manifests = run_teacher_stage(config.teacher, prepared["teacher_dir"], prepared, out_dir,
                                      ray_address=config.train.ray_address, log_fn=_log())
    return {**manifests, "key": key, "reused": False}


@task(name="train-student")
def train_student(config: PipelineConfig, prepared: dict[str, Any], labels: dict[str, Any]) -> dict[str, Any]:
    from tasks.identity import model_identity, stage_key
    from tasks.train.stage import run_train_stage

    key = stage_key("train", train=config.train.model_dump(exclude={"ray_address", "checkpoint_storage"}), labels=labels["key"],
                    student_model=model_identity(prepared["student_dir"]))
    out_dir = Path(config.data_dir).resolve() / "cache" / "train" / key
    done = out_dir / "done.json"
    if done.exists() and (out_dir / "student" / "config.json").exists():
        _log()(f"train: reusing finished student {out_dir / 'student'} (same labels, student and settings)")
        return {**json.loads(done.read_text()), "reused": True}
    with ray_output_to(_log()):
        result = {**run_train_stage(config.train, prepared["student_dir"], labels["train"], out_dir, log_fn=_log()), "key": key}
    write_json(done, result)
    return {**result, "reused": False}


@task(name="evaluate")
def evaluate(config: PipelineConfig, prepared: dict[str, Any], labels: dict[str, Any], trained: dict[str, Any]) -> dict[str, Any]:
    from tasks.evaluate.stage import run_eval_stage
    from tasks.identity import model_identity, stage_key

    eval_split = prepared["splits"][prepared["eval_split"]]
    key = stage_key("eval", eval=config.eval.model_dump(), student=trained["key"], labels=labels["key"], prompts=eval_split["sha256"],
                    teacher_model=model_identity(prepared["teacher_dir"]))
    out_dir = Path(config.data_dir).resolve() / "cache" / "eval" / key
    done = out_dir / "done.json"
    if done.exists():
        result = {**json.loads(done.read_text()), "reused": True}
        _log()(f"eval: reusing finished evaluation {out_dir}")
    else:
        with ray_output_to(_log()):
            result = run_eval_stage(config.eval, trained["checkpoint"], labels["eval"], eval_split["path"], out_dir,
                                    ray_address=config.train.ray_address, log_fn=_log(), teacher_dir=prepared["teacher_dir"])
        write_json(done, result)
        result = {**result, "reused": False}
    rows = []
    for who in ("student", "teacher"):
        for metric, stat in result["metrics"][who].items():
            if isinstance(stat, dict):
                rows.append({"model": who, "metric": metric, "value": round(stat["value"], 4),
                             "ci_low": round(stat["ci_low"], 4), "ci_high": round(stat["ci_high"], 4), "n": stat["n"]})
    create_table_artifact(key="eval-metrics", table=rows, description="Held-out metrics with 95% bootstrap intervals")
    return result


@task(name="gate-and-promote")
def gate_and_promote(config: PipelineConfig, prepared: dict[str, Any], labels: dict[str, Any], trained: dict[str, Any],
                     evaluated: dict[str, Any], run_dir: str, reused_stages: list[str]) -> dict[str, Any]:
    from storage import soft_labels
    from storage.registry import ModelRegistry
    from tasks.approval import request_approval
    from tasks.identity import code_version
    from tasks.promote import run_promotion_stage
    from tasks.report import write_report

    registry_dir = config.promotion.registry_dir or str(Path(config.data_dir) / "registry")
    label_meta = soft_labels.load_manifest(labels["train"])["metadata"]
    lineage = {
        "teacher": {"model": config.teacher.model, "hash": label_meta["teacher_hash"], "dir": prepared["teacher_dir"]},
        "soft_labels_manifest": labels["train"],
        "soft_labels_manifest_sha256": sha256_json(soft_labels.load_manifest(labels["train"])["shards"]),
        "eval_set_sha256": prepared["splits"][prepared["eval_split"]]["sha256"],
        "train_config": config.train.model_dump(),
        "train_key": trained["key"],
        "code_version": code_version(),
    }
    approve = (lambda record: request_approval(record, config.promotion.approval_timeout_s)) if config.promotion.require_approval else None
    decision = run_promotion_stage(config.promotion, registry_dir, trained["checkpoint"], evaluated["metrics"], lineage,
                                   log_fn=_log(), approve=approve)
    before = decision["champion_before"]
    champion_metrics = ModelRegistry(Path(registry_dir)).get(before).metrics.get("student") if before else None
    metrics_file = Path(evaluated["metrics_file"])
    report = write_report(Path(run_dir), evaluated["metrics"], decision, champion_metrics, Path(trained["log"]),
                          files={"eval/metrics.json": metrics_file, "eval/generations.jsonl": metrics_file.parent / "generations.jsonl",
                                 "student checkpoint": trained["checkpoint"], "labels (train manifest)": labels["train"]},
                          reused_stages=reused_stages)
    create_markdown_artifact(key="run-report", markdown=report["markdown"])
    create_table_artifact(key="run-comparison", table=report["table"])
    decision["report"] = {"md": report["report_md"], "png": report["report_png"]}
    return decision


@flow(name="distill", log_prints=True)
def distill(config: PipelineConfig = PipelineConfig()) -> str:
    """Distil a student from a teacher and decide whether to promote it; returns the run.json path."""
    started = time.time()
    run_name = config.run_name or dt.datetime.now(dt.timezone.utc).strftime("run-%Y%m%d-%H%M%S")
    run_dir = Path(config.data_dir).resolve() / "runs" / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "config.json", config.model_dump())

    prepared = prepare_data(config, str(run_dir))
    labels = teacher_labels(config, prepared)
    trained = train_student(config, prepared, labels)
    evaluated = evaluate(config, prepared, labels, trained)
    stages = {"teacher-labels": labels, "train-student": trained, "evaluate": evaluated}
    reused = [name for name, out in stages.items() if out["reused"]]
    if len(reused) == len(stages):
        get_run_logger().info("nothing new since an earlier run (same data, teacher, student and settings): "
                              "labels, student and evaluation all reused from the stage cache")
    decision = gate_and_promote(config, prepared, labels, trained, evaluated, str(run_dir), reused)

    run = {
        "run_name": run_name,
        "run_dir": str(run_dir),
        "soft_labels_manifest": labels["train"],
        "heldout_labels_manifest": labels["eval"],
        "student_checkpoint": trained["checkpoint"],
        "train_log": trained["log"],
        "metrics_file": evaluated["metrics_file"],
        "metrics": {who: {m: s["value"] for m, s in evaluated["metrics"][who].items()} for who in ("student", "teacher")},
        "decision": decision,
        "reused_stages": reused,
        "wall_seconds": round(time.time() - started, 1),
    }
    path = write_json(run_dir / "run.json", run)
    get_run_logger().info(f"run written to {path}")
    return str(path)
