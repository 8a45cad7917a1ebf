"""Sequence packing: several sequences per row, attention kept inside each sequence.

A padded batch (``batches.collate``) is as long as its longest sequence, so with varied
lengths much of each step is spent on pad tokens.  ``collate_packed`` places the same
records into fewer rows, first-fit by decreasing length up to a token budget (default: the
longest sequence, so no row is longer than the padded batch), and gives each sequence
position ids that restart at 0.  The batch is the same set of sequences as the padded one
(unlike length bucketing, nothing about which examples share a step changes), and so is the
loss: the labels sit at the same shifted positions relative to each sequence and are
normalised by the same count of valid tokens.

Attention: the batch carries ``position_ids`` and no ``attention_mask``.  transformers
(5.x, ``masking_utils.find_packed_sequence_indices``) then reads the sequence boundaries from
the position-id resets and builds a block-diagonal causal mask for sdpa and eager attention
(flash-attention's varlen path uses the same position ids), for Llama, Qwen2 and the other
models built on ``create_causal_mask``.  tests/test_packing.py checks that packed logits
equal the unpadded ones per sequence.  Pad tokens fill each row's end as their own segment
(positions from 0), after every real token, so no real token attends to them.

``segments`` [B, L-1] names the record (its index in ``records``) at each shifted position (-1 on
pads): the per-example parts of the losses (Dynamic KD's uncertainty and teacher routing, lazy
labelling's ``kd_rows``) read examples from it instead of from rows (tasks/objectives/weighting.py).

``num_pad_tokens`` / ``input_ids.numel()`` is the batch's padding waste (both collates set
it), which the training log reports.

A model whose attention ignores position-id resets (custom code, an attention kernel without
packed-sequence support) would let packed sequences attend to each other, silently.
``keeps_packed_sequences_apart`` checks the loaded student on a probe before training, and
train.packing=auto (the default) pads instead when the check fails.
"""

from __future__ import annotations

from typing import Any

import torch


def first_fit(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into rows of at most ``budget`` tokens, first-fit by decreasing
    length (ties by index, so deterministic); a sequence longer than ``budget`` gets a row of its own.
    Rows are returned in the order they were opened; inside a row, in placement order."""
    if budget < 1:
        raise ValueError(f"packing budget must be >= 1 token, got {budget}")
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(max(0, budget - lengths[i]))
    return rows


def collate_packed(records: list[dict[str, Any]], pad_id: int, k: int, max_tokens: int | None = None) -> dict[str, torch.Tensor]:
    """Pack ``records`` (prompt + response, with top-k labels) into rows of at most ``max_tokens``
    (default: the longest sequence). Same keys as ``batches.collate`` except ``attention_mask``,
    which is replaced by ``position_ids`` (restarting at 0 for every sequence), plus ``segments``.
    The layout depends on the sequence lengths only, so two label sets of the same tokens pack alike."""
    lengths = [len(r["prompt_ids"]) + len(r["response_ids"]) for r in records]
    budget = max(lengths) if max_tokens is None else max(max_tokens, max(lengths))
    layout = first_fit(lengths, budget)
    length = max(sum(lengths[i] for i in row) for row in layout)
    batch = len(layout)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    position_ids = torch.zeros((batch, length), dtype=torch.long)
    ids = torch.zeros((batch, length - 1, k), dtype=torch.long)
    logprobs = torch.zeros((batch, length - 1, k), dtype=torch.float32)
    tail = torch.full((batch, length - 1), float("-inf"), dtype=torch.float32)
    target = torch.zeros((batch, length - 1), dtype=torch.long)
    mask = torch.zeros((batch, length - 1), dtype=torch.bool)
    segments = torch.full((batch, length - 1), -1, dtype=torch.long)
    for b, row in enumerate(layout):
        offset = 0
        for i in row:
            r = records[i]
            prompt, response = torch.as_tensor(r["prompt_ids"]), torch.as_tensor(r["response_ids"])
            p, t = len(prompt), len(response)
            input_ids[b, offset : offset + p] = prompt
            input_ids[b, offset + p : offset + p + t] = response
            position_ids[b, offset : offset + p + t] = torch.arange(p + t)
            # the state at offset + p - 1 + j predicts response token j (the sequence's last state predicts nothing)
            span = slice(offset + p - 1, offset + p - 1 + t)
            ids[b, span] = torch.as_tensor(r["topk_ids"])
            logprobs[b, span] = torch.as_tensor(r["topk_logprobs"])
            tail[b, span] = torch.as_tensor(r["tail_logmass"])
            target[b, span] = response
            mask[b, span] = True
            segments[b, span] = i
            offset += p + t
        position_ids[b, offset:] = torch.arange(length - offset)  # the pad tail: a segment of its own
    used = sum(lengths)
    return {"input_ids": input_ids, "position_ids": position_ids, "ids": ids, "logprobs": logprobs,
            "tail_logmass": tail, "target_ids": target, "mask": mask, "segments": segments,
            "num_pad_tokens": torch.tensor(batch * length - used)}


def padding_waste(micro_batches: list[dict[str, torch.Tensor]]) -> float:
    """Pad tokens / all input tokens over the micro-batches of a step (0.0 when nothing is padded)."""
    total = sum(mb["input_ids"].numel() for mb in micro_batches)
    pads = sum(int(mb["num_pad_tokens"]) for mb in micro_batches)
    return pads / total if total else 0.0


def keeps_packed_sequences_apart(model, lengths: tuple[int, int] = (5, 4)) -> bool:
    """Whether ``model`` gives the second of two sequences packed in one row (position ids restarting) the
    same logits as that sequence alone: a forward of a few tokens, in the model's own dtype and device."""
    first, second = lengths
    vocab = int(model.config.vocab_size)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, min(vocab, 1000), (first + second,), generator=gen).to(device)
    positions = torch.cat([torch.arange(first), torch.arange(second)]).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = model(input_ids=tokens[None], position_ids=positions[None], use_cache=False).logits[0, first:]
            alone = model(input_ids=tokens[None, first:], use_cache=False).logits[0]
    finally:
        model.train(was_training)
    # round-off only: float32 differs in the 6th digit (TF32 matmuls on a GPU in the 4th), half precision in the 3rd;
    # a sequence that attends across the boundary moves its logits far more
    dtype = next(model.parameters()).dtype
    tolerance = 2e-2 if dtype in (torch.bfloat16, torch.float16) else 2e-3 if device.type == "cuda" else 1e-4
    return bool(torch.allclose(packed.float(), alone.float(), rtol=tolerance, atol=tolerance))
