"""Training stage entry point: run the per-worker loop on Ray Train's TorchTrainer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from storage.errors import UserError
from tasks.augment.flow_stage import MixKDLabels
from tasks.config import TrainConfig
from tasks.contracts import Frozen, TeacherLabels, TrainedStudent
from tasks.faults import NO_FAULTS, FaultPlan
from tasks.identity import model_identity
from tasks.stage_cache import StageContext, StageSpec
from tasks.train.loop_config import LoopConfig


class TrainingError(RuntimeError):
    """Training failed (a worker error Ray could not recover from)."""


class TrainingSetupError(TrainingError, UserError):
    """Training cannot start as configured (unwritable place, more workers than the cluster has); the message says the fix."""


def checkpoint_storage(cfg: TrainConfig, out_dir: Path) -> dict[str, Any]:
    """Ray Train's RunConfig name/storage: <out_dir>/ray by default, else train.checkpoint_storage (a shared path or
    URI every worker reaches), under a name unique to this training stage's output folder. Checked writable."""
    from storage.location import locate

    if cfg.checkpoint_storage is None:
        return {"name": "train", "storage_path": str((out_dir / "ray").resolve())}
    where = locate(cfg.checkpoint_storage)
    probe = where.join(f".stillhouse-write-probe-{os.getpid()}")
    try:
        where.fs.create_dir(where.path, recursive=True)
        with where.fs.open_output_stream(probe.path) as f:
            f.write(b"ok")
        where.fs.delete_file(probe.path)
    except (OSError, ValueError) as exc:
        raise TrainingSetupError(f"train.checkpoint_storage {where} is not writable ({exc}); fix permissions or choose another place") from exc
    return {"name": f"train-{out_dir.name}", "storage_path": where.path, "storage_filesystem": where.fs}


def fetch_student(checkpoint, target: Path) -> None:
    """Copy the student folder out of a Ray Train checkpoint (local, shared or object storage) to `target`."""
    import shutil

    with checkpoint.as_directory() as folder:
        source = Path(folder) / "student"
        if not (source / "config.json").exists():
            return
        tmp = target.with_name(target.name + ".tmp-fetch")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)


def run_train_stage(cfg: TrainConfig, student_dir: str, labels_manifest: str, out_dir: Path, log_fn=print,
                    faults: FaultPlan = NO_FAULTS, ray_address: str | None = None,
                    mixkd: MixKDLabels | None = None) -> dict[str, Any]:
    """Train and return the checkpoint folder (HF format, safetensors) and the log file."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tasks.objectives import build_objective
    from tasks.ray_runtime import cluster_cpus, ensure_ray

    # Fail on a bad objective before any worker starts.
    build_objective(cfg.objective, support=cfg.support, temperature=cfg.temperature, **cfg.objective_params)
    ensure_ray(ray_address or cfg.ray_address)
    cpus = cluster_cpus()
    if not cfg.use_gpu and cfg.num_workers > cpus:
        raise TrainingSetupError(f"train.num_workers={cfg.num_workers} but the Ray cluster offers {cpus:.0f} CPUs; lower it")
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / ".write-probe").write_bytes(b"ok")
        (out_dir / ".write-probe").unlink()
    except OSError as exc:
        raise TrainingSetupError(f"training output folder {out_dir} is not writable ({exc}); fix permissions or set data_dir") from exc
    checkpoint_storage(cfg, out_dir)  # refuses an unwritable place before any worker starts
    cpus_per_worker = max(1, int(cpus // cfg.num_workers)) if not cfg.use_gpu else 1
    loop_config = LoopConfig.build(cfg, student_dir=student_dir, manifest=labels_manifest, out_dir=out_dir,
                                   threads_per_worker=cpus_per_worker, faults=faults, mixkd=mixkd)
    from tasks.train.loop import train_loop_per_worker

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config.model_dump(mode="json"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": cpus_per_worker}),
        # Same name + storage path on a rerun: Ray Train resumes from the latest checkpoint.
        run_config=RunConfig(**checkpoint_storage(cfg, out_dir),
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()
    if result.error:
        raise TrainingError(f"training failed: {result.error}")
    checkpoint = out_dir / "student"
    if not (checkpoint / "config.json").exists() and result.checkpoint is not None:
        fetch_student(result.checkpoint, checkpoint)  # the workers wrote it on a filesystem this driver does not see
    if not (checkpoint / "config.json").exists():
        raise TrainingError(f"training finished without a checkpoint at {checkpoint}")
    return {"checkpoint": str(checkpoint), "log": str(out_dir / "train_log.jsonl")}


class TrainInputs(Frozen):
    """What the training stage reads: the initial student and the teacher's labels."""

    student_dir: str
    labels: TeacherLabels
    mixkd: MixKDLabels | None = None  # the mixkd stage's output when train.mixkd is set


def run(cfg: TrainConfig, inputs: TrainInputs, ctx: StageContext) -> TrainedStudent:
    """Stage entry point: distil the student on the stored labels into ctx.out_dir."""
    result = run_train_stage(cfg, inputs.student_dir, inputs.labels.train_manifest, ctx.out_dir, log_fn=ctx.log,
                             faults=ctx.faults, ray_address=ctx.ray_address, mixkd=inputs.mixkd)
    return TrainedStudent(key=ctx.key, checkpoint=result["checkpoint"], log=result["log"])


def _key_parts(cfg: TrainConfig, inputs: TrainInputs) -> dict[str, Any]:
    parts = {"labels": inputs.labels.key, "student_model": model_identity(inputs.student_dir)}
    if inputs.mixkd is not None:
        parts["mixkd"] = inputs.mixkd.key
    return parts


def _student_intact(output: TrainedStudent) -> bool:
    return (Path(output.checkpoint) / "config.json").exists()


STAGE = StageSpec(name="train", version=2, output_type=TrainedStudent, run=run, key_parts=_key_parts,
                  verify=_student_intact, describe="student")
