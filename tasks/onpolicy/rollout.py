"""Student rollouts: sampling (vLLM, or teacher-mixed in transformers) and the per-round rollout table.

A round's rollouts are written once, atomically, to `<round>/rollouts.parquet` before the
teacher scores them. The table holds what the soft-label shards do not: the policy
version and the rollout policy's own log-probs of the sampled tokens (the PPO ratio's
denominator) and the sampling distribution's (different from them under teacher-mixed
sampling). Its Parquet metadata records the policy version, the hash of the policy's
weights and the sampling settings; a rerun reuses the table only when all three match.
Format: storage/FORMAT.md, "Rollout tables".
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage.atomic import write_parquet
from storage.errors import UserError

ROLLOUTS_FILE = "rollouts.parquet"
ROLLOUT_KEY = b"stillhouse_rollouts"
ROLLOUT_SCHEMA = pa.schema([
    pa.field("example_id", pa.string()),
    pa.field("sample_id", pa.string()),
    pa.field("policy_version", pa.int32()),
    pa.field("seed", pa.int64()),
    pa.field("prompt_ids", pa.list_(pa.int32())),
    pa.field("response_ids", pa.list_(pa.int32())),
    pa.field("student_logprob", pa.list_(pa.float32())),
    pa.field("sampling_logprob", pa.list_(pa.float32())),
])


class StaleRolloutError(UserError):
    """Rollouts of another policy version reached the trainer; the message names the file, the sample and both versions."""


def rollout_seed(base_seed: int, round_index: int, example_id: str) -> int:
    """Per prompt and round: the same rollout whatever else is in the round, a new one each round."""
    return int.from_bytes(hashlib.sha256(f"{base_seed}:{round_index}:{example_id}".encode()).digest()[:4], "little")


def choose_prompts(prompts: list[dict[str, Any]], round_index: int, count: int, seed: int) -> list[dict[str, Any]]:
    """The round's prompts: `count` drawn without replacement by (seed, round); all of them if there are fewer."""
    rng = np.random.default_rng([seed, round_index, 7])
    order = rng.permutation(len(prompts))[: min(count, len(prompts))]
    return [prompts[i] for i in sorted(order)]


def write_rollouts(path: Path, rows: list[dict[str, Any]], metadata: dict[str, Any]) -> Path:
    """Write the rollout table atomically (temporary name, then rename)."""
    for r in rows:
        t = len(r["response_ids"])
        if t == 0 or len(r["student_logprob"]) != t or len(r["sampling_logprob"]) != t:
            raise ValueError(f"{path}: example {r['example_id']}: response and log-prob lengths differ or are empty")
    table = pa.Table.from_pylist([{name: r[name] for name in ROLLOUT_SCHEMA.names} for r in rows], schema=ROLLOUT_SCHEMA)
    table = table.replace_schema_metadata({ROLLOUT_KEY: json.dumps(metadata, sort_keys=True).encode()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_parquet(table, path, compression="zstd")
    return path


def rollout_metadata(path: Path) -> dict[str, Any] | None:
    try:
        raw = (pq.read_schema(path).metadata or {}).get(ROLLOUT_KEY)
        return json.loads(raw) if raw else None
    except (OSError, ValueError, pa.ArrowException):
        return None


def read_rollouts(path: Path) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist()


def reusable_rollouts(path: Path, expected: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The rollouts at `path` if they were sampled by the same policy (version and weight hash) with the same
    settings; None (to be resampled) otherwise."""
    if not Path(path).exists():
        return None
    meta = rollout_metadata(path)
    if meta is None or any(meta.get(k) != v for k, v in expected.items()):
        return None
    rows = read_rollouts(path)
    if any(r["policy_version"] != expected["policy_version"] for r in rows):
        return None
    return rows


class StudentSampler:
    """The student in a vLLM engine (a Ray actor); new weights are loaded in place between rounds."""

    def __init__(self, student_dir: str, engine_cfg):
        from tasks.teacher.engine import build_engine

        self.engine_cfg = engine_cfg
        self.llm = build_engine(student_dir, engine_cfg, max_logprobs=1)
        self.student_dir = student_dir

    def load(self, student_dir: str) -> None:
        """Reload the weights from an HF folder of the same architecture, in the live engine, and drop the
        prefix cache (its KV entries were computed with the old weights)."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": student_dir})
        self.llm.reset_prefix_cache()
        self.student_dir = student_dir

    def sample(self, prompts: list[dict[str, Any]], seeds: list[int], *, max_new_tokens: int,
               temperature: float) -> list[dict[str, Any]]:
        from vllm import SamplingParams

        requests = [{"prompt_token_ids": list(p["prompt_ids"])} for p in prompts]
        params = [SamplingParams(n=1, temperature=temperature, top_p=1.0, max_tokens=max_new_tokens, logprobs=0,
                                 flat_logprobs=True, detokenize=False, seed=int(s)) for s in seeds]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        out = []
        for p, o in zip(prompts, outputs):
            completion = o.outputs[0]
            response = [int(t) for t in completion.token_ids]
            flat = completion.logprobs
            starts = np.asarray(flat.start_indices, dtype=np.int64)
            ids = np.asarray(flat.token_ids, dtype=np.int64)[starts]
            lps = np.asarray(flat.logprobs, dtype=np.float64)[starts]
            if ids.tolist() != response:
                raise RuntimeError(f"example {p['example_id']}: vLLM log-probs out of step with the sampled tokens")
            out.append({"response_ids": response, "student_logprob": lps.tolist(), "sampling_logprob": lps.tolist()})
        return out

    def generate_plain(self, prompts: list[dict[str, Any]], seeds: list[int], *, max_new_tokens: int,
                       temperature: float) -> int:
        """Plain generation without log-probs (the bench's baseline); returns the number of generated tokens."""
        from vllm import SamplingParams

        params = [SamplingParams(n=1, temperature=temperature, max_tokens=max_new_tokens, detokenize=False, seed=int(s))
                  for s in seeds]
        outputs = self.llm.generate([{"prompt_token_ids": list(p["prompt_ids"])} for p in prompts], params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outputs)
