"""Mixed inputs for MixKD and the teacher's distributions on them (transformers `inputs_embeds`).

Alignment (the same for teacher and student):

* each sequence is its prompt + response token ids, x = prompt_ids ⧺ response_ids, length P + T;
* both sequences of a pair are right-padded with the pad token to L = max(len_i, len_j), so
  position t of one lines up with position t of the other, from 0;
* the mixed input is e'_t = lam · E(x_i[t]) + (1 − lam) · E(x_j[t]) over the model's own input
  embedding table E (the pad token's embedding where a sequence is shorter), attended over all
  L positions (a shorter sequence's padding is mixed with real tokens of the other);
* the *frame* of the pair starts at s = min(P_i, P_j): labels are kept for the predictions of
  tokens s..L−1 (response position r predicts token s + r from the first s + r mixed inputs);
* in the soft-label row, prompt_ids = x̃_i[:s] and response_ids = x̃_i[s:L] (x̃_i: x_i padded), so
  at lam = 1 a mixed row holds exactly the teacher-forced labels of sequence i;
* side masks: mask_i[r] = P_i ≤ s + r < len_i (a response token of i), mask_j likewise; the
  mixed-input losses use their union.

Why transformers and not vLLM: vLLM 0.32 accepts prompt embeddings (`enable_prompt_embeds=True`,
`EmbedsPrompt`), but returns no prompt log-probabilities for them (its model runner skips
prompt logprobs when a request has no prompt token ids), so one request yields only the
distribution after its last position. MixKD needs the distribution at every response
position; with vLLM that is one request per position (quadratic in length).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tasks.objectives import SparseLabels


@dataclass
class MixedBatch:
    """A right-padded batch of B aligned pairs.

    x_i, x_j        [B, Lmax] long   both sequences, padded with pad_id
    attention_mask  [B, Lmax] long   1 for t < L_b
    lam             [B]       float  weight of sequence i
    frame_start     [B]       long   s_b
    positions       [B, Tmax] long   model-output position whose logits predict frame token s_b + r (= s_b + r − 1)
    frame_mask      [B, Tmax] bool   r < L_b − s_b
    target_i/_j     [B, Tmax] long   x_i / x_j at frame token s_b + r
    mask_i/_j       [B, Tmax] bool   that token is a response token of i / j
    """

    x_i: Tensor
    x_j: Tensor
    attention_mask: Tensor
    lam: Tensor
    frame_start: Tensor
    positions: Tensor
    frame_mask: Tensor
    target_i: Tensor
    target_j: Tensor
    mask_i: Tensor
    mask_j: Tensor

    @property
    def union_mask(self) -> Tensor:
        return self.mask_i | self.mask_j

    def frame_lengths(self) -> list[int]:
        return self.frame_mask.sum(1).tolist()


def align_pair(prompt_i, response_i, prompt_j, response_j, pad_id: int) -> dict[str, Any]:
    """The aligned pair (see the module docstring) as numpy arrays."""
    xi = np.concatenate([np.asarray(prompt_i, np.int64), np.asarray(response_i, np.int64)])
    xj = np.concatenate([np.asarray(prompt_j, np.int64), np.asarray(response_j, np.int64)])
    p_i, p_j = len(prompt_i), len(prompt_j)
    if min(p_i, p_j) < 1:
        raise ValueError("every sequence needs at least one prompt token")
    length = max(len(xi), len(xj))
    pad = lambda x: np.concatenate([x, np.full(length - len(x), pad_id, np.int64)])  # noqa: E731
    s = min(p_i, p_j)
    frame = np.arange(s, length)
    return {
        "x_i": pad(xi), "x_j": pad(xj), "length": length, "frame_start": s,
        "mask_i": (frame >= p_i) & (frame < len(xi)), "mask_j": (frame >= p_j) & (frame < len(xj)),
    }


def collate(pairs: list[dict[str, Any]], lams, pad_id: int) -> MixedBatch:
    """Batch aligned pairs (from `align_pair`) with their lambdas."""
    bsz = len(pairs)
    lmax = max(p["length"] for p in pairs)
    tmax = max(p["length"] - p["frame_start"] for p in pairs)
    x_i = torch.full((bsz, lmax), pad_id, dtype=torch.long)
    x_j = torch.full((bsz, lmax), pad_id, dtype=torch.long)
    attn = torch.zeros(bsz, lmax, dtype=torch.long)
    positions = torch.zeros(bsz, tmax, dtype=torch.long)
    frame_mask = torch.zeros(bsz, tmax, dtype=torch.bool)
    target_i = torch.zeros(bsz, tmax, dtype=torch.long)
    target_j = torch.zeros(bsz, tmax, dtype=torch.long)
    mask_i = torch.zeros(bsz, tmax, dtype=torch.bool)
    mask_j = torch.zeros(bsz, tmax, dtype=torch.bool)
    for b, p in enumerate(pairs):
        n, s = p["length"], p["frame_start"]
        t = n - s
        x_i[b, :n] = torch.from_numpy(p["x_i"])
        x_j[b, :n] = torch.from_numpy(p["x_j"])
        attn[b, :n] = 1
        positions[b, :t] = torch.arange(s - 1, n - 1)
        frame_mask[b, :t] = True
        target_i[b, :t] = torch.from_numpy(p["x_i"][s:n])
        target_j[b, :t] = torch.from_numpy(p["x_j"][s:n])
        mask_i[b, :t] = torch.from_numpy(p["mask_i"])
        mask_j[b, :t] = torch.from_numpy(p["mask_j"])
    return MixedBatch(x_i, x_j, attn, torch.as_tensor(np.asarray(lams, np.float64)), torch.tensor([p["frame_start"] for p in pairs]),
                      positions, frame_mask, target_i, target_j, mask_i, mask_j)


def mixed_embeddings(model, batch: MixedBatch) -> Tensor:
    """lam · E(x_i) + (1 − lam) · E(x_j) with the model's own input embedding table, [B, Lmax, H]."""
    embed = model.get_input_embeddings()
    e_i, e_j = embed(batch.x_i.to(embed.weight.device)), embed(batch.x_j.to(embed.weight.device))
    lam = batch.lam.to(device=e_i.device, dtype=e_i.dtype)[:, None, None]
    return lam * e_i + (1 - lam) * e_j


