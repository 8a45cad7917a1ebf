"""Per-example KD weights from the student's own uncertainty (Dynamic KD, Li et al. 2021), for any objective.

u(x) = H(q) / log V, the student's normalised entropy (temperature 1, full
vocabulary, computed without gradient), is the weight of the paper's reference
snippet (`dynamic_kd_loss`: mean(u · KL)). For a sequence it is the mean over
its valid response tokens (`granularity="example"`), or kept per token
(`"token"`).

* `UncertaintyWeighted(objective)`: the objective's teacher terms (fkl, akl, …)
  weighted per example; target terms (`ce`) unweighted, as in the paper
  (L = CE + mean(u · KD)). One pass over the vocabulary, as the plain objective:
  each registered per-token loss is multiplied by its position's weight before
  the runner sums and divides by `num_valid_tokens`, so the global-token
  normalisation across micro-batches and ranks is unchanged (weights of 1 give
  the plain objective exactly).
* `DynamicTeacher(objective, mode)`: two teachers' stored labels of the same
  responses, routed by student uncertainty (the released code's
  `UncertaintyTeacherKDForSequenceClassification`): `hard` sorts the batch by u,
  descending, and the more uncertain half (⌊B/2⌋ examples) distils from the
  small teacher, the rest from the large one; `soft` weights the two losses by
  w_small = mean_batch(u), w_large = 1 − w_small; `soft_instance` by u per
  example. Unlike the released code (which gives each half its own batch mean)
  every token keeps the same 1/num_valid_tokens weight.

An "example" is a row of a padded batch, or, in a packed batch (tasks/train/packing.py,
several sequences per row), the sequence that ``segments`` [B, T] names at each position;
every per-example quantity (u, the routing, ``kd_rows``) is then indexed by that sequence.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor

from .labels import SparseLabels
from .mixture import Objective, Term

GRANULARITIES = ("example", "token")
WEIGHT_MODES = ("entropy", "confidence")  # u, or 1 − u (the paper's "-r" variants)
TEACHER_MODES = ("hard", "soft", "soft_instance")
_ENTROPY_CHUNK_ELEMENTS = 1 << 24


@torch.no_grad()
def normalised_entropy(student_logits: Tensor, mask: Tensor) -> Tensor:
    """H(softmax(logits)) / log V per position [B, T] (0 where mask is False), float32 or wider, no gradient.

    Walks the valid positions in chunks (no [B, T, V] copy), so it works on sliced logits too.
    """
    vocab = student_logits.shape[-1]
    lead = student_logits.shape[:-1]
    if mask.shape != lead:
        raise ValueError(f"mask shape {tuple(mask.shape)} != student_logits.shape[:-1] {tuple(lead)}")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    out = torch.zeros(lead.numel(), dtype=dtype, device=student_logits.device)
    rows = mask.reshape(-1).bool().nonzero().squeeze(1)
    index = torch.unravel_index(rows, lead) if len(lead) > 1 else (rows,)
    chunk = max(1, _ENTROPY_CHUNK_ELEMENTS // max(vocab, 1))
    for s in range(0, rows.numel(), chunk):
        x = student_logits[tuple(i[s : s + chunk] for i in index)].to(dtype)
        logp = torch.log_softmax(x, dim=-1)
        out[rows[s : s + chunk]] = -(logp.exp() * logp).sum(-1)
    return (out / math.log(vocab) if vocab > 1 else out * 0).reshape(lead)


def example_index(mask: Tensor, segments: Tensor | None = None) -> tuple[Tensor, int]:
    """(example of each position [B, T], number of examples): the row of a padded batch (``segments`` None),
    else ``segments`` (a packed batch's sequence index per position; any value where ``mask`` is False)."""
    if segments is None:
        rows = mask.shape[0]
        return torch.arange(rows, device=mask.device)[:, None].expand(mask.shape), rows
    if segments.shape != mask.shape:
        raise ValueError(f"segments shape {tuple(segments.shape)} != mask shape {tuple(mask.shape)}")
    index = torch.where(mask.bool(), segments.to(mask.device), 0)
    return index, int(index.max()) + 1 if index.numel() else 0


def per_example_mean(values: Tensor, mask: Tensor, segments: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(mean of ``values`` over each example's valid positions [E] (0 for none), valid positions per example [E])."""
    index, count = example_index(mask, segments)
    valid = mask.bool()
    sums = torch.zeros(count, dtype=values.dtype, device=values.device).index_add_(0, index[valid], values[valid])
    tokens = torch.zeros(count, dtype=values.dtype, device=values.device).index_add_(
        0, index[valid], torch.ones_like(values[valid]))
    return sums / tokens.clamp_min(1.0), tokens


def example_uncertainty(student_logits: Tensor, mask: Tensor, segments: Tensor | None = None) -> Tensor:
    """u per example [E]: the mean normalised entropy over its valid positions (0 for an empty one)."""
    return per_example_mean(normalised_entropy(student_logits, mask), mask, segments)[0]


def uncertainty_weights(student_logits: Tensor, mask: Tensor, granularity: str = "example",
                        mode: str = "entropy", segments: Tensor | None = None) -> Tensor:
    """Per-position KD weights [B, T] (detached): u of the example (or of the token), or 1 − u."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity {granularity!r} is not one of {GRANULARITIES}")
    if mode not in WEIGHT_MODES:
        raise ValueError(f"weight mode {mode!r} is not one of {WEIGHT_MODES}")
    if granularity == "token":
        u = normalised_entropy(student_logits, mask)
    else:
        u = example_uncertainty(student_logits, mask, segments)[example_index(mask, segments)[0]]
    return u if mode == "entropy" else 1.0 - u


def split_terms(objective: Objective) -> tuple[Objective | None, Objective | None]:
    """(teacher terms, target terms) of an objective as two objectives with the same settings."""
    def build(terms):
        if not terms:
            return None
        return Objective(list(terms), objective.support, objective.temperature, objective.scale_t2, objective.chunk_size)

    return (build([t for t in objective.terms if t.definition.uses_teacher]),
            build([t for t in objective.terms if not t.definition.uses_teacher]))


class UncertaintyWeighted:
    """``weighted(student_logits, labels, mask, num_valid_tokens=None, weights=None, segments=None)``.

    Returns Σ_valid w_t · (teacher terms)_t / num_valid_tokens + (target terms), where w are the
    student's uncertainty weights (``uncertainty_weights``) unless ``weights`` [B, T] are given.
    ``last_parts`` and ``last_weights`` (per example mean) hold the most recent call's values.
    ``segments``: a packed batch's sequence index per position (see the module docstring).
    """

    def __init__(self, objective: Objective, granularity: str = "example", mode: str = "entropy"):
        uncertainty_weights(torch.zeros(1, 1, 2), torch.ones(1, 1, dtype=torch.bool), granularity, mode)  # validates
        self.objective, self.granularity, self.mode = objective, granularity, mode
        self._w: Tensor | None = None
        terms = [Term(t.name, t.weight, replace(t.definition, fn=self._weighted(t.definition.fn)), t.params)
                 if t.definition.uses_teacher else t for t in objective.terms]
        self._inner = Objective(terms, objective.support, objective.temperature, objective.scale_t2, objective.chunk_size)
        self.last_weights: Tensor | None = None

    def _weighted(self, fn):
        def weighted_fn(*args, **params):
            per_token = fn(*args, **params)  # [N] in the order of mask.reshape(-1).nonzero() (the runner's rows)
            return per_token * self._w.to(device=per_token.device, dtype=per_token.dtype)

        return weighted_fn

    @property
    def last_parts(self) -> dict[str, float]:
        return self._inner.last_parts

    def __repr__(self) -> str:
        return f"UncertaintyWeighted({self.objective!r}, granularity={self.granularity!r}, mode={self.mode!r})"

    def __call__(self, student_logits: Tensor, labels: SparseLabels, mask: Tensor,
                 num_valid_tokens: int | float | Tensor | None = None, weights: Tensor | None = None,
                 segments: Tensor | None = None) -> Tensor:
        mask = mask.bool()
        if weights is None:
            weights = uncertainty_weights(student_logits, mask, self.granularity, self.mode, segments)
        elif weights.shape != mask.shape:
            raise ValueError(f"weights shape {tuple(weights.shape)} != mask shape {tuple(mask.shape)}")
        weights = weights.detach()
        self.last_weights = per_example_mean(weights, mask, segments)[0]
        self._w = weights.reshape(-1)[mask.reshape(-1)]
        try:
            return self._inner(student_logits, labels, mask, num_valid_tokens)
        finally:
            self._w = None


class DynamicTeacher:
    """``dynamic(student_logits, small, large, mask, num_valid_tokens=None, segments=None)``: KD from two teachers
    routed by u.

    ``small``/``large`` are the two teachers' SparseLabels of the same response tokens. The
    objective's teacher terms are applied per teacher with the mode's weights; its target
    terms (``ce``) once, on the small teacher's ``target_ids``. ``last_small_weight`` [E]
    is each example's weight on the small teacher (1/0 in hard mode).
    """

    def __init__(self, objective: Objective, mode: str = "hard"):
        if mode not in TEACHER_MODES:
            raise ValueError(f"dynamic teacher mode {mode!r} is not one of {TEACHER_MODES}")
        self.mode = mode
        kd, self._target = split_terms(objective)
        if kd is None:
            raise ValueError(f"{objective!r} has no teacher term; dynamic teacher adoption needs one (e.g. fkl)")
        self._kd = kd
        self._weighted = UncertaintyWeighted(kd)
        self.last_small_weight: Tensor | None = None
        self.last_parts: dict[str, float] = {}

    def small_weights(self, student_logits: Tensor, mask: Tensor, segments: Tensor | None = None) -> Tensor:
        """Per-example weight [E] on the small teacher (the large one gets 1 − it)."""
        u, tokens = per_example_mean(normalised_entropy(student_logits, mask), mask, segments)
        present = tokens > 0
        if self.mode == "soft_instance":
            return u
        if self.mode == "soft":
            return u[present].mean().expand_as(u).clone() if present.any() else torch.zeros_like(u)
        w = torch.zeros_like(u)
        idx = present.nonzero().squeeze(1)
        order = idx[torch.sort(u[idx], descending=True, stable=True).indices]
        w[order[: idx.numel() // 2]] = 1.0
        return w

    def __call__(self, student_logits: Tensor, small: SparseLabels, large: SparseLabels, mask: Tensor,
                 num_valid_tokens: int | float | Tensor | None = None, segments: Tensor | None = None) -> Tensor:
        mask = mask.bool()
        if small.target_ids is not None and large.target_ids is not None and \
                not torch.equal(small.target_ids[mask], large.target_ids[mask]):
            raise ValueError("the two teachers' labels are for different response tokens; "
                             "dynamic teacher adoption needs both teachers to score the same responses")
        n = mask.sum() if num_valid_tokens is None else num_valid_tokens  # global count, whatever the routing
        w_small = self.small_weights(student_logits, mask, segments)
        self.last_small_weight = w_small
        w = w_small[example_index(mask, segments)[0]]  # [B, T]
        parts: dict[str, float] = {}
        if self.mode == "hard":  # each example sees one teacher: compute only its rows
            to_small = mask & (w > 0.5)
            loss = self._kd(student_logits, small, to_small, n)
            parts.update({f"small/{k}": v for k, v in self._kd.last_parts.items()})
            loss = loss + self._kd(student_logits, large, mask & ~to_small, n)
            parts.update({f"large/{k}": v for k, v in self._kd.last_parts.items()})
        else:
            loss = self._weighted(student_logits, small, mask, n, weights=w, segments=segments)
            parts.update({f"small/{k}": v for k, v in self._weighted.last_parts.items()})
            loss = loss + self._weighted(student_logits, large, mask, n, weights=1.0 - w, segments=segments)
            parts.update({f"large/{k}": v for k, v in self._weighted.last_parts.items()})
        if self._target is not None:
            loss = loss + self._target(student_logits, small, mask, n)
            parts.update(self._target.last_parts)
        self.last_parts = parts
        return loss


def dynamic_teacher_loss(objective: Objective, student_logits: Tensor, small: SparseLabels, large: SparseLabels,
                         mask: Tensor, mode: str = "hard", num_valid_tokens: int | float | Tensor | None = None) -> Tensor:
    """Functional form of ``DynamicTeacher(objective, mode)(student_logits, small, large, mask, num_valid_tokens)``."""
    return DynamicTeacher(objective, mode)(student_logits, small, large, mask, num_valid_tokens)


NO_TEACHER_PART = "ce_no_teacher"


class TeacherMasked:
    """``masked(student_logits, labels, mask, num_valid_tokens=None, kd_rows=None)``: the objective on rows with
    teacher labels, cross-entropy on the others (lazy labelling: unselected prompts train on their reference).

    kd_rows [E] (bool) says which examples hold teacher labels (rows of a padded batch, or the sequences that
    ``segments`` names in a packed one); None means all do, and the result is the objective alone. Both parts share one denominator (the global count of valid tokens, all rows), so a row's loss does not
    depend on which other rows have labels. ``last_parts`` always holds the objective's parts plus
    ``ce_no_teacher`` (same keys every call, as the loop's all-reduce of the parts needs).
    """

    def __init__(self, objective):
        from .registry import lookup

        self.objective = objective
        base = objective.objective if isinstance(objective, UncertaintyWeighted) else objective
        self._ce = Objective([Term("ce", 1.0, lookup("ce"), {})], base.support, base.temperature, base.scale_t2,
                             base.chunk_size)
        self.last_parts: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"TeacherMasked({self.objective!r})"

    def __call__(self, student_logits: Tensor, labels: SparseLabels, mask: Tensor,
                 num_valid_tokens: int | float | Tensor | None = None, kd_rows: Tensor | None = None,
                 segments: Tensor | None = None) -> Tensor:
        mask = mask.bool()
        n = mask.sum() if num_valid_tokens is None else num_valid_tokens
        kd_mask = mask if kd_rows is None else mask & kd_rows.bool().to(mask.device)[example_index(mask, segments)[0]]
        if isinstance(self.objective, UncertaintyWeighted):
            loss = self.objective(student_logits, labels, kd_mask, n, segments=segments)
        else:
            loss = self.objective(student_logits, labels, kd_mask, n)
        parts = dict(self.objective.last_parts)
        loss = loss + self._ce(student_logits, labels, mask & ~kd_mask, n)
        parts[NO_TEACHER_PART] = self._ce.last_parts["ce"]
        self.last_parts = parts
        return loss


# The losses with per-example parts: they take a packed batch's ``segments`` (the plain objectives do not need them).
PER_EXAMPLE_LOSSES = (UncertaintyWeighted, DynamicTeacher, TeacherMasked)
