"""The MixKD student loss: three terms, each a registered objective (tasks/objectives), no new divergence code.

    L = kd_weight   · objective(student(x), teacher labels of x)              KD on the original sequences
      + sm_weight   · KL(y'  ‖ student(e'_S))                                  student mixup loss
      + tmkd_weight · mixed_objective(student(e'_S), teacher(e'_T) labels)     teacher-mixup KD

with e' = lam·E(x_i) + (1 − lam)·E(x_j) over each model's own embedding table (alignment:
tasks/augment/mixing.py) and y' the interpolated one-hot targets lam·δ(x_i) + (1 − lam)·δ(x_j).

The student mixup loss is `fkl` (tail_bucket, temperature 1) against y' written as two-entry
`SparseLabels` (ids x_i, x_j; log-probs log lam, log(1 − lam); no tail). KL(y' ‖ q) = CE(y', q) − H(y'):
the mixup cross-entropy λ·CE(x_i) + (1 − λ)·CE(x_j) minus a constant, so the gradient is the
mixup cross-entropy's and the logged value is 0 at a perfect fit. Where only one of the two
sequences has a response token (different lengths), y' is that token alone (renormalised over
the sides present). Both mixed terms count the union of the two sides' response positions.

Weights: 1, 1, 1 by default (tasks/augment/config.py says why these are ours, not the paper's).

Where embedding mixup makes sense for a generative model, plainly: MixKD was built for
classification (GLUE, one label per input), where y' = lam·y_i + (1 − lam)·y_j is a meaningful
soft label and the mixed input is a point between two examples of the same task. For an LLM it
carries over to **short answers and classification-style tasks** (labels, numbers, one phrase —
the demo task's answers), where the two responses align position by position and an
interpolated next-token target is still a sensible distribution. It does **not** make sense
for long free-form generation: after the first few response tokens the two sequences are
unrelated text, the interpolated target of "token t of answer i and token t of answer j"
is no answer at all, and the teacher on an off-manifold embedding mixture is an
extrapolation nobody evaluates. There, prefer ordinary token-level augmentation (expansion
and curation: tasks/expand, tasks/curate), whose inputs are real text.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tasks.augment.mixing import MixedBatch, align_pair, collate
from tasks.objectives import DEFAULT_SUPPORT, SparseLabels, build_objective, parse_spec
from tasks.objectives.registry import lookup


@dataclass(frozen=True)
class MixKDWeights:
    kd: float = 1.0
    sm: float = 1.0
    tmkd: float = 1.0


def interpolated_labels(batch: MixedBatch, vocab_size: int) -> SparseLabels:
    """y' as two-entry sparse labels per frame position (see the module docstring), sorted descending."""
    lam = batch.lam.to(torch.float64)[:, None].expand_as(batch.target_i)
    both = batch.mask_i & batch.mask_j & (batch.target_i != batch.target_j)
    w_i = torch.where(both, lam, torch.where(batch.mask_i, 1.0, 0.0)).to(torch.float64)
    # same token on both sides: all the mass on it (as side i)
    w_i = torch.where(batch.mask_i & batch.mask_j & (batch.target_i == batch.target_j), 1.0, w_i)
    w_j = 1.0 - w_i
    id_j = torch.where(w_j > 0, batch.target_j, (batch.target_i + 1) % vocab_size)  # a distinct id with weight 0
    lp_i, lp_j = torch.log(w_i), torch.log(w_j)  # log 0 = -inf: an empty entry
    swap = lp_j > lp_i
    ids = torch.stack([torch.where(swap, id_j, batch.target_i), torch.where(swap, batch.target_i, id_j)], -1)
    lps = torch.stack([torch.where(swap, lp_j, lp_i), torch.where(swap, lp_i, lp_j)], -1).float()
    tail = torch.full(batch.target_i.shape, float("-inf"))
    return SparseLabels(ids=ids, logprobs=lps, tail_logmass=tail)


