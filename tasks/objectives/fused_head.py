"""Every objective straight from the student's final hidden states and lm-head weight.

``Objective`` reads the student's full-vocabulary log-softmax at a handful of ids per token
(``support.py``), but it still needs the ``[tokens, V]`` logits and their gradient: at 8 x 1024
tokens and V = 152k that is 2.5 GB per copy in bf16.  Everything the loss depends on is
available block by block over the vocabulary (Cut-Cross-Entropy, Wijmans et al. 2024, does
this for CE; sparse top-k KD needs the same quantities):

- the log-partition ``lse = logsumexp_v(h . w_v / tau)``, by an online logsumexp over blocks;
- the student logits at the teacher's top-k ids and at the target id, picked out of the
  block that holds them;

and from those ``log q = z / tau - lse`` at the ids; the tail bucket (``1 - sum q_topk``) and
the renormalised support are functions of them (``make_buckets``), exactly as on the logits
path.  ``_FusedGatheredLogSoftmax`` computes that in ``[rows, block]`` tiles and, in backward,
recomputes each tile's logits and turns ``dL/dz = (scatter(g) - softmax * sum g) / tau`` into
``dL/dh`` and ``dL/dW`` at once, so neither pass ever holds ``[tokens, V]``.

Why not a library: Liger-Kernel's fused linear losses and Apple's cut-cross-entropy install
against the pinned torch, but they are Triton (GPU) kernels for CE and for dense-teacher
distillation; none runs on CPU or takes sparse top-k labels with a tail bucket.  This is
plain torch (blocked matmuls), so it runs anywhere torch does.

    head = FusedHead(build_objective("fkl+ce"))
    loss = head.loss(hidden[:, :-1], model.lm_head.weight, labels, mask, num_valid_tokens=n)
    head.last_parts  # {"fkl": ..., "ce": ...}

Exact against ``objective(hidden @ weight.T, ...)``: same loss, same gradients with respect to
``hidden`` and ``weight`` (tests/test_fused_head.py).  Plain linear heads only: no bias, no
logit soft-capping or scaling (``check_plain_head``).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from storage.errors import UserError

from .labels import SparseLabels
from .mixture import Objective

# Elements of one [rows, block] float32 logits tile (~16 MiB): large enough for an efficient
# matmul, small next to the [tokens, V] logits it replaces.
_TILE_ELEMENTS = 1 << 22
_MAX_TILE_ROWS = 4096
_MIN_BLOCK = 256


class FusedHeadError(UserError):
    """The student's output head is not a plain linear map, so the fused path would change the loss."""


