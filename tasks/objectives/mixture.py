"""Objective runner, single objectives and weighted mixtures.

A single objective is a one-term mixture, so both share one runner: select the valid
tokens, run one chunked full-vocabulary pass per distinct temperature (KD terms at tau,
``ce`` at 1; merged into one pass when tau == 1), build the bucket distributions once, and
sum the weighted per-token losses.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor

from .labels import SparseLabels
from .registry import ObjectiveDef, all_param_names, lookup
from .support import (
    DEFAULT_SUPPORT,
    _as_2d,
    auto_chunk_size,
    check_support,
    gather_student_logprobs,
    make_buckets,
    plan_chunks,
)


@dataclass(frozen=True)
class Term:
    name: str
    weight: float
    definition: ObjectiveDef
    params: Mapping[str, float]


class Objective:
    """``objective(student_logits [B,T,V], labels, mask [B,T], num_valid_tokens=None)``.

    Returns sum over valid positions of the weighted per-token loss, divided by
    ``num_valid_tokens`` (default ``mask.sum()``; clamped to >= 1).  Pass the *global* count
    of valid tokens across gradient-accumulation micro-batches and data-parallel ranks so
    that every token carries the same weight regardless of how the batch was split.

    ``student_logits[b, t]`` must already be the prediction for response position t (the
    caller shifts).  ``last_parts`` holds the unweighted value of each term (same
    normalisation, tau^2 included) from the most recent call, for logging.
    """

    def __init__(
        self,
        terms: list[Term],
        support: str = DEFAULT_SUPPORT,
        temperature: float = 1.0,
        scale_t2: bool = False,
        chunk_size: int | None = None,
    ) -> None:
        self.terms = tuple(terms)
        self.support = check_support(support)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
        self.temperature = float(temperature)
        if not isinstance(scale_t2, bool):
            raise ValueError(f"scale_t2 must be a bool, got {scale_t2!r}")
        self.scale_t2 = scale_t2
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        self.chunk_size = chunk_size
        self._last: dict[str, Tensor] = {}

    @property
    def last_parts(self) -> dict[str, float]:
        # Stored as detached tensors; converted only when read (avoids a device sync per step).
        return {name: float(v) for name, v in self._last.items()}

    def __repr__(self) -> str:
        spec = " + ".join(f"{t.weight:g}*{t.name}" + (f"{dict(t.params)}" if t.params else "") for t in self.terms)
        return (
            f"Objective({spec}, support={self.support!r}, temperature={self.temperature:g}, "
            f"scale_t2={self.scale_t2})"
        )

    def __call__(
        self,
        student_logits: Tensor,
        labels: SparseLabels,
        mask: Tensor,
        num_valid_tokens: int | float | Tensor | None = None,
    ) -> Tensor:
        logits = student_logits
        if logits.dim() < 2:
            raise ValueError(f"student_logits must be [..., V], got shape {tuple(logits.shape)}")
        lead = logits.shape[:-1]
        if mask.shape != lead:
            raise ValueError(f"mask shape {tuple(mask.shape)} != student_logits.shape[:-1] {tuple(lead)}")
        if labels.ids.shape[:-1] != lead:
            raise ValueError(f"labels shape {tuple(labels.ids.shape[:-1])} != student_logits.shape[:-1] {tuple(lead)}")
        if mask.dtype != torch.bool:
            mask = mask.bool()

        row_break = None
        if _as_2d(logits) is None:  # e.g. logits[:, :-1] of a [B, T+1, V] tensor
            if logits.dim() == 3:
                row_break = logits.shape[1]
            else:
                logits = logits.contiguous()
        vocab = logits.shape[-1]
        plan = plan_chunks(mask, self.chunk_size or auto_chunk_size(vocab), row_break)
        rows = plan.rows
        groups = self.student_groups(labels, rows)
        outs = gather_student_logprobs(logits, plan, groups)
        return self.loss_from_student_logprobs(outs, labels, rows, mask, num_valid_tokens)

    def student_groups(self, labels: SparseLabels, rows: Tensor) -> list[tuple[float, Tensor]]:
        """The (temperature, ids [N, m]) groups the student log-softmax is read at, for the valid flat
        positions ``rows``: the teacher's top-k at tau, the target at 1 (one group when tau == 1)."""
        tau = self.temperature
        need_teacher = any(t.definition.uses_teacher for t in self.terms)
        need_target = any(not t.definition.uses_teacher for t in self.terms)
        groups: list[tuple[float, Tensor]] = []
        if need_teacher:
            ids = labels.ids.reshape(-1, labels.k).index_select(0, rows).long()
            groups.append((tau, ids))
        if need_target:
            if labels.target_ids is None:
                names = [t.name for t in self.terms if not t.definition.uses_teacher]
                raise ValueError(f"objective(s) {names} need labels.target_ids")
            tgt = labels.target_ids.reshape(-1).index_select(0, rows).long()[:, None]
            if need_teacher and tau == 1.0:  # same temperature: one pass over V for both
                groups[0] = (tau, torch.cat([groups[0][1], tgt], dim=1))
            else:
                groups.append((1.0, tgt))
        return groups

    def loss_from_student_logprobs(
        self, outs: list[Tensor], labels: SparseLabels, rows: Tensor, mask: Tensor, num_valid_tokens=None
    ) -> Tensor:
        """The loss from the gathered student log-probs (``outs``, one per group of ``student_groups``);
        shared by this logits path and the fused hidden-state path (``fused_head.py``)."""
        tau = self.temperature
        need_teacher = any(t.definition.uses_teacher for t in self.terms)
        need_target = any(not t.definition.uses_teacher for t in self.terms)

        buckets = target_lp = None
        if need_teacher:
            k = labels.k
            student_lp = outs[0][:, :k]
            teacher_lp = labels.logprobs.reshape(-1, k).index_select(0, rows)
            teacher_tail = labels.tail_logmass.reshape(-1).index_select(0, rows)
            buckets = make_buckets(self.support, teacher_lp, teacher_tail, student_lp, tau)
        if need_target:
            target_lp = outs[-1][:, -1:]

        denom = _denominator(mask, num_valid_tokens, outs[0])
        total = None
        parts: dict[str, Tensor] = {}
        for term in self.terms:
            d = term.definition
            per_token = d.fn(buckets, **term.params) if d.uses_teacher else d.fn(target_lp, **term.params)
            value = per_token.sum() / denom
            if d.uses_teacher and self.scale_t2:
                value = value * tau**2
            parts[term.name] = value.detach()
            total = term.weight * value if total is None else total + term.weight * value
        self._last = parts
        return total


