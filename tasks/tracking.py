"""Experiment tracking: each finished flow run goes to MLflow (or Weights & Biases), read back from its files.

Everything is read after the run from what the stages wrote (run.json, train_log.jsonl,
metrics.json, report.md/png), so nothing hooks the Ray workers and a run can be tracked
again later. What an MLflow run holds:

- params: the flattened PipelineConfig (`train.steps`, `teacher.engine.dtype`, ...);
- step metrics `train/<name>` from train_log.jsonl (loss, loss parts, lr, grad_norm, tokens_per_s);
- metrics `eval/<model>/<metric>` plus `.../ci_low` and `.../ci_high` (95% bootstrap interval);
- artifacts under `report/`: report.md, report.png, run.json, config.json, metrics.json;
- tags `stillhouse.*` (run folder, registry version, gate decision).

The stillhouse registry stays the source of truth for versions and aliases;
`sync_aliases` mirrors it into an MLflow registered model: one model version per
registry version (source = the registry folder), and the aliases (`champion`,
`challenger`, ...) set to match `aliases.json`.

By default the store is local: `sqlite:///<data_dir>/mlflow.db`, artifacts under
`<data_dir>/mlruns` (`mlflow ui --backend-store-uri sqlite:///<data_dir>/mlflow.db`).
`tracking.uri` points at a team server instead. A tracking failure is logged as a
warning and never fails a finished run; a backend that is not installed is a config error.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from storage.errors import UserError
from storage.registry import ModelRegistry, RegistryError
from tasks.report import read_train_log

logger = logging.getLogger(__name__)

# Step metrics taken from train_log.jsonl (plus every loss_<part>); the rest (elapsed_s, eta_s) is progress, not a curve.
TRAIN_KEYS = ("loss", "lr", "grad_norm", "tokens_per_s")
REPORT_FILES = ("report.md", "report.png", "run.json", "config.json")
MAX_PARAM_CHARS = 6000  # MLflow's limit on a parameter value
VERSION_TAG = "stillhouse.version"
RUN_DIR_TAG = "stillhouse.run_dir"


class TrackingConfigError(UserError):
    """Bad tracking settings (unknown backend, backend not installed)."""


class TrackingConfig(BaseModel):
    """Where finished runs are recorded for comparison (PipelineConfig.tracking)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    backend: Literal["none", "mlflow", "wandb"] = Field(
        "mlflow", description="mlflow (local sqlite store under data_dir unless `uri` is set), wandb (offline unless `uri` "
        "is set; needs the wandb package), or none.")
    uri: str | None = Field(
        None, description="mlflow: tracking URI of a team server (http://host:5000) or another store; default "
        "sqlite:///<data_dir>/mlflow.db with artifacts in <data_dir>/mlruns. wandb: the server's base URL (runs online).")
    experiment: str = Field("stillhouse", min_length=1, description="MLflow experiment / W&B project.")
    registered_model: str = Field(
        "stillhouse-student", min_length=1,
        description="MLflow registered model mirroring the stillhouse registry (versions and champion/challenger aliases).")

    @model_validator(mode="after")
    def _installed(self) -> TrackingConfig:
        check_backend(self)
        return self


def check_backend(cfg: TrackingConfig) -> None:
    """TrackingConfigError if the chosen backend's package is not importable."""
    package = {"mlflow": "mlflow", "wandb": "wandb"}.get(cfg.backend)
    if package and importlib.util.find_spec(package) is None:
        fix = "pip install mlflow-skinny" if package == "mlflow" else "pip install wandb"
        raise TrackingConfigError(f"tracking.backend is {cfg.backend!r} but the {package} package is not installed; "
                                  f"run `{fix}` or set tracking.backend=none")


def mlflow_uri(cfg: TrackingConfig, data_dir: str | Path) -> str:
    return cfg.uri or f"sqlite:///{Path(data_dir).expanduser().resolve() / 'mlflow.db'}"


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{'train': {'steps': 3}} -> {'train.steps': '3'}; lists and None as JSON, values cut to MLflow's limit."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
            out[name] = text[:MAX_PARAM_CHARS]
    return out