def frame_logits(model, batch: MixedBatch) -> Tensor:
    """The model's logits on the mixed input at the frame positions, [B, Tmax, V] (already shifted:
    entry r predicts frame token s + r). Differentiable: the student's forward for the mixed losses."""
    embeds = mixed_embeddings(model, batch)
    logits = model(inputs_embeds=embeds, attention_mask=batch.attention_mask.to(embeds.device)).logits
    index = batch.positions.to(logits.device)[:, :, None].expand(-1, -1, logits.shape[-1])
    return logits.gather(1, index)


@torch.no_grad()
def teacher_label_rows(model, batch: MixedBatch, k: int) -> list[dict[str, np.ndarray]]:
    """Per pair, the teacher's top-k labels at its frame positions (soft-label arrays, full-vocab normalised, tau 1).

    token_logprob is the log-prob of x_i's token (the row's response_ids); tail_logmass is a
    logsumexp over the ids outside the top-k (exact, as in SparseLabels.from_logits).
    """
    logits = frame_logits(model, batch).float()
    labels = SparseLabels.from_logits(logits, k)
    logp_i = torch.log_softmax(logits, -1).gather(-1, batch.target_i.to(logits.device)[..., None])[..., 0]
    rows = []
    for b, t in enumerate(batch.frame_lengths()):
        rows.append({
            "topk_ids": labels.ids[b, :t].cpu().numpy().astype(np.int64),
            "topk_logprobs": labels.logprobs[b, :t].cpu().numpy().astype(np.float32),
            "token_logprob": logp_i[b, :t].cpu().numpy().astype(np.float32),
            "tail_logmass": labels.tail_logmass[b, :t].cpu().numpy().astype(np.float32),
        })
    return rows
