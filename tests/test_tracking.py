"""Experiment tracking against a real local MLflow store (sqlite + artifact folder in tmp_path)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from storage.registry import ModelRegistry
from tasks.tracking import TrackingConfig, TrackingConfigError, check_backend, flatten, sync_aliases, track_run, training_curve

pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402


def stat(value, low, high):
    return {"value": value, "ci_low": low, "ci_high": high, "n": 200}


def fabricate_run(data_dir: Path, name: str, version: str, promoted: bool, exact_match: float) -> Path:
    """The files a finished flow run leaves, written as the stages write them."""
    train_dir = data_dir / "cache" / "train" / f"train-{name}"
    train_dir.mkdir(parents=True)
    rows = [{"step": 1, "loss": 3.0, "loss_fkl": 2.0, "loss_ce": 1.0, "lr": 1e-3, "grad_norm": 5.0, "tokens_per_s": 900.0, "elapsed_s": 1, "eta_s": 9},
            {"step": 2, "loss": 2.5, "loss_fkl": 1.6, "loss_ce": 0.9, "lr": 2e-3, "grad_norm": 4.0, "tokens_per_s": 950.0, "elapsed_s": 2, "eta_s": 8},
            # a worker crashed after step 2 and the run resumed from the step-1 checkpoint: step 2 is logged again
            {"step": 2, "loss": 2.4, "loss_fkl": 1.5, "loss_ce": 0.9, "lr": 2e-3, "grad_norm": 4.0, "tokens_per_s": 940.0, "elapsed_s": 3, "eta_s": 7},
            {"step": 3, "loss": 2.0, "loss_fkl": 1.2, "loss_ce": 0.8, "lr": 3e-3, "grad_norm": 3.0, "tokens_per_s": 1000.0, "elapsed_s": 4, "eta_s": 0}]
    (train_dir / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    eval_dir = data_dir / "cache" / "eval" / f"eval-{name}"
    eval_dir.mkdir(parents=True)
    metrics = {"num_examples": 200,
               "student": {"exact_match": stat(exact_match, exact_match - 0.05, exact_match + 0.05), "kl_to_teacher": stat(0.3, 0.25, 0.35),
                           "perplexity": stat(float("nan"), float("nan"), float("nan"))},
               "teacher": {"exact_match": stat(0.95, 0.92, 0.98)}}
    (eval_dir / "metrics.json").write_text(json.dumps(metrics))
    run_dir = data_dir / "runs" / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"train": {"steps": 3}}))
    (run_dir / "report.md").write_text(f"# Distillation report: {name}\n")
    (run_dir / "report.png").write_bytes(b"\x89PNG\r\n\x1a\n" + name.encode())
    run = {"run_name": name, "run_dir": str(run_dir), "train_log": str(train_dir / "train_log.jsonl"),
           "student_checkpoint": str(train_dir / "student"), "metrics_file": str(eval_dir / "metrics.json"),
           "metrics": {who: {m: s["value"] for m, s in metrics[who].items()} for who in ("student", "teacher")},
           "decision": {"promoted": promoted, "version": version, "summary": f"{version} {'promoted' if promoted else 'held back'}", "rules": []},
           "reused_stages": [], "wall_seconds": 12.5}
    (run_dir / "run.json").write_text(json.dumps(run))
    return run_dir / "run.json"


def register(reg: ModelRegistry, tmp_path: Path, tag: str, promote: bool) -> str:
    src = tmp_path / f"student-{tag}"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"tag": tag}))
    entry = reg.register(src, lineage={"train_key": f"train-{tag}"}, metrics={}, decision={"promoted": promote, "summary": tag})
    reg.set_alias("challenger", entry.version)
    if promote:
        reg.promote(entry.version)
    return entry.version


def aliases_in_mlflow(client: MlflowClient, cfg: TrackingConfig) -> dict[str, str]:
    """alias -> stillhouse version, read back from MLflow."""
    model = client.get_registered_model(cfg.registered_model)
    return {alias: client.get_model_version(cfg.registered_model, str(v)).tags["stillhouse.version"] for alias, v in model.aliases.items()}


def test_flow_runs_and_promotions_reach_mlflow(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    cfg = TrackingConfig(backend="mlflow", experiment="kd")
    registry_dir = data_dir / "registry"
    reg = ModelRegistry(registry_dir)
    pipeline = {"run_name": None, "train": {"steps": 3, "objective": "fkl+ce", "lora": None},
                "promotion": {"gate": {"rules": [{"metric": "exact_match", "threshold": 0.2}]}}}

    v1 = register(reg, tmp_path, "a", promote=True)
    first = track_run(cfg, data_dir, fabricate_run(data_dir, "run-1", v1, True, 0.6), pipeline, registry_dir=registry_dir)
    assert "error" not in first and first["tracking_uri"] == f"sqlite:///{data_dir.resolve() / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=first["tracking_uri"], registry_uri=first["tracking_uri"])
    run = client.get_run(first["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "run-1"
    assert run.data.params["train.steps"] == "3" and run.data.params["train.objective"] == "fkl+ce"
    assert run.data.params["train.lora"] == "null"
    assert json.loads(run.data.params["promotion.gate.rules"]) == pipeline["promotion"]["gate"]["rules"]
    loss = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in loss] == [(1, 3.0), (2, 2.4), (3, 2.0)], "one point per step, the resumed run's value wins"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss_fkl")] == [(1, 2.0), (2, 1.5), (3, 1.2)]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "train/tokens_per_s")] == [900.0, 940.0, 1000.0]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "train/lr")] == [1e-3, 2e-3, 3e-3]
    assert "train/elapsed_s" not in run.data.metrics and "train/eta_s" not in run.data.metrics
    m = run.data.metrics
    assert (m["eval/student/exact_match"], m["eval/student/exact_match/ci_low"], m["eval/student/exact_match/ci_high"]) == pytest.approx((0.6, 0.55, 0.65))
    assert m["eval/teacher/exact_match/ci_high"] == 0.98 and m["gate/promoted"] == 1.0 and m["run/wall_seconds"] == 12.5
    assert "eval/student/perplexity" not in m, "NaN values are left out"
    assert run.data.tags["stillhouse.version"] == v1
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert artifacts == {"report/report.md", "report/report.png", "report/run.json", "report/config.json", "report/metrics.json"}
    local = Path(client.download_artifacts(run.info.run_id, "report/report.png", str(tmp_path / "dl")))
    assert local.read_bytes() == b"\x89PNG\r\n\x1a\nrun-1"
    assert (data_dir / "mlruns").is_dir(), "artifacts live under the data folder, not the working directory"
    assert aliases_in_mlflow(client, cfg) == {"champion": v1, "challenger": v1}
    mv1 = client.get_model_version_by_alias(cfg.registered_model, "champion")
    assert mv1.run_id == first["run_id"] and mv1.source == Path(reg.get(v1).path).as_uri()

    # A failing challenger: challenger moves, champion stays.
    v2 = register(reg, tmp_path, "b", promote=False)
    track_run(cfg, data_dir, fabricate_run(data_dir, "run-2", v2, False, 0.1), pipeline, registry_dir=registry_dir)
    assert aliases_in_mlflow(client, cfg) == {"champion": v1, "challenger": v2}
    # A second promotion: the champion alias follows.
    v3 = register(reg, tmp_path, "c", promote=True)
    third = track_run(cfg, data_dir, fabricate_run(data_dir, "run-3", v3, True, 0.8), pipeline, registry_dir=registry_dir)
    assert aliases_in_mlflow(client, cfg) == {"champion": v3, "challenger": v3}
    assert client.get_model_version_by_alias(cfg.registered_model, "champion").run_id == third["run_id"]
    # A rollback in the registry (the source of truth) moves it back; an alias the registry dropped goes too.
    reg.rollback(reason="bad canary")
    client.set_registered_model_alias(cfg.registered_model, "stale", "1")
    assert sync_aliases(cfg, registry_dir) == {"champion": v1, "challenger": v3}
    assert aliases_in_mlflow(client, cfg) == {"champion": v1, "challenger": v3}

    # Tracking the same flow run again adds nothing; each registry version is one model version.
    again = track_run(cfg, data_dir, data_dir / "runs" / "run-1" / "run.json", pipeline, registry_dir=registry_dir)
    assert again["run_id"] == first["run_id"]
    experiment = client.get_experiment_by_name("kd")
    assert len(client.search_runs([experiment.experiment_id])) == 3
    versions = client.search_model_versions(f"name='{cfg.registered_model}'")
    assert sorted(mv.tags["stillhouse.version"] for mv in versions) == [v1, v2, v3]


def test_tracking_failure_warns_and_does_not_raise(tmp_path):
    data_dir = tmp_path / "data"
    run_json = fabricate_run(data_dir, "run-1", "v0001", True, 0.5)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    warnings = []
    cfg = TrackingConfig(backend="mlflow", uri=f"sqlite:///{blocker}/mlflow.db")  # cannot be created
    result = track_run(cfg, data_dir, run_json, {"train": {"steps": 3}}, log_fn=warnings.append)
    assert result["run_id"] is None and result["error"]
    assert len(warnings) == 1 and "could not record the run in mlflow" in warnings[0] and "run itself is complete" in warnings[0]


def test_backend_none_records_nothing(tmp_path):
    data_dir = tmp_path / "data"
    run_json = fabricate_run(data_dir, "run-1", "v0001", True, 0.5)
    assert track_run(TrackingConfig(backend="none"), data_dir, run_json, {})["run_id"] is None
    assert not (data_dir / "mlflow.db").exists() and not (data_dir / "mlruns").exists()


def test_bad_tracking_config_is_a_user_error():
    with pytest.raises(ValidationError, match="backend"):
        TrackingConfig(backend="tensorboard")
    with pytest.raises(ValidationError, match="extra"):
        TrackingConfig(backend="mlflow", experimnet="typo")
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ValidationError, match="pip install wandb"):
            TrackingConfig(backend="wandb")
        with pytest.raises(TrackingConfigError, match="tracking.backend=none"):
            check_backend(TrackingConfig.model_construct(backend="wandb"))


def test_flatten_pipeline_config():
    from tasks.config import PipelineConfig

    config = PipelineConfig().model_dump(mode="json")
    flat = flatten(config)
    assert flat["train.steps"] == str(config["train"]["steps"])
    assert flat["teacher.engine.dtype"] == config["teacher"]["engine"]["dtype"]
    assert all(not isinstance(v, dict) for v in flat.values()) and all(len(v) <= 6000 for v in flat.values())
    assert flatten({"a": {"b": {"c": 1}}, "d": [1, 2], "e": {}}) == {"a.b.c": "1", "d": "[1, 2]", "e": "{}"}


def test_training_curve_missing_log():
    assert training_curve(None) == [] and training_curve("/nonexistent/train_log.jsonl") == []


def read_wandb_records(path: Path) -> list:
    """The records of a W&B run file (wandb >= 0.18 has no Python reader): a 7-byte file header, then a LevelDB-style
    log of 32 KiB blocks whose chunks (4-byte CRC, 2-byte length, 1-byte type: 1 full, 2 first, 3 middle, 4 last)
    carry serialised `Record` protobufs."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, payload, records = path.read_bytes(), 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        payload += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            records.append(record)
            payload = b""
    return records


