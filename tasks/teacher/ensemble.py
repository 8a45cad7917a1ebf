"""Multi-teacher stage: extra teachers score the main teacher's training responses; their labels are merged, routed,
or kept as a pair for dynamic teacher adoption.

Members share the student's tokenizer (`check_members`, run at prepare time, before any teacher compute). Each
member teacher-forces the main teacher's sampled responses (the capture's score mode with the rows' own
`response_ids`, response_source kept), so every member labels the same sequences row for row, which is what
`merge_label_sets` needs. Then, by `ensemble.mode`:

* mean: `merge_label_sets` (rule mean-prob-union-v1, storage/FORMAT.md) over the main teacher and the members;
* route: `route_label_sets`, each example from the member its dataset column names (`ensemble.routes`);
* pair (train.dynamic_teacher): the main teacher's shards with the small teacher's beside them under `small/`,
  hard-linked (copied where links fail) inside the new folder, and `metadata.pair` naming them; the training loop
  reads both in lockstep (`attach_pair`).

Member captures live under `<cache>/ensemble/members/<member key>/train`, keyed by the main labels, the member
model and its settings, so a retry or another mode/weighting reuses them (finished shards are kept). The stage's
output is a `TeacherLabels` whose train manifest is the combined set and whose eval manifest is the main teacher's.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Callable

import numpy as np

from storage import soft_labels
from storage.atomic import sha256_json, write_json
from storage.errors import UserError
from tasks.config import EnsembleConfig, MemberTeacherConfig, PipelineConfig, StageConfig, TeacherConfig
from tasks.contracts import Frozen, PreparedData, TeacherLabels
from tasks.identity import model_content_hash, model_identity
from tasks.models import load_tokenizer, resolve_model_dir, tokenizer_hash
from tasks.stage_cache import StageContext, StageSpec
from tasks.teacher.merge import merge_label_sets, route_label_sets

LABEL_FIELDS = ("topk_ids", "topk_logprobs", "token_logprob", "tail_logmass")


class EnsembleError(UserError):
    """Multi-teacher settings that cannot work with these models or data; the message names the member and the fix."""


# --- prepare time ------------------------------------------------------------------------------------------------

def resolve_member(member: MemberTeacherConfig, config: PipelineConfig, log: Callable[[str], None] = print) -> str:
    """A member's model folder; 'demo-small' builds the demo's second teacher once."""
    from tasks.demo.assets import SMALL_TEACHER, ensure_small_teacher

    if member.model == SMALL_TEACHER:
        if config.data.source != "demo":
            raise EnsembleError("teachers[].model 'demo-small' needs data.source 'demo'")
        return ensure_small_teacher(Path(config.data_dir), seed=config.data.demo_seed, teacher_steps=config.data.demo_teacher_steps,
                                    log_fn=log, task_name=config.data.demo_task)
    return resolve_model_dir(member.model, None, member.revision, "teachers[].model")


def check_members(config: PipelineConfig, prepared: PreparedData, log: Callable[[str], None] = print) -> list[str]:
    """Resolve every member and refuse one whose tokenizer is not the student's (before any teacher compute)."""
    dirs = []
    for i, member in enumerate(config.teachers):
        folder = resolve_member(member, config, log)
        found = tokenizer_hash(load_tokenizer(folder, member.engine.trust_remote_code))
        if found != prepared.tokenizer_hash:
            raise EnsembleError(f"teachers[{i}].model {member.model!r}: tokenizer {found} differs from the student's "
                                f"{prepared.tokenizer_hash}; every teacher must share the student's tokenizer")
        top_k = member.top_k or config.teacher.top_k
        if top_k > prepared.vocab_size:
            raise EnsembleError(f"teachers[{i}].top_k={top_k} is larger than the vocabulary ({prepared.vocab_size})")
        dirs.append(folder)
    return dirs


# --- the stage ---------------------------------------------------------------------------------------------------

class EnsembleStageConfig(StageConfig):
    """What the multi-teacher stage's output depends on (composed by the flow from PipelineConfig)."""

    main: TeacherConfig
    members: list[MemberTeacherConfig]
    ensemble: EnsembleConfig
    pair: bool = False  # train.dynamic_teacher: keep the two label sets side by side instead of merging


class EnsembleInputs(Frozen):
    prepared: PreparedData
    labels: TeacherLabels
    member_dirs: list[str]
    routing_rows: str | None = None  # JSONL/Parquet with example ids and ensemble.route_column (mode route)


