"""Capture teacher soft labels for a list of prompts, one Parquet shard at a time.

A shard is the unit of work and of resume: shard i always holds the same
prompts, each prompt's sampling seed derives from its content, so a rerun
skips finished shards and regenerates only missing or corrupt ones.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from storage import soft_labels
from tasks.teacher.extract import labels_from_flat


def sample_id(prompt_ids: list[int], response_ids: list[int], source: str, teacher_key: str) -> str:
    """Content hash of the sequence and the labelling setup; never a position or step index."""
    h = hashlib.sha256()
    h.update(np.asarray(prompt_ids, dtype=np.int64).tobytes())
    h.update(b"|")
    h.update(np.asarray(response_ids, dtype=np.int64).tobytes())
    h.update(f"|{source}|{teacher_key}".encode())
    return h.hexdigest()[:32]


def request_seed(base_seed: int, example_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{base_seed}:{example_id}".encode()).digest()[:4], "little")


def generate_rows(llm, prompts: list[dict[str, Any]], *, split: str, k: int, temperature: float, top_p: float,
                  max_new_tokens: int, n: int, seed: int, teacher_key: str) -> list[dict[str, Any]]:
    """Sample n responses per prompt (temperature 0: greedy) with top-k log-probs; return label rows."""
    from vllm import SamplingParams

    requests, params = [], []
    for p in prompts:
        requests.append({"prompt_token_ids": list(p["prompt_ids"])})
        params.append(
            SamplingParams(
                n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, logprobs=k,
                flat_logprobs=True, detokenize=False, seed=request_seed(seed, p["example_id"]),
            )
        )
    outputs = llm.generate(requests, params, use_tqdm=False)
    rows = []
    for p, out in zip(prompts, outputs):
        for completion in out.outputs:
            labels = labels_from_flat(completion.logprobs, k)
            response = list(completion.token_ids)
            if not response:
                raise ValueError(f"example {p['example_id']}: the teacher returned an empty response")
            assert labels["token_ids"].tolist() == response, "vLLM log-probs out of step with tokens"
            rows.append(
                {
                    "sample_id": sample_id(p["prompt_ids"], response, "teacher_sample", teacher_key),
                    "example_id": p["example_id"],
                    "split": split,
                    "response_source": "teacher_sample",
                    "prompt_ids": list(p["prompt_ids"]),
                    "response_ids": response,
                    "topk_ids": labels["topk_ids"].ravel().tolist(),
                    "topk_logprobs": labels["topk_logprobs"].ravel().tolist(),
                    "token_logprob": labels["token_logprob"].tolist(),
                    "tail_logmass": labels["tail_logmass"].tolist(),
                }
            )
    return rows


def capture(llm, prompts: list[dict[str, Any]], out_dir: Path, *, split: str, metadata: dict[str, Any], shard_rows: int,
            log_fn=print, **sampling) -> Path:
    """Write shards for `prompts` under out_dir (skipping finished ones) and the manifest."""
    out_dir = Path(out_dir)
    records = []
    num_shards = max(1, -(-len(prompts) // shard_rows))
    for index in range(num_shards):
        chunk = prompts[index * shard_rows : (index + 1) * shard_rows]
        done = soft_labels.finished_shard(out_dir, index)
        if done is not None:
            log_fn(f"teacher: {split} shard {index + 1}/{num_shards} already complete, skipped")
            records.append(done)
            continue
        rows = generate_rows(llm, chunk, split=split, k=metadata["k"], teacher_key=metadata["teacher_key"], **sampling)
        records.append(soft_labels.write_shard(out_dir, index, rows, metadata))
        log_fn(f"teacher: {split} shard {index + 1}/{num_shards}: {records[-1]['rows']} rows, {records[-1]['tokens']} tokens")
    return soft_labels.write_manifest(out_dir, records, metadata)
