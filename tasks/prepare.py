"""prepare-data stage: resolve the models, validate and tokenise the prompts, and check everything else that
needs no teacher compute (label size against the vocabulary, training workers against the cluster, the registry).

Runs on every flow run (it is seconds of work) and writes its manifest next to
the prompt shards; the typed `PreparedData` it returns is what later stages key on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from storage.atomic import sha256_json, write_json
from storage.errors import UserError
from tasks.config import PipelineConfig
from tasks.contracts import PreparedData, SplitFile
from tasks.data import prepare
from tasks.identity import model_content_hash
from tasks.models import resolve_model_dir


class PrepareError(UserError):
    """A setting that cannot work with these models or this cluster."""


def registry_dir(config: PipelineConfig) -> Path:
    return Path(config.promotion.registry_dir or Path(config.data_dir) / "registry")


def resolve_models(config: PipelineConfig, log: Callable[[str], None]) -> tuple[str, str, str]:
    """(dataset source, teacher folder, student folder): the demo's assets are built once when any of them is 'demo'."""
    demo: dict[str, str] = {}
    source = config.data.source
    from tasks.demo.assets import DEMO_STUDENTS, demo_model_dir, ensure_demo_assets

    if source == "demo" or config.teacher.model == "demo" or config.train.student in DEMO_STUDENTS:
        demo = ensure_demo_assets(Path(config.data_dir), seed=config.data.demo_seed, teacher_steps=config.data.demo_teacher_steps,
                                  log_fn=log, task_name=config.data.demo_task, base_steps=config.data.demo_base_steps)
        if source == "demo":
            source = demo["dataset"]
    teacher_dir = resolve_model_dir(config.teacher.model, demo.get("teacher"), config.teacher.revision, "teacher.model")
    student_ref = "demo" if config.train.student in DEMO_STUDENTS else config.train.student  # demo, demo-base, demo-random
    student_dir = resolve_model_dir(student_ref, demo_model_dir(config.train.student, demo) if demo else None, None, "train.student")
    return source, teacher_dir, student_dir


def check_cluster(config: PipelineConfig, ray_address: str | None) -> None:
    """Training workers and teacher replicas against the Ray cluster's CPUs, before the teacher starts."""
    from tasks.ray_runtime import cluster_cpus, ensure_ray

    ensure_ray(ray_address)
    cpus = cluster_cpus()
    if not config.train.use_gpu and config.train.num_workers > cpus:
        raise PrepareError(f"train.num_workers={config.train.num_workers} but the Ray cluster offers {cpus:.0f} CPUs; "
                           "lower train.num_workers or join a larger cluster (train.ray_address)")
    need = config.teacher.replicas * config.teacher.cpus_per_replica
    if not config.teacher.use_gpu and need > cpus:
        raise PrepareError(f"teacher.replicas={config.teacher.replicas} needs {need:g} CPUs but the Ray cluster offers "
                           f"{cpus:.0f}; lower teacher.replicas or teacher.cpus_per_replica")


def run(config: PipelineConfig, run_dir: Path, log: Callable[[str], None] = print) -> PreparedData:
    """Stage entry point: prompt shards under run_dir/prompts and their typed manifest."""
    from storage.registry import check_registry_dir

    check_registry_dir(registry_dir(config))
    source, teacher_dir, student_dir = resolve_models(config, log)
    manifest = prepare(config.data, source, teacher_dir, student_dir, Path(run_dir) / "prompts", config.teacher.max_new_tokens,
                       top_k=config.teacher.top_k)
    check_cluster(config, config.train.ray_address)
    splits = manifest["splits"]
    prepared = PreparedData(
        key="prepared-" + sha256_json({name: split["sha256"] for name, split in splits.items()})[:16],
        source=str(source), train=SplitFile(**splits[manifest["train_split"]]), eval=SplitFile(**splits[manifest["eval_split"]]),
        train_split=manifest["train_split"], eval_split=manifest["eval_split"], tokenizer_hash=manifest["tokenizer_hash"],
        vocab_size=manifest["vocab_size"], teacher_dir=teacher_dir, student_dir=student_dir,
        teacher_hash=model_content_hash(teacher_dir, memo_dir=Path(config.data_dir).resolve() / "cache" / "model-hash"),
        checks=manifest.get("checks", {}),
    )
    write_json(Path(run_dir) / "prompts" / "prepared.json", prepared.model_dump(mode="json", exclude={"reused"}))
    return prepared
