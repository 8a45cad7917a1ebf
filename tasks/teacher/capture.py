"""Capture teacher soft labels for a list of prompts, one Parquet shard at a time.

Two modes share one shard loop:

* generate: the teacher samples n responses per prompt (temperature 0: greedy);
  labels are vLLM's top-k log-probs at the sampled positions.
* score: teacher forcing of a given response (a reference, later a student
  rollout): prompt + response go in as one prompt with `prompt_logprobs=k` and
  `max_tokens=1`; the labels are the prompt log-probs at the response positions
  (entry 0 of vLLM's prompt log-probs is None, and prompt positions are skipped).

A shard is the unit of work and of resume: shard i always holds the same
prompts, each prompt's sampling seed derives from its content, so a rerun
skips finished shards (same inputs, same labelling setup, checksum intact) and
regenerates only missing, corrupt or stale ones.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np

from storage import soft_labels
from storage.atomic import sha256_json
from storage.errors import UserError
from tasks.teacher.extract import labels_from_flat

MODES = ("generate", "score")


class CaptureError(UserError):
    """The capture cannot run as asked (bad input or settings); the message names what and where."""


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


def engine_limits(llm) -> dict[str, int | None]:
    """max_logprobs and context length of a vllm.LLM (None where this vLLM does not say)."""
    config = getattr(getattr(llm, "llm_engine", None), "model_config", None)
    return {"max_logprobs": getattr(config, "max_logprobs", None), "max_model_len": getattr(config, "max_model_len", None)}


def check_request(llm, prompts: list[dict[str, Any]], *, k: int, mode: str, max_new_tokens: int) -> None:
    """Refuse, before any shard is written, what vLLM would reject midway or truncate silently."""
    if mode not in MODES:
        raise CaptureError(f"teacher.mode {mode!r} is not one of {MODES}")
    limits = engine_limits(llm)
    if limits["max_logprobs"] is not None and limits["max_logprobs"] >= 0 and k > limits["max_logprobs"]:
        raise CaptureError(
            f"teacher.top_k={k} exceeds the engine's max_logprobs={limits['max_logprobs']}; "
            f"build the engine with max_logprobs>={k} or lower top_k"
        )
    context = limits["max_model_len"]
    for p in prompts:
        if mode == "score":
            response = p.get("response_ids")
            if response is None or len(response) == 0:
                raise CaptureError(f"example {p['example_id']}: score mode needs a non-empty reference response (field response_ids)")
            length, what = len(p["prompt_ids"]) + len(response), "prompt + reference"
        else:
            length, what = len(p["prompt_ids"]) + max_new_tokens, "prompt + max_new_tokens"
        if len(p["prompt_ids"]) == 0:
            raise CaptureError(f"example {p['example_id']}: empty prompt")
        if context is not None and length > context:
            raise CaptureError(f"example {p['example_id']}: {what} is {length} tokens, more than the teacher's context of {context}")


def _row(p: dict[str, Any], response: list[int], labels: dict[str, np.ndarray], *, split: str, source: str,
         teacher_key: str) -> dict[str, Any]:
    return {
        "sample_id": sample_id(p["prompt_ids"], response, source, teacher_key),
        "example_id": p["example_id"],
        "split": split,
        "response_source": source,
        "prompt_ids": list(p["prompt_ids"]),
        "response_ids": response,
        "topk_ids": labels["topk_ids"],
        "topk_logprobs": labels["topk_logprobs"],
        "token_logprob": labels["token_logprob"],
        "tail_logmass": labels["tail_logmass"],
    }


def generate_rows(llm, prompts: list[dict[str, Any]], *, split: str, k: int, temperature: float, top_p: float,
                  max_new_tokens: int, n: int, seed: int, teacher_key: str) -> list[dict[str, Any]]:
    """Sample n responses per prompt (temperature 0: greedy) with top-k log-probs; return label rows."""
    from vllm import SamplingParams

    requests = [{"prompt_token_ids": list(p["prompt_ids"])} for p in prompts]
    params = [
        SamplingParams(
            n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, logprobs=k,
            flat_logprobs=True, detokenize=False, seed=request_seed(seed, p["example_id"]),
        )
        for p in prompts
    ]
    outputs = llm.generate(requests, params, use_tqdm=False)
    rows = []
    for p, out in zip(prompts, outputs):
        for completion in out.outputs:
            response = list(completion.token_ids)
            if not response:
                raise CaptureError(f"example {p['example_id']}: the teacher returned an empty response")
            labels = labels_from_flat(completion.logprobs, k)
            if labels["token_ids"].tolist() != response:
                raise CaptureError(f"example {p['example_id']}: vLLM log-probs out of step with the sampled tokens")
            rows.append(_row(p, response, labels, split=split, source="teacher_sample", teacher_key=teacher_key))
    return rows


def score_rows(llm, prompts: list[dict[str, Any]], *, split: str, k: int, teacher_key: str,
               source: str = "reference", **_ignored) -> list[dict[str, Any]]:
    """Teacher-force each prompt's given `response_ids`; labels at the response positions."""
    from vllm import SamplingParams

    requests = [{"prompt_token_ids": list(p["prompt_ids"]) + list(p["response_ids"])} for p in prompts]
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, flat_logprobs=True, detokenize=False)
    outputs = llm.generate(requests, params, use_tqdm=False)
    rows = []
    for p, out in zip(prompts, outputs):
        response = [int(t) for t in p["response_ids"]]
        # prompt_logprobs[i] is the distribution of token i given tokens < i; response token j sits at P + j.
        labels = labels_from_flat(out.prompt_logprobs, k, first_position=len(p["prompt_ids"]))
        if labels["token_ids"].tolist() != response:
            raise CaptureError(f"example {p['example_id']}: vLLM prompt log-probs out of step with the reference tokens")
        rows.append(_row(p, response, labels, split=split, source=source, teacher_key=teacher_key))
    return rows