class MixKDLoss:
    """``loss(orig_logits, orig_labels, orig_mask, mix_logits, mix_batch, mix_teacher)``.

    orig_*: as for any objective (student logits already shifted to the response positions).
    mix_logits [B, T, V]: the student on the mixed input at the frame positions
    (`tasks.augment.mixing.frame_logits(student, mix_batch)`); mix_teacher: the stored teacher
    labels of the same pairs at the same positions (`mixed_batch`). `num_orig` / `num_mix`:
    global valid-token counts (as for `Objective`); default the local counts.
    ``last_parts``: kd, sm, tmkd (unweighted) and the original objective's own parts as ``kd/<name>``.
    """

    def __init__(self, original: str | Mapping[str, float] = "fkl+ce", mixed: str = "fkl",
                 weights: MixKDWeights = MixKDWeights(), support: str = DEFAULT_SUPPORT, temperature: float = 1.0,
                 scale_t2: bool = False, chunk_size: int | None = None, **params: float) -> None:
        for name, _ in parse_spec(mixed):
            if not lookup(name).uses_teacher:
                raise ValueError(f"mixed objective {mixed!r}: {name!r} uses hard targets; the mixed-input term is a divergence to the teacher")
        for w in (weights.kd, weights.sm, weights.tmkd):
            if not (math.isfinite(w) and w >= 0):
                raise ValueError(f"MixKD weights must be finite and >= 0, got {weights}")
        self.weights = weights
        self.original = build_objective(original, support, temperature, scale_t2, chunk_size, **params)
        mixed_params = {k: v for k, v in params.items() if any(k in lookup(n).defaults for n, _ in parse_spec(mixed))}
        self.tmkd = build_objective(mixed, support, temperature, scale_t2, chunk_size, **mixed_params)
        self.sm = build_objective("fkl", "tail_bucket", 1.0, False, chunk_size)
        self._last: dict[str, float] = {}

    @property
    def last_parts(self) -> dict[str, float]:
        return dict(self._last)

    def __call__(self, orig_logits: Tensor, orig_labels: SparseLabels, orig_mask: Tensor, mix_logits: Tensor,
                 mix_batch: MixedBatch, mix_teacher: SparseLabels, num_orig=None, num_mix=None) -> Tensor:
        device = mix_logits.device
        union = mix_batch.union_mask.to(device)
        if num_mix is None:
            num_mix = union.sum()
        kd = self.original(orig_logits, orig_labels, orig_mask, num_orig)
        sm = self.sm(mix_logits, interpolated_labels(mix_batch, mix_logits.shape[-1]).to(device), union, num_mix)
        tmkd = self.tmkd(mix_logits, mix_teacher.to(device), union, num_mix)
        self._last = {"kd": float(kd.detach()), "sm": float(sm.detach()), "tmkd": float(tmkd.detach()),
                      **{f"kd/{k}": v for k, v in self.original.last_parts.items()}}
        return self.weights.kd * kd + self.weights.sm * sm + self.weights.tmkd * tmkd


def mixed_batch(records: Iterable[Mapping[str, Any]], plan_rows: Mapping[str, Mapping[str, Any]],
                sequences: Mapping[str, tuple[list[int], list[int]]], pad_id: int) -> tuple[MixedBatch, SparseLabels]:
    """A training batch from stored mixed-label records: the aligned pairs (for the student's own mixed
    embeddings) and the teacher's labels on the same frame positions.

    records: decoded rows of a mixup capture (`storage.soft_labels.read`); plan_rows: plan rows by
    plan_row_id (`tasks.augment.plan.read_epoch`); sequences: sample_id -> (prompt_ids, response_ids)
    of the original labels (`tasks.augment.stage.load_sequences`).
    """
    records = list(records)
    pairs, lams = [], []
    for rec in records:
        row = plan_rows[rec["example_id"]]
        pair = align_pair(*sequences[row["id_i"]], *sequences[row["id_j"]], pad_id)
        if pair["length"] - pair["frame_start"] != len(rec["response_ids"]) or not np.array_equal(pair["x_i"][pair["frame_start"]:], rec["response_ids"]):
            raise ValueError(f"mixed label {rec['sample_id']} (plan row {rec['example_id']}) does not match its plan pair; "
                             "the labels come from another plan or other source labels")
        pairs.append(pair)
        lams.append(row["lam"])
    batch = collate(pairs, lams, pad_id)
    bsz, tmax = batch.target_i.shape
    k = records[0]["topk_ids"].shape[1]
    ids = torch.zeros(bsz, tmax, k, dtype=torch.long)
    lps = torch.zeros(bsz, tmax, k)
    tail = torch.zeros(bsz, tmax)
    for b, rec in enumerate(records):
        t = len(rec["response_ids"])
        ids[b, :t] = torch.from_numpy(np.asarray(rec["topk_ids"], np.int64))
        lps[b, :t] = torch.from_numpy(np.asarray(rec["topk_logprobs"], np.float32))
        tail[b, :t] = torch.from_numpy(np.asarray(rec["tail_logmass"], np.float32))
    return batch, SparseLabels(ids=ids, logprobs=lps, tail_logmass=tail)
