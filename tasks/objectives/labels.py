"""Sparse teacher labels as stored by the labelling stage (top-k + tail mass)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SparseLabels:
    """Teacher top-k log-probs per response position.

    ids           [B, T, k] long   teacher top-k token ids (pad positions: anything, e.g. 0)
    logprobs      [B, T, k] float  teacher log-probs of ``ids``, sorted descending, as stored
                                   (full-vocabulary normalised, temperature 1)
    tail_logmass  [B, T]    float  log of the teacher probability outside the top-k;
                                   ``-inf`` when the top-k is the whole vocabulary (k = V)
    target_ids    [B, T]    long   optional realised / reference token, used by ``ce``

    Values at padded positions are never read: objectives select the masked-in
    positions before computing anything, so ``-inf``/garbage there cannot leak NaNs.
    """

    ids: Tensor
    logprobs: Tensor
    tail_logmass: Tensor
    target_ids: Tensor | None = None

    def __post_init__(self) -> None:
        if self.ids.dim() < 2:
            raise ValueError(f"ids must be [..., k], got shape {tuple(self.ids.shape)}")
        if self.ids.dtype.is_floating_point or self.ids.dtype == torch.bool:
            raise ValueError(f"ids must be an integer tensor, got {self.ids.dtype}")
        if self.logprobs.shape != self.ids.shape:
            raise ValueError(
                f"logprobs shape {tuple(self.logprobs.shape)} != ids shape {tuple(self.ids.shape)}"
            )
        if not self.logprobs.dtype.is_floating_point:
            raise ValueError(f"logprobs must be floating point, got {self.logprobs.dtype}")
        lead = self.ids.shape[:-1]
        if self.tail_logmass.shape != lead:
            raise ValueError(
                f"tail_logmass shape {tuple(self.tail_logmass.shape)} != ids.shape[:-1] {tuple(lead)}"
            )
        if self.target_ids is not None and self.target_ids.shape != lead:
            raise ValueError(
                f"target_ids shape {tuple(self.target_ids.shape)} != ids.shape[:-1] {tuple(lead)}"
            )

    @property
    def k(self) -> int:
        return self.ids.shape[-1]

    def to(self, device: torch.device | str) -> "SparseLabels":
        return SparseLabels(
            ids=self.ids.to(device),
            logprobs=self.logprobs.to(device),
            tail_logmass=self.tail_logmass.to(device),
            target_ids=None if self.target_ids is None else self.target_ids.to(device),
        )

    @classmethod
    def from_logits(cls, teacher_logits: Tensor, k: int, target_ids: Tensor | None = None) -> "SparseLabels":
        """Sparsify dense teacher logits [..., V] (offline labelling, tests, benchmarks).

        The tail is a logsumexp over the ids outside the top-k (not ``log1p(-sum)``), so it
        stays exact even when the top-k holds almost all of the mass.
        """
        vocab = teacher_logits.shape[-1]
        if not 1 <= k <= vocab:
            raise ValueError(f"k must be in [1, {vocab}], got {k}")
        logp = torch.log_softmax(teacher_logits.float(), dim=-1)
        top_lp, top_ids = logp.topk(k, dim=-1, sorted=True)
        if k == vocab:
            tail = torch.full(logp.shape[:-1], float("-inf"), device=logp.device)
        else:
            tail = logp.scatter(-1, top_ids, float("-inf")).logsumexp(dim=-1)
        return cls(ids=top_ids, logprobs=top_lp, tail_logmass=tail, target_ids=target_ids)
