"""Turn vLLM's flat log-probability output into fixed-shape top-k label arrays.

With `flat_logprobs=True` vLLM returns, per position, the realised token first
(with its true rank) followed by ranks 1..k in order, all in flat lists. We
reshape those lists with numpy instead of walking one Python object per entry.
"""

from __future__ import annotations

import numpy as np


def tail_logmass(topk_logprobs: np.ndarray) -> np.ndarray:
    """log(1 - sum(exp(topk))) per row, computed in log space.

    Uses log(-expm1(lse)) which stays accurate when the top-k mass is close to 1
    (lse close to 0). Mass that rounds to 1 gives -inf, the honest answer.
    """
    lp = np.asarray(topk_logprobs, dtype=np.float64)
    peak = lp.max(axis=-1, keepdims=True)
    lse = (peak + np.log(np.exp(lp - peak).sum(axis=-1, keepdims=True)))[..., 0]
    lse = np.minimum(lse, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(-np.expm1(lse))


def _positions(flat, first: int, k: int):
    starts = np.asarray(flat.start_indices[first:], dtype=np.int64)
    ends = np.asarray(flat.end_indices[first:], dtype=np.int64)
    widths = ends - starts
    if widths.size and not np.all(widths == k + 1):
        bad = int(np.flatnonzero(widths != k + 1)[0]) + first
        raise ValueError(f"position {bad}: vLLM returned {widths[bad - first]} log-prob entries, expected k+1={k + 1}")
    if widths.size == 0:
        return np.zeros((0, k + 1), dtype=np.int64), np.zeros((0, k + 1), dtype=np.float32)
    lo, hi = int(starts[0]), int(ends[-1])
    ids = np.asarray(flat.token_ids[lo:hi], dtype=np.int64).reshape(-1, k + 1)
    lps = np.asarray(flat.logprobs[lo:hi], dtype=np.float32).reshape(-1, k + 1)
    return ids, lps


def labels_from_flat(flat, k: int, first_position: int = 0) -> dict[str, np.ndarray]:
    """Arrays for positions first_position.. of a FlatLogprobs (sampled or prompt).

    Returns realised ids [T], topk_ids [T,k], topk_logprobs [T,k] (descending),
    token_logprob [T] and tail_logmass [T].
    """
    ids, lps = _positions(flat, first_position, k)
    topk_lp = lps[:, 1:]
    return {
        "token_ids": ids[:, 0],
        "token_logprob": lps[:, 0],
        "topk_ids": ids[:, 1:],
        "topk_logprobs": topk_lp,
        "tail_logmass": tail_logmass(topk_lp).astype(np.float32),
    }
