"""Per-prompt uncertainty of a student from its own top-k log-probabilities (pure numpy).

Input rows are what tasks.teacher.capture.generate_rows returns for the student:
per response position the top-k log-probs (full-vocabulary normalised,
temperature 1) and the log of the mass outside them. Per position:

* entropy  H = −Σ_i p_i log p_i − p_tail log p_tail over the k entries plus one
  tail bucket (the tail as a single outcome: a lower bound of the full-vocabulary
  entropy, exact when the top-k holds all the mass);
* margin   p_1 − p_2 (the two most likely tokens; needs k ≥ 2);
* confidence p_1.

Per prompt: the mean over its response tokens (over all its samples). Dynamic KD
(Li et al. 2021) ranks by highest entropy, smallest margin, lowest confidence.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from storage.atomic import sha256_json
from storage.errors import UserError

METHODS = ("entropy", "margin", "confidence", "random")
# True: a higher score is more uncertain (selected first).
HIGHER_FIRST = {"entropy": True, "margin": False, "confidence": False, "random": True}


class SelectionError(UserError):
    """A selection that cannot be made as asked; the message names the setting or file and the fix."""


def position_stats(topk_logprobs: np.ndarray, tail_logmass: np.ndarray) -> dict[str, np.ndarray]:
    """entropy, margin, confidence per position ([T] each), in float64."""
    lp = np.asarray(topk_logprobs, dtype=np.float64)
    tail = np.asarray(tail_logmass, dtype=np.float64)
    p, p_tail = np.exp(lp), np.exp(tail)
    with np.errstate(invalid="ignore"):
        ent = -np.where(p > 0, p * lp, 0.0).sum(axis=1) - np.where(p_tail > 0, p_tail * tail, 0.0)
    top = -np.sort(-p, axis=1)
    margin = top[:, 0] - top[:, 1] if top.shape[1] > 1 else np.full(top.shape[0], np.nan)
    return {"entropy": ent, "margin": margin, "confidence": top[:, 0]}


def prompt_stats(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """example_id -> mean entropy / margin / confidence over its response tokens, plus token counts."""
    acc: dict[str, dict[str, Any]] = {}
    for r in rows:
        s = position_stats(r["topk_logprobs"], r["tail_logmass"])
        a = acc.setdefault(r["example_id"], {"entropy": [], "margin": [], "confidence": [], "response_tokens": 0,
                                             "prompt_tokens": len(r["prompt_ids"])})
        for name in ("entropy", "margin", "confidence"):
            a[name].append(s[name])
        a["response_tokens"] += len(r["response_ids"])
    return {
        ex: {**{name: float(np.mean(np.concatenate(a[name]))) for name in ("entropy", "margin", "confidence")},
             "response_tokens": int(a["response_tokens"]), "prompt_tokens": int(a["prompt_tokens"])}
        for ex, a in acc.items()
    }


def random_score(seed: int, example_id: str) -> float:
    """A uniform [0, 1) draw per example from (seed, example_id): independent of order, so growing r is a superset."""
    return int(sha256_json([int(seed), str(example_id)])[:13], 16) / float(16**13)


def method_scores(stats: Mapping[str, Mapping[str, float]], method: str, seed: int = 0) -> dict[str, float]:
    if method not in METHODS:
        raise SelectionError(f"unknown selection method {method!r}; valid: {', '.join(METHODS)}")
    if method == "random":
        return {ex: random_score(seed, ex) for ex in stats}
    return {ex: float(s[method]) for ex, s in stats.items()}
