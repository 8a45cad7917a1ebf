"""Support policies and the chunked student-side gather.

The student side of every objective is ``log_softmax(student_logits / tau)`` over the full
vocabulary, read at a handful of ids per token (the teacher's top-k, or the target).  Doing
that densely would materialise a [tokens, V] log-softmax (like ``F.cross_entropy``) and keep
it alive for backward.  ``gather_student_logprobs`` instead walks the valid tokens in chunks
of ``chunk_size`` rows through one reusable [chunk, V] float32 workspace, and its backward
recomputes the softmax chunk by chunk, writing straight into the gradient buffer.  Peak
memory is therefore the logits, their gradient and one workspace; nothing of size B x T x V
is built for the teacher.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

SUPPORTS = ("tail_bucket", "renormalize")
DEFAULT_SUPPORT = "tail_bucket"

# Workspace budget per chunk (elements of the [chunk, V] buffer) when chunk_size is None.
# ~16M float32 = 64 MiB: big enough to amortise per-op overhead, small enough to stay
# cache/allocator friendly (see bench/loss.py).
_AUTO_CHUNK_ELEMENTS = 1 << 24
# Runs of contiguous valid rows shorter than this are batched through index_select
# instead of becoming their own (tiny) view chunk.
_MIN_VIEW_RUN = 32


def check_support(support: str) -> str:
    if support not in SUPPORTS:
        raise ValueError(f"unknown support {support!r}; valid: {', '.join(SUPPORTS)}")
    return support


def auto_chunk_size(vocab: int) -> int:
    return max(16, min(1024, _AUTO_CHUNK_ELEMENTS // max(vocab, 1)))


@dataclass(frozen=True)
class ChunkPlan:
    """Which flattened rows are valid and how to walk them.

    ``chunks`` holds ``(s, e, start)``: rows ``plan.rows[s:e]``; ``start >= 0`` means those
    rows are the contiguous flat positions ``start .. start + e - s - 1`` (read as a view,
    no copy), ``start == -1`` means they are gathered with ``index_select``.
    """

    rows: Tensor  # [N] long, flat positions of valid tokens (on the logits' device)
    invalid: Tensor  # [R - N] long, flat positions of masked-out tokens
    chunks: tuple[tuple[int, int, int], ...]
    chunk_rows: int


def plan_chunks(mask: Tensor, chunk_size: int, row_break: int | None = None) -> ChunkPlan:
    """Plan chunks over the valid positions of ``mask``.

    ``row_break``: if the logits cannot be viewed as [R, V] (e.g. a sliced, non-contiguous
    [B, T, V]), runs must not cross a batch row, so they are also broken every ``row_break``
    flat positions.
    """
    flat = mask.reshape(-1)
    rows = flat.nonzero().squeeze(1)
    invalid = (~flat).nonzero().squeeze(1)
    rows_cpu = rows.cpu()
    n = rows_cpu.numel()
    chunks: list[tuple[int, int, int]] = []
    if n:
        brk = rows_cpu[1:] != rows_cpu[:-1] + 1
        if row_break is not None:
            brk |= rows_cpu[1:] % row_break == 0
        starts = [0] + (brk.nonzero().squeeze(1) + 1).tolist()
        ends = starts[1:] + [n]
        min_run = max(1, min(_MIN_VIEW_RUN, chunk_size))
        pending = None  # start (in rows) of pending short runs to gather
        for s, e in zip(starts, ends):
            if e - s >= min_run:
                if pending is not None:
                    _split(chunks, pending, s, chunk_size, None)
                    pending = None
                _split(chunks, s, e, chunk_size, rows_cpu)
            else:
                if pending is None:
                    pending = s
                full = (e - pending) // chunk_size * chunk_size
                if full:  # emit full gather chunks, keep the remainder pending
                    _split(chunks, pending, pending + full, chunk_size, None)
                    pending = pending + full if pending + full < e else None
        if pending is not None:
            _split(chunks, pending, n, chunk_size, None)
    return ChunkPlan(rows=rows, invalid=invalid, chunks=tuple(chunks), chunk_rows=min(chunk_size, max(n, 1)))


def _split(out: list, s: int, e: int, size: int, rows_cpu: Tensor | None) -> None:
    for a in range(s, e, size):
        b = min(a + size, e)
        out.append((a, b, int(rows_cpu[a]) if rows_cpu is not None else -1))


def _as_2d(x: Tensor) -> Tensor | None:
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:
        return None


def _chunk_source(x: Tensor, x2d: Tensor | None, plan: ChunkPlan, s: int, e: int, start: int) -> Tensor:
    if start >= 0:
        if x2d is not None:
            return x2d[start : start + e - s]
        t_len = x.shape[-2]
        b, t = divmod(start, t_len)
        return x[b, t : t + e - s]
    rows = plan.rows[s:e]
    if x2d is not None:
        return x2d.index_select(0, rows)
    t_len = x.shape[-2]
    return x[rows // t_len, rows % t_len]


def _tempered(src: Tensor, tau: float, buf: Tensor) -> Tensor:
    """``src / tau`` in the workspace dtype; returns ``src`` itself when nothing to do."""
    if tau != 1.0:
        torch.div(src, tau, out=buf)
        return buf
    if src.dtype != buf.dtype:
        buf.copy_(src)
        return buf
    return src


class _GatheredLogSoftmax(torch.autograd.Function):
    """outs[g][n, j] = log_softmax(x[row_n] / temps[g])[cols[g][n, j]], chunked, low-memory."""

    @staticmethod
    def forward(ctx, logits: Tensor, plan: ChunkPlan, temps: tuple[float, ...], *cols: Tensor):
        vocab = logits.shape[-1]
        wdtype = torch.promote_types(logits.dtype, torch.float32)
        x2d = _as_2d(logits)
        n = plan.rows.numel()
        outs = [torch.empty(n, c.shape[1], dtype=wdtype, device=logits.device) for c in cols]
        ws = torch.empty(plan.chunk_rows, vocab, dtype=wdtype, device=logits.device) if plan.chunks else None
        for s, e, start in plan.chunks:
            src = _chunk_source(logits, x2d, plan, s, e, start)
            buf = ws[: e - s]
            for out, tau, c in zip(outs, temps, cols):
                inp = _tempered(src, tau, buf)
                torch.ops.aten._log_softmax.out(inp, -1, False, out=buf)
                out[s:e] = buf.gather(1, c[s:e])
        ctx.save_for_backward(logits, *cols)
        ctx.plan, ctx.temps = plan, temps
        return tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: Tensor):
        logits, *cols = ctx.saved_tensors
        plan: ChunkPlan = ctx.plan
        vocab = logits.shape[-1]
        wdtype = torch.promote_types(logits.dtype, torch.float32)
        x2d = _as_2d(logits)
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        g2d = grad.view(-1, vocab)
        if plan.invalid.numel():
            g2d.index_fill_(0, plan.invalid, 0)
        live = list(zip(grads, ctx.temps, cols))  # grads are materialised (never None)
        direct = logits.dtype == wdtype
        ws = None
        for s, e, start in plan.chunks:
            src = _chunk_source(logits, x2d, plan, s, e, start)
            first = True
            for g, tau, c in live:
                if first and direct and start >= 0:
                    # First contribution goes straight into the gradient rows: no copy.
                    _logsoftmax_grad(g2d[start : start + e - s], src, tau, g[s:e], c[s:e])
                else:
                    if ws is None:
                        ws = torch.empty(plan.chunk_rows, vocab, dtype=wdtype, device=logits.device)
                    buf = ws[: e - s]
                    _logsoftmax_grad(buf, src, tau, g[s:e], c[s:e])
                    if start >= 0:
                        dst = g2d[start : start + e - s]
                        if first:
                            dst.copy_(buf)
                        else:
                            dst.add_(buf)
                    elif first:
                        g2d.index_copy_(0, plan.rows[s:e], buf.to(grad.dtype))
                    else:
                        g2d.index_add_(0, plan.rows[s:e], buf.to(grad.dtype))
                first = False
        return (grad, None, None) + (None,) * len(cols)


def _logsoftmax_grad(out: Tensor, src: Tensor, tau: float, g: Tensor, cols: Tensor) -> None:
    """out = d/dx sum_j g_j * log_softmax(x / tau)[cols_j] = (scatter(g) - softmax * sum g) / tau."""
    inp = _tempered(src, tau, out)
    torch.ops.aten._softmax.out(inp, -1, False, out=out)
    g = g.to(out.dtype)
    inv = 1.0 / tau
    out.mul_(g.sum(1, keepdim=True) * -inv)
    out.scatter_add_(1, cols, g * inv if tau != 1.0 else g)


def gather_student_logprobs(
    logits: Tensor, plan: ChunkPlan, groups: list[tuple[float, Tensor]]
) -> list[Tensor]:
    """For each (tau, cols [N, m]) group: full-vocab ``log_softmax(logits / tau)`` at ``cols``
    for the valid rows of ``plan`` ([N, m], float32 or wider).  One pass over V per group."""
    temps = tuple(float(t) for t, _ in groups)
    cols = [c for _, c in groups]
    return list(_GatheredLogSoftmax.apply(logits, plan, temps, *cols))


# --------------------------------------------------------------------------------------
# Bucket distributions


@dataclass
class Buckets:
    """Teacher/student log-distributions over the same K buckets, per valid token.

    ``logp``/``logq`` are [N, K], each normalised over its K buckets.  With ``tail_bucket``
    the last column is the "everything outside the teacher's top-k" bucket (``has_tail``).
    """

    logp: Tensor
    logq: Tensor
    has_tail: bool

    @property
    def num_topk(self) -> int:
        return self.logp.shape[1] - int(self.has_tail)


# Smallest student tail mass we trust: 1 - sum(q_topk) is computed in float32, where it
# cancels; below ~2^-24 it is round-off, so it is clamped there (gradient 0 through clamp).
_TAIL_LSE_MAX = -(2.0**-24)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def make_buckets(
    support: str, teacher_lp: Tensor, teacher_tail: Tensor, student_lp: Tensor, temperature: float
) -> Buckets:
    """Build the (k or k+1)-bucket teacher/student distributions for ``support``.

    teacher_lp [N, k] stored teacher log-probs (tau = 1), teacher_tail [N];
    student_lp [N, k] student full-vocab log-softmax at the teacher ids, already at ``tau``.
    The teacher is re-tempered over the support: p_i ∝ exp(logp_i / tau), the tail bucket
    being one pseudo-token exp(tail / tau).
    """
    lp = teacher_lp.to(student_lp.dtype)
    if support == "renormalize":
        if temperature != 1.0:
            lp = lp / temperature
        logp = torch.log_softmax(lp, dim=-1)
        logq = student_lp - student_lp.logsumexp(dim=-1, keepdim=True)
        return Buckets(logp, logq, has_tail=False)
    if support != "tail_bucket":
        check_support(support)
    tail = teacher_tail.to(student_lp.dtype)
    lp = torch.cat([lp, tail[:, None]], dim=1)
    if temperature != 1.0:
        lp = lp / temperature
    logp = torch.log_softmax(lp, dim=-1)
    q_tail = log1mexp(student_lp.logsumexp(dim=-1).clamp(max=_TAIL_LSE_MAX))
    # An exactly empty teacher tail (k = V) is an empty bucket on both sides: the student's
    # residual there is float round-off, and would make rkl-type terms +inf.
    q_tail = torch.where(torch.isneginf(tail), float("-inf"), q_tail)
    logq = torch.cat([student_lp, q_tail[:, None]], dim=1)
    return Buckets(logp, logq, has_tail=True)