def training_curve(train_log: str | Path | None) -> list[dict[str, float]]:
    """One row per optimizer step (the last line wins where a resumed run logged a step twice), sorted by step,
    with only the finite curve values."""
    by_step: dict[int, dict[str, float]] = {}
    for row in read_train_log(Path(train_log) if train_log else None):
        keep = {k: float(v) for k, v in row.items() if (k in TRAIN_KEYS or k.startswith("loss_")) and _finite(v)}
        by_step[int(row["step"])] = keep
    return [{"step": step, **by_step[step]} for step in sorted(by_step)]


def eval_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """{'eval/student/exact_match': v, 'eval/student/exact_match/ci_low': lo, ...} for every finite value."""
    out = {}
    for who in ("student", "teacher"):
        for name, stat in (metrics.get(who) or {}).items():
            if not isinstance(stat, Mapping):
                continue
            for part, suffix in (("value", ""), ("ci_low", "/ci_low"), ("ci_high", "/ci_high")):
                if _finite(stat.get(part)):
                    out[f"eval/{who}/{name}{suffix}"] = float(stat[part])
    return out


def track_run(cfg: TrackingConfig, data_dir: str | Path, run_json_path: str | Path, pipeline_config: Mapping[str, Any], *,
              registry_dir: str | Path | None = None, log_fn: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Record one finished flow run; with `registry_dir`, also mirror the registry's versions and aliases (MLflow).

    Returns {"backend", "run_id", "url", "tracking_uri"} (run_id None for backend none); on a failure it logs a
    warning and returns the same keys with run_id None and "error" — tracking never fails a finished run."""
    warn = log_fn or logger.warning
    result: dict[str, Any] = {"backend": cfg.backend, "run_id": None, "url": None, "tracking_uri": None}
    if cfg.backend == "none":
        return result
    try:
        run = json.loads(Path(run_json_path).read_text())
        inputs = _RunFiles.read(run, Path(run_json_path))
        if cfg.backend == "mlflow":
            result.update(_mlflow_track(cfg, data_dir, run, inputs, flatten(pipeline_config)))
            if registry_dir is not None:
                result["aliases"] = sync_aliases(cfg, registry_dir, data_dir=data_dir)
        else:
            result.update(_wandb_track(cfg, data_dir, run, inputs, flatten(pipeline_config)))
    except Exception as exc:  # a finished run stays finished; the warning says what to fix
        warn(f"tracking: could not record the run in {cfg.backend} ({type(exc).__name__}: {exc}); the run itself is complete")
        result["error"] = f"{type(exc).__name__}: {exc}"
    return result


class _RunFiles:
    """What a finished run left on disk, read once for any backend."""

    def __init__(self, curve: list[dict[str, float]], metrics: dict[str, float], artifacts: list[Path]) -> None:
        self.curve, self.metrics, self.artifacts = curve, metrics, artifacts

    @classmethod
    def read(cls, run: Mapping[str, Any], run_json: Path) -> _RunFiles:
        run_dir = Path(run.get("run_dir") or run_json.parent)
        metrics_file = Path(run["metrics_file"]) if run.get("metrics_file") else None
        full = json.loads(metrics_file.read_text()) if metrics_file and metrics_file.exists() else {}
        values = eval_metrics(full) if full else {  # run.json alone has the values without intervals
            f"eval/{who}/{m}": float(v) for who in ("student", "teacher") for m, v in (run.get("metrics", {}).get(who) or {}).items() if _finite(v)}
        decision = run.get("decision") or {}
        if "promoted" in decision:
            values["gate/promoted"] = float(bool(decision["promoted"]))
        if _finite(run.get("wall_seconds")):
            values["run/wall_seconds"] = float(run["wall_seconds"])
        files = [run_json] + [run_dir / name for name in REPORT_FILES if name != "run.json"] + ([metrics_file] if metrics_file else [])
        return cls(training_curve(run.get("train_log")), values, [p for p in files if p.is_file()])


# ----- MLflow -------------------------------------------------------------------------


def _mlflow_client(cfg: TrackingConfig, data_dir: str | Path):
    from mlflow import MlflowClient

    uri = mlflow_uri(cfg, data_dir)
    for name in ("mlflow", "alembic"):  # table creation and migrations print INFO lines on a fresh store
        logging.getLogger(name).setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


def _experiment_id(client, cfg: TrackingConfig, data_dir: str | Path, uri: str) -> str:
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(cfg.experiment)
    if found is not None:
        return found.experiment_id
    local = uri.startswith(("sqlite:", "file:"))  # a local store keeps artifacts beside the data, not in ./mlruns
    location = (Path(data_dir).expanduser().resolve() / "mlruns").as_uri() if local else None
    try:
        return client.create_experiment(cfg.experiment, artifact_location=location)
    except MlflowException:  # created by a concurrent run in between
        return client.get_experiment_by_name(cfg.experiment).experiment_id


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _mlflow_track(cfg: TrackingConfig, data_dir, run: Mapping, files: _RunFiles, params: dict[str, str]) -> dict[str, Any]:
    from mlflow.entities import Metric, Param, RunTag

    client, uri = _mlflow_client(cfg, data_dir)
    experiment_id = _experiment_id(client, cfg, data_dir, uri)
    run_dir = str(run.get("run_dir") or "")
    done = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_DIR_TAG}` = {_quote(run_dir)} and attributes.status = 'FINISHED'",
                              max_results=1) if run_dir else []
    if done:  # the same flow run tracked again (a retry of the tracking step): one MLflow run per flow run
        return {"run_id": done[0].info.run_id, "url": _mlflow_url(uri, experiment_id, done[0].info.run_id), "tracking_uri": uri}

    decision = run.get("decision") or {}
    tags = {RUN_DIR_TAG: run_dir, "stillhouse.run_name": str(run.get("run_name", "")),
            "stillhouse.promoted": str(bool(decision.get("promoted"))).lower(),
            "mlflow.note.content": str(decision.get("summary", ""))[:5000]}
    if decision.get("version"):
        tags[VERSION_TAG] = str(decision["version"])
    if run.get("reused_stages") is not None:
        tags["stillhouse.reused_stages"] = ",".join(run["reused_stages"]) or "-"
    mlflow_run = client.create_run(experiment_id, run_name=run.get("run_name"), tags=tags)
    run_id = mlflow_run.info.run_id
    try:
        now = int(time.time() * 1000)
        param_list = [Param(k, v) for k, v in sorted(params.items())]
        for chunk in _chunks(param_list, 100):
            client.log_batch(run_id, params=chunk)
        metric_list = [Metric(f"train/{k}", v, now, int(row["step"])) for row in files.curve for k, v in row.items() if k != "step"]
        metric_list += [Metric(k, v, now, 0) for k, v in sorted(files.metrics.items())]
        for chunk in _chunks(metric_list, 1000):
            client.log_batch(run_id, metrics=chunk)
        for path in files.artifacts:
            client.log_artifact(run_id, str(path), artifact_path="report")
        client.log_batch(run_id, tags=[RunTag("stillhouse.train_steps_logged", str(len(files.curve)))])
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return {"run_id": run_id, "url": _mlflow_url(uri, experiment_id, run_id), "tracking_uri": uri}


def _mlflow_url(uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page on an MLflow server; None for a local store (open it with `mlflow ui`)."""
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return None


def sync_aliases(cfg: TrackingConfig, registry_dir: str | Path, *, data_dir: str | Path | None = None) -> dict[str, str]:
    """Mirror the stillhouse registry into MLflow's model registry; returns {alias: stillhouse version}.

    Every registry version becomes a model version of `cfg.registered_model` (once; tagged
    stillhouse.version, source = the registry folder, linked to the MLflow run that recorded it), then
    each alias in aliases.json is set on the matching model version and aliases the registry no longer
    has are removed. Safe to call any number of times. W&B has no alias mirror: {} there and for none."""
    if cfg.backend != "mlflow":
        return {}
    from mlflow.exceptions import MlflowException

    try:
        registry = ModelRegistry(registry_dir, create=False)
    except RegistryError:
        return {}
    client, uri = _mlflow_client(cfg, data_dir or Path(registry_dir).parent)
    name = cfg.registered_model
    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description=f"Mirror of the stillhouse registry at {registry.root} (the source of truth).")
        except MlflowException:  # created concurrently
            pass
    mirrored = _mirrored_versions(client, name)
    experiment = client.get_experiment_by_name(cfg.experiment)
    for entry in registry.versions():
        if entry.version in mirrored:
            continue
        run_id = None
        if experiment is not None:
            runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{VERSION_TAG}` = {_quote(entry.version)}",
                                      order_by=["attributes.start_time ASC"], max_results=1)
            run_id = runs[0].info.run_id if runs else None
        created = client.create_model_version(
            name, source=Path(entry.path).as_uri(), run_id=run_id,
            tags={VERSION_TAG: entry.version, "stillhouse.train_key": str(entry.lineage.get("train_key", ""))},
            description=str(entry.decision.get("summary", ""))[:5000])
        mirrored.setdefault(entry.version, str(created.version))
    mirrored = _mirrored_versions(client, name)  # concurrent writers: the lowest MLflow version per registry version wins

    wanted = registry.aliases()
    current = dict(client.get_registered_model(name).aliases or {})
    for alias, version in sorted(wanted.items()):
        target = mirrored.get(version)
        if target is not None and str(current.get(alias)) != target:
            client.set_registered_model_alias(name, alias, target)
    for alias in sorted(set(current) - set(wanted)):
        client.delete_registered_model_alias(name, alias)
    return dict(wanted)


def _mirrored_versions(client, name: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for mv in sorted(client.search_model_versions(f"name={_quote(name)}"), key=lambda mv: int(mv.version)):
        version = (mv.tags or {}).get(VERSION_TAG)
        if version and version not in out:
            out[version] = str(mv.version)
    return out


# ----- Weights & Biases ---------------------------------------------------------------


def _wandb_track(cfg: TrackingConfig, data_dir, run: Mapping, files: _RunFiles, params: dict[str, str]) -> dict[str, Any]:
    """Offline by default (no account: `wandb sync <data_dir>/wandb/offline-run-*` uploads later); online with tracking.uri."""
    import wandb

    folder = Path(data_dir).expanduser().resolve() / "wandb"
    folder.mkdir(parents=True, exist_ok=True)
    # silent: no run summary on the console (the CLI's console stays short); console off: stdout is not captured.
    settings = wandb.Settings(silent=True, console="off", **({"base_url": cfg.uri} if cfg.uri else {}))
    # W&B's Weave hook advertises itself when openai is imported (vLLM imports it); we trace no LLM calls.
    os.environ.setdefault("WANDB_DISABLE_WEAVE", "true")
    wb = wandb.init(project=cfg.experiment, name=run.get("run_name"), config=params, dir=str(folder),
                    mode="online" if cfg.uri else "offline", settings=settings)
    try:
        for row in files.curve:
            wb.log({f"train/{k}": v for k, v in row.items() if k != "step"}, step=int(row["step"]))
        wb.summary.update(files.metrics)
        artifact = wandb.Artifact(f"report-{run.get('run_name', 'run')}", type="report")
        for path in files.artifacts:
            artifact.add_file(str(path))
        wb.log_artifact(artifact)
    finally:
        wb.finish()
        # finish() returns before W&B's service has written everything: in a long-lived process (a notebook, a
        # test session) the offline run file stayed incomplete until the process exited. teardown() waits for it.
        wandb.teardown()
    return {"run_id": wb.id, "url": wb.url if cfg.uri else None, "tracking_uri": cfg.uri or str(folder)}


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