def inputs_key(prompts: list[dict[str, Any]], mode: str) -> str:
    """Hash of what a shard covers: example ids, prompt tokens and (score mode) the given responses."""
    return sha256_json(
        [[p["example_id"], list(map(int, p["prompt_ids"])), list(map(int, p.get("response_ids") or [])) if mode == "score" else None]
         for p in prompts]
    )[:16]


def shard_chunks(prompts: list[dict[str, Any]], shard_rows: int) -> list[list[dict[str, Any]]]:
    """The fixed split of prompts into shards: shard i always holds the same prompts."""
    return [prompts[i : i + shard_rows] for i in range(0, max(1, len(prompts)), shard_rows)]


def capture_shard(llm, chunk: list[dict[str, Any]], index: int, num_shards: int, out_dir: Path, *, split: str,
                  metadata: dict[str, Any], log_fn=print, mode: str = "generate", pause_after_shard_s: float = 0.0,
                  **sampling) -> dict[str, Any]:
    """Label one shard unless a finished copy exists; return its sidecar record (the manifest entry)."""
    out_dir = Path(out_dir)
    key = inputs_key(chunk, mode)
    done = soft_labels.finished_shard(out_dir, index, metadata, inputs_key=key)
    if done is not None:
        log_fn(f"teacher: {split} shard {index + 1}/{num_shards} already complete, skipped")
        return done
    label_rows = score_rows if mode == "score" else generate_rows
    rows = label_rows(llm, chunk, split=split, k=int(metadata["k"]), teacher_key=metadata["teacher_key"], **sampling)
    record = soft_labels.write_shard(out_dir, index, rows, metadata, inputs_key=key)
    log_fn(f"teacher: {split} shard {index + 1}/{num_shards}: {record['rows']} rows, {record['tokens']} tokens")
    if pause_after_shard_s:  # tests only: lets a kill land between shards
        time.sleep(pause_after_shard_s)
    return record


def capture(llm, prompts: list[dict[str, Any]], out_dir: Path, *, split: str, metadata: dict[str, Any], shard_rows: int,
            log_fn=print, mode: str = "generate", pause_after_shard_s: float = 0.0, **sampling) -> Path:
    """Write shards for `prompts` under out_dir (skipping finished ones) and the manifest, in one engine.

    Everything checkable is checked before the first shard; a shard is only
    taken for finished when its checksum, labelling setup and inputs match.
    (Several engines: tasks.teacher.stage.capture_on_replicas.)
    """
    check_request(llm, prompts, k=int(metadata["k"]), mode=mode, max_new_tokens=int(sampling.get("max_new_tokens", 0)))
    chunks = shard_chunks(prompts, shard_rows)
    records = [
        capture_shard(llm, chunk, index, len(chunks), out_dir, split=split, metadata=metadata, log_fn=log_fn, mode=mode,
                      pause_after_shard_s=pause_after_shard_s, **sampling)
        for index, chunk in enumerate(chunks)
    ]
    return soft_labels.write_manifest(Path(out_dir), records, metadata)
