"""Teacher stage entry point: label the training prompts (sampled) and the held-out prompts (greedy).

The held-out labels double as the teacher's greedy answers for evaluation, so
the teacher engine starts once per run. Engines live in Ray actors: one actor
per replica, killed afterwards, which frees the engine's memory reliably.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from storage.atomic import sha256_dir, sha256_json
from storage import soft_labels
from tasks.config import TeacherConfig
from tasks.data import read_prompts
from tasks.models import load_tokenizer, tokenizer_hash


class TeacherReplica:
    """One vLLM engine holding the teacher; methods run inside a Ray actor."""

    def __init__(self, model_dir: str, cfg: TeacherConfig):
        from tasks.teacher.engine import build_engine

        self.llm = build_engine(model_dir, cfg.engine, max_logprobs=cfg.top_k, logprobs_mode=cfg.logprobs_mode)

    def capture(self, prompts, out_dir, split, metadata, shard_rows, sampling):
        from tasks.teacher.capture import capture

        lines: list[str] = []
        manifest = capture(self.llm, prompts, Path(out_dir), split=split, metadata=metadata, shard_rows=shard_rows,
                           log_fn=lines.append, **sampling)
        return str(manifest), lines


def label_metadata(cfg: TeacherConfig, teacher_dir: str, split: str, sampling: dict[str, Any]) -> dict[str, Any]:
    from tasks.teacher.engine import vllm_version

    tok = load_tokenizer(teacher_dir, cfg.engine.trust_remote_code)
    meta = {
        "schema_version": soft_labels.SCHEMA_VERSION,
        "codec": "plain-f32",
        "split": split,
        "teacher_model": cfg.model,
        "teacher_revision": cfg.revision,
        "teacher_hash": sha256_dir(Path(teacher_dir), "*.safetensors")[:16],
        "tokenizer_hash": tokenizer_hash(tok),
        "chat_template_hash": sha256_json(getattr(tok, "chat_template", None))[:16],
        "vocab_size": len(tok),
        "vllm_version": vllm_version(),
        "logprobs_mode": cfg.logprobs_mode,
        "k": cfg.top_k,
        "sampling": sampling,
    }
    meta["teacher_key"] = sha256_json({k: meta[k] for k in ("teacher_hash", "tokenizer_hash", "logprobs_mode", "k", "sampling")})[:16]
    return meta


def run_teacher_stage(cfg: TeacherConfig, teacher_dir: str, prepared: dict[str, Any], out_dir: Path,
                      ray_address: str | None = None, log_fn=print) -> dict[str, str]:
    import ray

    from tasks.ray_runtime import ensure_ray

    ensure_ray(ray_address)
    plans = {
        "train": (prepared["train_split"], dict(temperature=cfg.temperature, top_p=cfg.top_p, n=cfg.samples_per_prompt)),
        "eval": (prepared["eval_split"], dict(temperature=0.0, top_p=1.0, n=1)),
    }
    actor_cls = ray.remote(num_cpus=1)(TeacherReplica)
    replica = actor_cls.remote(teacher_dir, cfg)
    manifests = {}
    try:
        for role, (split, sampling) in plans.items():
            sampling = {**sampling, "max_new_tokens": cfg.max_new_tokens, "seed": cfg.engine.seed}
            metadata = label_metadata(cfg, teacher_dir, split, sampling)
            prompts = read_prompts(prepared["splits"][split]["path"])
            manifest, lines = ray.get(
                replica.capture.remote(prompts, str(out_dir / role), split, metadata, cfg.shard_rows, sampling)
            )
            for line in lines:
                log_fn(line)
            manifests[role] = manifest
    finally:
        ray.kill(replica)
    return manifests
