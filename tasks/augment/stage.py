"""MixKD stages: write the mixup plan, then have the teacher score the mixed inputs into soft-label shards.

The teacher runs in transformers (see tasks/augment/mixing.py for why not vLLM), inside a
Ray actor when a Ray runtime is asked for (`use_ray=True` or `ray_address`), in-process
otherwise. Output: one soft-label capture per epoch, `<out_dir>/epoch-NNNN/`, in the
format of storage/FORMAT.md with `response_source: mixup`; each row's `example_id` is its
plan row id. Shards are resumable like the teacher stage's (same inputs and setup:
reused; anything else: rewritten).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from storage import soft_labels
from storage.atomic import sha256_json
from tasks.augment import plan as plan_mod
from tasks.augment.config import MixKDConfig
from tasks.augment.mixing import align_pair, collate, teacher_label_rows
from tasks.identity import model_content_hash
from tasks.models import load_causal_lm, load_tokenizer, tokenizer_hash

MODE = "mixup"


def epoch_dir(out_dir: str | Path, epoch: int) -> Path:
    return Path(out_dir) / f"epoch-{epoch:04d}"


def source_identity(labels_manifest: str | Path) -> dict[str, Any]:
    """Path and content hash (the shards' checksums) of the original labels a plan draws from."""
    manifest = soft_labels.load_manifest(labels_manifest)
    return {"labels_manifest": str(labels_manifest), "labels_sha256": sha256_json([s["sha256"] for s in manifest["shards"]])[:16]}


def load_sequences(labels_manifest: str | Path) -> dict[str, tuple[list[int], list[int]]]:
    """sample_id -> (prompt_ids, response_ids) of the original labelled sequences (held in memory:
    MixKD is meant for small training sets)."""
    return {r["sample_id"]: (r["prompt_ids"].tolist(), r["response_ids"].tolist()) for r in soft_labels.read(Path(labels_manifest))}


def run_plan_stage(labels_manifest: str | Path, plan_dir: str | Path, cfg: MixKDConfig, log_fn=print) -> Path:
    """Write the mixup plan over the sample ids of `labels_manifest` (in stored order); returns the plan manifest."""
    ids = list(load_sequences(labels_manifest))
    return plan_mod.write_plan(plan_dir, ids, epochs=cfg.epochs, alpha=cfg.alpha, seed=cfg.seed,
                               pairs_per_epoch=cfg.pairs_per_epoch, source=source_identity(labels_manifest), log_fn=log_fn)


def mixup_metadata(teacher_dir: str, plan: dict[str, Any], *, k: int, epoch: int, teacher_model: str | None = None,
                   codec: str = "compact-v1", pad_id: int | None = None) -> dict[str, Any]:
    import torch
    import transformers

    tok = load_tokenizer(teacher_dir)
    meta = {
        "schema_version": soft_labels.SCHEMA_VERSION,
        "codec": codec,
        "split": "train",
        "mode": MODE,
        "response_source": MODE,
        "teacher_model": teacher_model or teacher_dir,
        "teacher_revision": None,
        "teacher_hash": model_content_hash(teacher_dir),
        "tokenizer_hash": tokenizer_hash(tok),
        "vocab_size": len(tok),
        "engine": f"transformers {transformers.__version__} (inputs_embeds, float32, torch {torch.__version__})",
        "logprobs_mode": "raw_logprobs",
        "k": int(k),
        "sampling": {},
        "pad_token_id": int(tok.pad_token_id if pad_id is None else pad_id),
        "mixup_plan": {"plan_key": plan["plan_key"], "seed": plan["seed"], "alpha": plan["alpha"], "epoch": int(epoch)},
    }
    keyed = ("teacher_hash", "tokenizer_hash", "k", "mode", "pad_token_id", "mixup_plan")
    meta["teacher_key"] = sha256_json({f: meta[f] for f in keyed})[:16]
    return meta


def mixed_sample_id(row: dict[str, Any], teacher_key: str) -> str:
    return sha256_json({"id": row["plan_row_id"], "i": row["id_i"], "j": row["id_j"], "lam": repr(float(row["lam"])),
                        "teacher_key": teacher_key})[:32]


class MixupScorer:
    """The teacher (transformers, float32, eval mode) scoring mixed pairs; also the body of the Ray actor."""

    def __init__(self, teacher_dir: str, trust_remote_code: bool = False):
        self.teacher_dir = teacher_dir
        self.model = load_causal_lm(teacher_dir, trust_remote_code=trust_remote_code).eval()

    def score_epoch(self, labels_manifest: str, plan_dir: str, epoch: int, out_dir: str, metadata: dict[str, Any],
                    batch_size: int, shard_rows: int, log_fn=None) -> str:
        log_fn = log_fn or (lambda line: print(line, flush=True))  # (a default of print does not pickle for Ray)
        sequences = load_sequences(labels_manifest)
        plan = plan_mod.load_plan(plan_dir)
        rows = plan_mod.read_epoch(plan, epoch)
        pad_id, k = int(metadata["pad_token_id"]), int(metadata["k"])
        target = epoch_dir(out_dir, epoch)
        chunks = [rows[a : a + shard_rows] for a in range(0, len(rows), shard_rows)]
        records = []
        for index, chunk in enumerate(chunks):
            key = sha256_json([[r["plan_row_id"], r["id_i"], r["id_j"], repr(float(r["lam"]))] for r in chunk])[:16]
            done = soft_labels.finished_shard(target, index, metadata, inputs_key=key)
            if done is not None:
                log_fn(f"mixkd teacher: epoch {epoch} shard {index + 1}/{len(chunks)} already complete, skipped")
                records.append(done)
                continue
            out_rows = []
            for a in range(0, len(chunk), batch_size):
                part = chunk[a : a + batch_size]
                pairs = [align_pair(*sequences[r["id_i"]], *sequences[r["id_j"]], pad_id) for r in part]
                labels = teacher_label_rows(self.model, collate(pairs, [r["lam"] for r in part], pad_id), k)
                for r, p, lab in zip(part, pairs, labels):
                    s = p["frame_start"]
                    out_rows.append({
                        "sample_id": mixed_sample_id(r, metadata["teacher_key"]), "example_id": r["plan_row_id"],
                        "split": metadata["split"], "response_source": MODE,
                        "prompt_ids": p["x_i"][:s].tolist(), "response_ids": p["x_i"][s:].tolist(), **lab,
                    })
            record = soft_labels.write_shard(target, index, out_rows, metadata, inputs_key=key)
            log_fn(f"mixkd teacher: epoch {epoch} shard {index + 1}/{len(chunks)}: {record['rows']} rows, {record['tokens']} tokens")
            records.append(record)
        return str(soft_labels.write_manifest(target, records, metadata))


def run_mixkd_teacher_stage(teacher_dir: str, labels_manifest: str | Path, plan_dir: str | Path, out_dir: str | Path,
                            cfg: MixKDConfig, *, teacher_model: str | None = None, codec: str = "compact-v1",
                            use_ray: bool = False, ray_address: str | None = None, trust_remote_code: bool = False,
                            log_fn=print) -> list[str]:
    """Score every epoch of the plan; returns the per-epoch label manifests (paths), in epoch order."""
    plan = plan_mod.load_plan(plan_dir)
    source = source_identity(labels_manifest)
    if plan.get("source") and plan["source"].get("labels_sha256") != source["labels_sha256"]:
        raise plan_mod.PlanError(
            f"{plan_dir}: the plan was drawn over other labels ({plan['source'].get('labels_manifest')}); "
            "write a new plan for these labels"
        )
    metas = [mixup_metadata(teacher_dir, plan, k=cfg.top_k, epoch=e, teacher_model=teacher_model, codec=codec)
             for e in range(plan["epochs"])]
    args = [(str(labels_manifest), str(plan_dir), e, str(out_dir), metas[e], cfg.batch_size, cfg.shard_rows) for e in range(plan["epochs"])]
    if use_ray or ray_address:
        import ray

        from tasks.ray_runtime import ensure_ray

        ensure_ray(ray_address)
        actor = ray.remote(num_cpus=1)(MixupScorer).remote(teacher_dir, trust_remote_code)
        try:
            return [ray.get(actor.score_epoch.remote(*a)) for a in args]
        finally:
            ray.kill(actor)
    scorer = MixupScorer(teacher_dir, trust_remote_code)
    return [scorer.score_epoch(*a, log_fn=log_fn) for a in args]
