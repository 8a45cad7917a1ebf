"""Pad soft-label records into tensors aligned with the student's shifted logits.

Sequence = prompt + response. The student's logits at index i predict token
i+1, so the teacher label for response token t sits at index P + t - 1 of the
shifted logits, where P is the prompt length. Labels are placed there; all
other positions are masked out. ``num_pad_tokens`` counts the pad tokens (padding waste
= num_pad_tokens / input_ids.numel()); ``tasks.train.packing`` packs instead of padding.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch

from tasks.train.packing import collate_packed


def collate(records: list[dict[str, Any]], pad_id: int, k: int) -> dict[str, torch.Tensor]:
    lengths = [len(r["prompt_ids"]) + len(r["response_ids"]) for r in records]
    batch, length = len(records), max(lengths)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    attention = torch.zeros((batch, length), dtype=torch.long)
    ids = torch.zeros((batch, length - 1, k), dtype=torch.long)
    logprobs = torch.zeros((batch, length - 1, k), dtype=torch.float32)
    tail = torch.full((batch, length - 1), float("-inf"), dtype=torch.float32)
    target = torch.zeros((batch, length - 1), dtype=torch.long)
    mask = torch.zeros((batch, length - 1), dtype=torch.bool)
    for i, r in enumerate(records):
        prompt, response = torch.as_tensor(r["prompt_ids"]), torch.as_tensor(r["response_ids"])
        p, t = len(prompt), len(response)
        input_ids[i, :p] = prompt
        input_ids[i, p : p + t] = response
        attention[i, : p + t] = 1
        span = slice(p - 1, p - 1 + t)
        ids[i, span] = torch.as_tensor(r["topk_ids"])
        logprobs[i, span] = torch.as_tensor(r["topk_logprobs"])
        tail[i, span] = torch.as_tensor(r["tail_logmass"])
        target[i, span] = response
        mask[i, span] = True
    return {"input_ids": input_ids, "attention_mask": attention, "ids": ids, "logprobs": logprobs,
            "tail_logmass": tail, "target_ids": target, "mask": mask,
            "num_pad_tokens": torch.tensor(batch * length - sum(lengths))}


def make_collate(packing: bool, max_tokens: int | None = None) -> Callable[[list[dict[str, Any]], int, int], dict[str, torch.Tensor]]:
    """``collate`` (one padded row per sequence) or ``packing.collate_packed`` (several sequences per row, at most
    ``max_tokens`` each; None: the longest sequence)."""
    return functools.partial(collate_packed, max_tokens=max_tokens) if packing else collate


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The keyword arguments of the student's forward for a padded or a packed batch."""
    if "position_ids" in batch:
        # Packed: no attention_mask and no KV cache (transformers builds one by default, use_cache=True in the
        # config, and then skips packed-sequence detection), so the mask is read from the position-id resets.
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