def test_wandb_offline_run_holds_params_curve_metrics_and_report(tmp_path, capfd):
    """tracking.backend wandb without an account: an offline run under <data_dir>/wandb, read back from its file."""
    pytest.importorskip("wandb")

    data_dir = tmp_path / "data"
    run_json = fabricate_run(data_dir, "run-1", "v0001", True, 0.6)
    result = track_run(TrackingConfig(backend="wandb", experiment="kd"), data_dir, run_json,
                       {"train": {"steps": 3, "objective": "fkl+ce"}})
    assert "error" not in result, result
    printed = capfd.readouterr()
    assert "wandb:" not in printed.out + printed.err, "W&B's own run summary would swamp the CLI's short console"
    (run_dir,) = (data_dir / "wandb" / "wandb").glob(f"offline-run-*-{result['run_id']}")
    records = read_wandb_records(next(run_dir.glob("*.wandb")))
    assert records and records[-1].WhichOneof("record_type") == "exit", "the run file is complete when track_run returns"

    def items(update):
        return {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in update}

    (run,) = [r.run for r in records if r.HasField("run")]
    assert run.project == "kd" and run.run_id == result["run_id"]
    config = items(run.config.update)
    assert config["train.steps"] == "3" and config["train.objective"] == "fkl+ce"
    history = [items(r.history.item) for r in records if r.HasField("history")]
    assert [(h["_step"], h["train/loss"]) for h in history] == [(1, 3.0), (2, 2.4), (3, 2.0)], "one point per step"
    assert "train/elapsed_s" not in history[0]
    summary = {}
    for r in records:
        if r.HasField("summary"):
            summary.update(items(r.summary.update))
    assert summary["eval/student/exact_match"] == 0.6 and summary["eval/student/exact_match/ci_low"] == pytest.approx(0.55)
    assert summary["gate/promoted"] == 1
    assert [r.artifact.type for r in records if r.HasField("artifact")] == ["report"]