def tile_shape(rows: int, vocab: int, tile_elements: int = _TILE_ELEMENTS) -> tuple[int, int]:
    """(rows per tile, vocabulary ids per block) for ``rows`` valid tokens."""
    r = max(1, min(rows, _MAX_TILE_ROWS, tile_elements // _MIN_BLOCK))
    return r, max(1, min(vocab, max(_MIN_BLOCK, tile_elements // r)))


class _FusedGatheredLogSoftmax(torch.autograd.Function):
    """outs[g][n, j] = log_softmax(hidden[n] @ weight.T / temps[g])[cols[g][n, j]], tiled, low-memory.

    hidden [N, H], weight [V, H] (same dtype); outputs in ``promote(dtype, float32)``.  Tile
    logits are computed in the input dtype (as the lm-head would) and read in float32.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, tile: tuple[int, int], temps: tuple[float, ...], *cols: Tensor):
        n, vocab = hidden.shape[0], weight.shape[0]
        wdtype = torch.promote_types(hidden.dtype, torch.float32)
        rows_per, block = tile
        outs = [torch.empty(n, c.shape[1], dtype=wdtype, device=hidden.device) for c in cols]
        lses = [torch.empty(n, dtype=wdtype, device=hidden.device) for _ in cols]
        for r0 in range(0, n, rows_per):
            r1 = min(r0 + rows_per, n)
            h = hidden[r0:r1]
            run_max = [torch.full((r1 - r0,), float("-inf"), dtype=wdtype, device=hidden.device) for _ in cols]
            run_sum = [torch.zeros(r1 - r0, dtype=wdtype, device=hidden.device) for _ in cols]
            picked = [torch.zeros(r1 - r0, c.shape[1], dtype=wdtype, device=hidden.device) for c in cols]
            for v0 in range(0, vocab, block):
                v1 = min(v0 + block, vocab)
                z = (h @ weight[v0:v1].T).to(wdtype)  # [r, b] raw logits of this tile
                for g, (tau, c) in enumerate(zip(temps, cols)):
                    zt = z / tau if tau != 1.0 else z
                    m_new = torch.maximum(run_max[g], zt.amax(1))
                    # rescale the running sum to the new max (exp(-inf - finite) = 0 on the first block)
                    run_sum[g] = run_sum[g] * torch.exp(run_max[g] - m_new) + torch.exp(zt - m_new[:, None]).sum(1)
                    run_max[g] = m_new
                    cc = c[r0:r1]
                    inside = (cc >= v0) & (cc < v1)
                    vals = zt.gather(1, (cc - v0).clamp_(0, v1 - v0 - 1))
                    picked[g] = torch.where(inside, vals, picked[g])
            for g in range(len(cols)):
                lse = run_max[g] + run_sum[g].log()
                lses[g][r0:r1] = lse
                outs[g][r0:r1] = picked[g] - lse[:, None]
        ctx.save_for_backward(hidden, weight, *lses, *cols)
        ctx.tile, ctx.temps, ctx.groups = tile, temps, len(cols)
        return tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: Tensor):
        hidden, weight, *rest = ctx.saved_tensors
        lses, cols = rest[: ctx.groups], rest[ctx.groups :]
        n, vocab = hidden.shape[0], weight.shape[0]
        wdtype = torch.promote_types(hidden.dtype, torch.float32)
        rows_per, block = ctx.tile
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros(hidden.shape, dtype=wdtype, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=wdtype, device=weight.device) if need_w else None
        live = [(g.to(wdtype), tau, c, lse) for g, tau, c, lse in zip(grads, ctx.temps, cols, lses)]
        for r0 in range(0, n, rows_per):
            r1 = min(r0 + rows_per, n)
            h = hidden[r0:r1]
            gsum = [g[r0:r1].sum(1, keepdim=True) for g, _, _, _ in live]
            for v0 in range(0, vocab, block):
                v1 = min(v0 + block, vocab)
                w = weight[v0:v1]
                z = (h @ w.T).to(wdtype)
                dz = None
                for (g, tau, c, lse), gs in zip(live, gsum):
                    inv = 1.0 / tau
                    # d/dz sum_j g_j log_softmax(z / tau)[c_j] = (scatter(g) - softmax(z / tau) * sum g) / tau
                    part = torch.exp((z * inv if tau != 1.0 else z) - lse[r0:r1, None]).mul_(gs * -inv)
                    cc, gg = c[r0:r1], g[r0:r1]
                    inside = (cc >= v0) & (cc < v1)
                    part.scatter_add_(1, (cc - v0).clamp(0, v1 - v0 - 1), torch.where(inside, gg * inv, 0.0))
                    dz = part if dz is None else dz.add_(part)
                dz_in = dz.to(hidden.dtype)  # the lm-head backward runs in the input dtype, as on the logits path
                if need_h:
                    grad_h[r0:r1] += (dz_in @ w).to(wdtype)
                if need_w:
                    grad_w[v0:v1] += (dz_in.T @ h).to(wdtype)
        return (
            None if grad_h is None else grad_h.to(hidden.dtype),
            None if grad_w is None else grad_w.to(weight.dtype),
            None,
            None,
        ) + (None,) * len(cols)


def fused_student_logprobs(
    hidden: Tensor, weight: Tensor, groups: list[tuple[float, Tensor]], tile: tuple[int, int] | None = None
) -> list[Tensor]:
    """For each (tau, cols [N, m]) group: ``log_softmax(hidden @ weight.T / tau)`` at ``cols``, [N, m].

    The hidden-state twin of ``support.gather_student_logprobs``: ``hidden`` [N, H] holds the valid
    rows only, ``weight`` [V, H] is the lm-head weight; ``tile`` (rows, vocabulary block) defaults to
    ``tile_shape``."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, H] and weight [V, H] expected, got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    temps = tuple(float(t) for t, _ in groups)
    cols = [c for _, c in groups]
    if tile is None:
        tile = tile_shape(max(hidden.shape[0], 1), weight.shape[0])
    elif len(tile) != 2 or min(tile) < 1:
        raise ValueError(f"tile must be (rows, vocabulary block) >= 1, got {tile!r}")
    return list(_FusedGatheredLogSoftmax.apply(hidden, weight, tile, temps, *cols))


class FusedHead:
    """``objective`` computed from hidden states and the lm-head weight, never from logits.

    ``loss(hidden [B, T, H], weight [V, H], labels, mask [B, T], num_valid_tokens)`` returns what
    ``objective(hidden @ weight.T, labels, mask, num_valid_tokens=...)`` returns (``hidden[b, t]``
    already the state that predicts response position t: the caller shifts, as with logits) and
    sets the same ``last_parts``.  Under autocast the tiles run in the autocast dtype, as the
    lm-head matmul would.
    """

    def __init__(self, objective: Objective, tile: tuple[int, int] | None = None) -> None:
        if not isinstance(objective, Objective):
            raise TypeError(f"FusedHead needs an Objective (build_objective(...)), got {type(objective).__name__}")
        self.objective = objective
        self.tile = tile  # (rows, vocabulary block); None: tile_shape() per call

    @property
    def last_parts(self) -> dict[str, float]:
        return self.objective.last_parts

    def __repr__(self) -> str:
        return f"FusedHead({self.objective!r})"

    def loss(
        self,
        hidden: Tensor,
        weight: Tensor,
        labels: SparseLabels,
        mask: Tensor,
        num_valid_tokens: int | float | Tensor | None = None,
    ) -> Tensor:
        if hidden.dim() < 2:
            raise ValueError(f"hidden must be [..., H], got shape {tuple(hidden.shape)}")
        lead = hidden.shape[:-1]
        if mask.shape != lead:
            raise ValueError(f"mask shape {tuple(mask.shape)} != hidden.shape[:-1] {tuple(lead)}")
        if labels.ids.shape[:-1] != lead:
            raise ValueError(f"labels shape {tuple(labels.ids.shape[:-1])} != hidden.shape[:-1] {tuple(lead)}")
        if mask.dtype != torch.bool:
            mask = mask.bool()
        rows = mask.reshape(-1).nonzero().squeeze(1)
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
        w = weight
        device_type = h.device.type
        if torch.is_autocast_enabled(device_type):
            dt = torch.get_autocast_dtype(device_type)
            h, w = h.to(dt), w.to(dt)
        elif h.dtype != w.dtype:
            w = w.to(h.dtype)
        groups = self.objective.student_groups(labels, rows)
        with torch.autocast(device_type, enabled=False):
            outs = fused_student_logprobs(h, w, groups, self.tile)
            return self.objective.loss_from_student_logprobs(outs, labels, rows, mask, num_valid_tokens)


def check_plain_head(model) -> Tensor:
    """The lm-head weight of an HF causal LM whose logits are exactly ``hidden @ weight.T``; otherwise a
    ``FusedHeadError`` naming what the fused path cannot reproduce (turn ``train.fused_head`` off)."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise FusedHeadError(
            f"train.fused_head: the student's output head is {type(head).__name__}, not a linear layer; set train.fused_head=false"
        )
    if head.bias is not None:
        raise FusedHeadError("train.fused_head: the student's lm-head has a bias, which the fused path does not apply; "
                             "set train.fused_head=false")
    cfg = getattr(model, "config", None)
    for name in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling"):
        value = getattr(cfg, name, None)
        if value not in (None, 1, 1.0):
            raise FusedHeadError(f"train.fused_head: the student's config sets {name}={value}, which the fused path does "
                                 "not apply; set train.fused_head=false")
    return head.weight