def member_config(main: TeacherConfig, member: MemberTeacherConfig) -> TeacherConfig:
    return main.model_copy(update={"model": member.model, "revision": member.revision, "top_k": member.top_k or main.top_k,
                                   "engine": member.engine, "replicas": member.replicas,
                                   "cpus_per_replica": member.cpus_per_replica, "use_gpu": member.use_gpu, "mode": "score"})


def scored_prompts(manifest: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The main teacher's training rows as score-mode prompts (their responses are what the members score)."""
    meta = soft_labels.load_manifest(manifest)["metadata"]
    rows = [{"example_id": r["example_id"], "prompt_ids": [int(t) for t in r["prompt_ids"]],
             "response_ids": [int(t) for t in r["response_ids"]]} for r in soft_labels.read(manifest)]
    return rows, meta


def capture_member(cfg: TeacherConfig, member_dir: str, prompts: list[dict[str, Any]], main_meta: dict[str, Any],
                   out_dir: Path, log: Callable[[str], None]) -> Path:
    """One member teacher-forces the main teacher's responses; returns its train manifest."""
    import ray

    from tasks.teacher.stage import capture_on_replicas, label_metadata, start_replicas

    source = main_meta.get("response_source", "teacher_sample")
    metadata = label_metadata(cfg, member_dir, main_meta.get("split", "train"), {}, "score", teacher_hash=model_content_hash(member_dir))
    metadata.pop("reference_prefix", None)
    metadata.update(response_source=source, scored_responses_of=main_meta.get("teacher_key"))
    metadata["teacher_key"] = sha256_json({"member": metadata["teacher_key"], "scored": metadata["scored_responses_of"]})[:16]
    from tasks.teacher.capture import inputs_key, shard_chunks

    finished = [soft_labels.finished_shard(out_dir, i, metadata, inputs_key=inputs_key(chunk, "score"))
                for i, chunk in enumerate(shard_chunks(prompts, cfg.shard_rows))]
    if all(record is not None for record in finished):  # a retry after the merge failed: no engine needed
        return soft_labels.write_manifest(out_dir, finished, metadata)
    replicas = start_replicas(cfg, member_dir)
    try:
        manifest, _, _ = capture_on_replicas(replicas, prompts, out_dir, split=metadata["split"], metadata=metadata,
                                             shard_rows=cfg.shard_rows, sampling={"source": source}, mode="score")
    finally:
        for replica in replicas:
            ray.kill(replica)
    log(f"ensemble: {cfg.model} scored {len(prompts)} responses of the main teacher: {manifest}")
    return manifest


def link_or_copy(source: Path, target: Path) -> None:
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def copy_label_set(manifest: str | Path, out_dir: Path, extra_metadata: dict[str, Any] | None = None) -> Path:
    """The label set re-listed inside out_dir: shards hard-linked (or copied) with their sidecars, manifest last."""
    loaded = soft_labels.load_manifest(manifest)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for index, record in enumerate(loaded["shards"]):
        name = soft_labels.shard_name(index)
        link_or_copy(Path(loaded["_dir"]) / record["path"], out_dir / name)
        records.append({**record, "path": name})
        write_json((out_dir / name).with_suffix(".json"), records[-1])
    return soft_labels.write_manifest(out_dir, records, {**loaded["metadata"], **(extra_metadata or {})})


def write_pair(main_manifest: str, small_manifest: str | Path, out_dir: Path) -> Path:
    """The main (large) teacher's set with the small teacher's under `small/`, both inside out_dir."""
    small = copy_label_set(small_manifest, out_dir / "small")
    small_meta = soft_labels.load_manifest(small)["metadata"]
    pair = {"manifest": "small/" + soft_labels.MANIFEST_NAME, "role": "small", "teacher_model": small_meta.get("teacher_model"),
            "teacher_key": small_meta.get("teacher_key"), "source": str(small_manifest)}
    return copy_label_set(main_manifest, out_dir, {"pair": pair})


def attach_pair(rows: list[dict[str, Any]], small_rows: Iterable[dict[str, Any]], where: str) -> None:
    """Put the small teacher's labels of each row under row['small']; the two sets must hold the same sequences."""
    small_rows = list(small_rows)
    if len(small_rows) != len(rows):
        raise soft_labels.SoftLabelError(f"{where}: {len(rows)} rows against {len(small_rows)}; rerun the multi-teacher stage")
    for i, (row, other) in enumerate(zip(rows, small_rows)):
        if row["example_id"] != other["example_id"] or not np.array_equal(row["response_ids"], other["response_ids"]):
            raise soft_labels.SoftLabelError(
                f"{where}: row {i} is example {row['example_id']} (sample {row['sample_id']}) in one set and "
                f"{other['example_id']} (sample {other['sample_id']}) in the other; the paired sets must score the same "
                "responses in the same order - rerun the multi-teacher stage")
        row["small"] = {f: other[f] for f in LABEL_FIELDS}


def routing_table(path: str | Path, column: str, routes: dict[str, int]) -> dict[str, int]:
    """example_id -> member index from a JSONL/Parquet of the training data ('example_id' or 'id' names the example)."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    else:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    out = {}
    for i, row in enumerate(rows):
        example = row.get("example_id", row.get("id"))
        if example is None or column not in row:
            raise EnsembleError(f"{path}: row {i} has no example id or no column {column!r} (ensemble.route_column)")
        if str(row[column]) not in routes:
            raise EnsembleError(f"{path}: example {example}: {column}={row[column]!r} is not in ensemble.routes "
                                f"{routes}; add it")
        out[str(example)] = int(routes[str(row[column])])
    return out


def run_ensemble_stage(cfg: EnsembleStageConfig, inputs: EnsembleInputs, ctx: StageContext) -> TeacherLabels:
    from tasks.ray_runtime import ensure_ray

    ensure_ray(ctx.ray_address)
    main = inputs.labels.train_manifest
    prompts, main_meta = scored_prompts(main)
    members = []
    for member, folder in zip(cfg.members, inputs.member_dirs):
        member_cfg = member_config(cfg.main, member)
        # Keyed by what the capture depends on, beside the stage folders: another mode or weight reuses it.
        key = sha256_json({"labels": inputs.labels.key, "model": model_identity(folder),
                           "config": member_cfg.model_dump(mode="json", exclude=set(TeacherConfig.output_neutral_fields))})[:16]
        members.append(str(capture_member(member_cfg, folder, prompts, main_meta,
                                          ctx.out_dir.parent / "members" / key / "train", ctx.log)))
    out = ctx.out_dir / "train"
    if cfg.pair:
        manifest = write_pair(main, members[0], out)
    elif cfg.ensemble.mode == "mean":
        weights = [cfg.ensemble.main_weight] + [m.weight for m in cfg.members]
        manifest = merge_label_sets([main, *members], out, weights=weights, k=cfg.ensemble.k, shard_rows=cfg.main.shard_rows,
                                    expected_tokenizer_hash=inputs.prepared.tokenizer_hash, log_fn=ctx.log)
    else:
        if inputs.routing_rows is None:
            raise EnsembleError("ensemble.mode=route needs the training data with ensemble.route_column "
                                "(a local dataset folder)")
        routing = routing_table(inputs.routing_rows, cfg.ensemble.route_column, cfg.ensemble.routes)
        manifest = route_label_sets([main, *members], routing, out, k=cfg.ensemble.k, shard_rows=cfg.main.shard_rows,
                                    routing_source=f"{inputs.routing_rows}:{cfg.ensemble.route_column}",
                                    expected_tokenizer_hash=inputs.prepared.tokenizer_hash, log_fn=ctx.log)
    ctx.log(f"ensemble: {'pair' if cfg.pair else cfg.ensemble.mode} of {1 + len(members)} teachers -> {manifest}")
    return TeacherLabels(key=ctx.key, train_manifest=str(manifest), eval_manifest=inputs.labels.eval_manifest)


def _key_parts(cfg: EnsembleStageConfig, inputs: EnsembleInputs) -> dict[str, Any]:
    return {"labels": inputs.labels.key, "members": [model_identity(d) for d in inputs.member_dirs],
            "routing_rows": inputs.routing_rows}


def _intact(output: TeacherLabels) -> bool:
    from tasks.teacher.stage import labels_intact

    if not labels_intact(output):
        return False
    pair = soft_labels.load_manifest(output.train_manifest)["metadata"].get("pair")
    return pair is None or labels_intact(output.model_copy(update={
        "train_manifest": str(Path(output.train_manifest).parent / pair["manifest"])}))


STAGE = StageSpec(name="ensemble", version=1, output_type=TeacherLabels, run=run_ensemble_stage, key_parts=_key_parts,
                  verify=_intact, describe="multi-teacher labels")