def _denominator(mask: Tensor, num_valid_tokens, like: Tensor) -> Tensor:
    if num_valid_tokens is None:
        n = mask.sum()
    elif isinstance(num_valid_tokens, Tensor):
        n = num_valid_tokens.detach()
    elif isinstance(num_valid_tokens, (int, float)) and not isinstance(num_valid_tokens, bool):
        n = torch.tensor(float(num_valid_tokens))
    else:
        raise ValueError(f"num_valid_tokens must be a number or tensor, got {num_valid_tokens!r}")
    return n.to(device=like.device, dtype=like.dtype).clamp_min(1.0)


# --------------------------------------------------------------------------------------
# Public constructors


def get_objective(
    name: str,
    support: str = DEFAULT_SUPPORT,
    temperature: float = 1.0,
    scale_t2: bool = False,
    chunk_size: int | None = None,
    **params: float,
) -> Objective:
    """One registered objective by exact name, e.g. ``get_objective("jsd", beta=0.9)``."""
    d = lookup(name)
    return Objective([Term(name, 1.0, d, d.resolve_params(params))], support, temperature, scale_t2, chunk_size)


_TERM_RE = re.compile(
    r"\s*(?:(?P<w>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*\*\s*)?(?P<name>[A-Za-z_][A-Za-z0-9_]*)\s*(?P<sep>\+|$)"
)


def parse_spec(spec: str | Mapping[str, float]) -> list[tuple[str, float]]:
    """"akl" | "0.5*akl+0.5*ce" | "akl+ce" | {"akl": 0.5, "ce": 0.5} -> [(name, weight)]."""
    if isinstance(spec, Mapping):
        items = list(spec.items())
    elif isinstance(spec, str):
        items, pos = [], 0
        while True:
            m = _TERM_RE.match(spec, pos)
            if m is None or m.end() == pos:
                raise ValueError(f"cannot parse objective spec {spec!r} at position {pos}; expected e.g. '0.5*akl+0.5*ce'")
            items.append((m["name"], float(m["w"]) if m["w"] is not None else 1.0))
            pos = m.end()
            if m["sep"] != "+":
                break
            if pos >= len(spec):
                raise ValueError(f"objective spec {spec!r} ends with '+'")
    else:
        raise ValueError(f"objective spec must be a name, 'w*name+...' string or dict, got {spec!r}")
    if not items:
        raise ValueError("objective spec is empty")
    seen = set()
    out = []
    for name, w in items:
        lookup(name)
        if name in seen:
            raise ValueError(f"objective {name!r} appears twice in spec {spec!r}")
        seen.add(name)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"weight of {name!r} must be a finite number >= 0, got {w!r}")
        out.append((name, float(w)))
    return out


def build_objective(
    spec: str | Mapping[str, float],
    support: str = DEFAULT_SUPPORT,
    temperature: float = 1.0,
    scale_t2: bool = False,
    chunk_size: int | None = None,
    **params: float,
) -> Objective:
    """Weighted mixture from a spec (see ``parse_spec``).

    Each parameter goes to every component that accepts it (``mu`` -> akl, ``beta`` -> jsd,
    ``alpha`` -> skew_*); a parameter no component accepts raises.  A weight of 0 keeps the
    term for logging (``last_parts``) without training on it.
    """
    pairs = parse_spec(spec)
    defs = {name: lookup(name) for name, _ in pairs}
    for key in params:
        if not any(key in d.defaults for d in defs.values()):
            names = ", ".join(defs)
            takes = sorted({p for d in defs.values() for p in d.defaults})
            raise ValueError(
                f"parameter {key!r} is not used by any component of {names!r}; "
                f"they take: {', '.join(takes) or 'none'} (all parameters: {', '.join(all_param_names())})"
            )
    terms = [
        Term(name, w, defs[name], defs[name].resolve_params({k: v for k, v in params.items() if k in defs[name].defaults}))
        for name, w in pairs
    ]
    return Objective(terms, support, temperature, scale_t2, chunk_size)

