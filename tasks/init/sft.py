"""`train.init: sft`: fine-tune the initial student with cross-entropy on the training references first.

MiniLLM's starting point: before distillation the student is fine-tuned on the
task's reference answers. This reuses the production training loop unchanged:
the references are written as a soft-label set in the ordinary format
(storage/FORMAT.md) whose response is the first reference + EOS
(`response_source: reference`) with the smallest top-k the format allows (k=1:
the reference token itself at probability 1, tail mass 0), and the loop trains
on it with objective `ce`, which reads only the response tokens. Any dataset
with references works; the output folder is a plain HF model (safetensors).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow.parquet as pq

from storage import soft_labels
from storage.atomic import sha256_json
from storage.errors import UserError
from tasks.config import TrainConfig
from tasks.models import load_tokenizer, tokenizer_hash

SHARD_ROWS = 2048
REFERENCE_K = 1


class SFTError(UserError):
    """The SFT initialisation cannot run on this data (the message names the example and the fix)."""


def reference_rows(prompts: list[dict[str, Any]], tokenizer, prefix: str, label_key: str) -> list[dict[str, Any]]:
    """One label row per prompt: response = prefix + first reference, tokenised, then EOS; one-hot top-1 labels."""
    from tasks.teacher.capture import sample_id

    if tokenizer.eos_token_id is None:
        raise SFTError("train.init=sft: the student tokenizer has no eos_token; cannot end the reference responses")
    rows = []
    for p in prompts:
        refs = [r for r in (p.get("references") or []) if r and r.strip()]
        if not refs:
            raise SFTError(f"example {p['example_id']}: train.init=sft needs a non-empty reference for every training prompt; "
                           "set data.reference_field, or use train.init=as_is")
        response = tokenizer(prefix + refs[0], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        t = len(response)
        rows.append({
            "sample_id": sample_id(p["prompt_ids"], response, "reference", label_key),
            "example_id": p["example_id"], "split": "train", "response_source": "reference",
            "prompt_ids": list(p["prompt_ids"]), "response_ids": response,
            "topk_ids": np.asarray(response, dtype=np.int64).reshape(t, 1),
            "topk_logprobs": np.zeros((t, 1), dtype=np.float32),
            "token_logprob": np.zeros(t, dtype=np.float32),
            "tail_logmass": np.full(t, -np.inf, dtype=np.float32),
        })
    return rows


def write_reference_labels(prompts_parquet: str | Path, student_dir: str, out_dir: Path, prefix: str = " ") -> Path:
    """The reference label set of the prompts (a manifest under out_dir); rewritten only when its inputs change."""
    tokenizer = load_tokenizer(student_dir)
    prompts = pq.read_table(prompts_parquet, columns=["example_id", "prompt_ids", "references"]).to_pylist()
    if not prompts:
        raise SFTError(f"{prompts_parquet}: no training prompts for train.init=sft")
    meta = {"schema_version": soft_labels.SCHEMA_VERSION, "codec": "plain-f32", "k": REFERENCE_K, "split": "train",
            "mode": "score", "response_source": "reference", "teacher_model": "references", "reference_prefix": prefix,
            "tokenizer_hash": tokenizer_hash(tokenizer), "vocab_size": len(tokenizer), "sampling": {}}
    meta["teacher_key"] = sha256_json({k: meta.get(k) for k in ("tokenizer_hash", "k", "mode", "reference_prefix", "teacher_model")})[:16]
    rows = reference_rows(prompts, tokenizer, prefix, meta["teacher_key"])
    records = [soft_labels.write_shard(out_dir, i, rows[start:start + SHARD_ROWS], meta)
               for i, start in enumerate(range(0, len(rows), SHARD_ROWS))]
    return Path(soft_labels.write_manifest(out_dir, records, meta))


def sft_train_config(train_cfg: TrainConfig) -> TrainConfig:
    """The training settings of the SFT pass: objective ce, train.sft_steps, train.sft_learning_rate (default: learning_rate)."""
    return train_cfg.model_copy(update={
        "objective": "ce", "objective_params": {}, "steps": train_cfg.sft_steps, "lora": None,
        "learning_rate": train_cfg.sft_learning_rate or train_cfg.learning_rate,
        "warmup_steps": min(train_cfg.warmup_steps, max(1, train_cfg.sft_steps // 10)),
        "checkpoint_every": max(train_cfg.checkpoint_every, 1),
    })


def run_sft(train_cfg: TrainConfig, student_dir: str, prompts_parquet: str | Path, out_dir: Path, log_fn=print,
            runtime: Literal["local", "ray"] = "local", reference_prefix: str = " ",
            threads: int | None = None) -> dict[str, Any]:
    """Fine-tune `student_dir` on the first reference of every prompt in `prompts_parquet` (cross-entropy).

    Returns {checkpoint: HF folder, steps, labels: reference label manifest, log: train_log.jsonl, rows,
    learning_rate, first_loss, last_loss}. `runtime="local"` trains in this process with the production loop;
    `"ray"` runs the training stage (Ray Train workers, checkpoints, resume).
    """
    import json

    import torch

    out_dir = Path(out_dir)
    manifest = write_reference_labels(prompts_parquet, student_dir, out_dir / "labels", reference_prefix)
    cfg = sft_train_config(train_cfg)
    rows = soft_labels.load_manifest(manifest)["num_rows"]
    log_fn(f"sft: {rows} reference responses, {cfg.steps} steps of ce at lr {cfg.learning_rate:g} from {student_dir}")
    (out_dir / "train_log.jsonl").unlink(missing_ok=True)
    if runtime == "ray":
        from tasks.train.stage import run_train_stage

        result = run_train_stage(cfg, student_dir, str(manifest), out_dir, log_fn=log_fn)
        checkpoint = result["checkpoint"]
    else:
        from tasks.train.loop import train
        from tasks.train.loop_config import LoopConfig
        from tasks.train.runtime import LocalRuntime

        train(LoopConfig.build(cfg, student_dir=student_dir, manifest=str(manifest), out_dir=out_dir,
                               threads_per_worker=threads or torch.get_num_threads()), LocalRuntime())
        checkpoint = str(out_dir / "student")
    log = [json.loads(line) for line in (out_dir / "train_log.jsonl").read_text().splitlines() if line.strip()]
    return {"checkpoint": checkpoint, "steps": cfg.steps, "labels": str(manifest), "log": str(out_dir / "train_log.jsonl"),
            "rows": rows, "learning_rate": cfg.learning_rate, "first_loss": log[0]["loss"] if log else None,
            "last_loss": log[-1]["loss"] if log else None}
