"""The student update of one round: the policy-gradient methods' step, GKD's step, and the round's metrics.

Every step's loss is a sum over valid tokens divided by the step's token count
(one micro-batch per step, one process: the step is the global batch). Batches
are a pure function of (seed, round, epoch), so a round redone after a crash
makes the same update. Each batch's policy version is checked against the round
before any gradient is computed (StaleRolloutError).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tasks.objectives import SparseLabels, build_objective
from tasks.objectives.support import _as_2d, auto_chunk_size, gather_student_logprobs, plan_chunks
from tasks.onpolicy.config import OnPolicyConfig
from tasks.onpolicy.objectives import (
    minillm_advantages,
    minillm_token_losses,
    sampled_token_advantages,
    sampled_token_losses,
    single_step_reverse_kl,
)
from tasks.onpolicy.rollout import StaleRolloutError
from tasks.train.batches import collate
from tasks.train.runtime import LocalRuntime

PER_TOKEN = ("student_logprob", "sampling_logprob", "token_logprob", "advantage")


def check_policy_version(batch: list[dict[str, Any]], version: int, where: str) -> None:
    """Refuse a batch holding any rollout not sampled by policy `version` (checked per batch, never assumed)."""
    for r in batch:
        if r.get("response_source") != "student_rollout":
            continue
        found = r.get("policy_version")
        if found != version:
            raise StaleRolloutError(
                f"{where}: sample {r.get('sample_id')} (example {r.get('example_id')}) was sampled by policy version "
                f"{found}, but round {version} trains policy version {version}; stale rollouts are never trained on: "
                f"delete {where} and rerun (the round resamples)")


def padded(records: list[dict[str, Any]], field: str, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] response-aligned values of a per-token field, and the mask of real tokens."""
    t_max = max(len(r["response_ids"]) for r in records)
    out = torch.zeros(len(records), t_max, dtype=dtype)
    mask = torch.zeros(len(records), t_max, dtype=torch.bool)
    for i, r in enumerate(records):
        v = torch.as_tensor(np.asarray(r[field], dtype=np.float64), dtype=dtype)
        out[i, : len(v)] = v
        mask[i, : len(v)] = True
    return out, mask


def attach_advantages(cfg: OnPolicyConfig, records: list[dict[str, Any]]) -> None:
    """Per-token advantages of the round, computed once over all its rollouts (whitening included)."""
    teacher, mask = padded(records, "token_logprob")
    student, _ = padded(records, "student_logprob")
    if cfg.method == "minillm":
        adv = minillm_advantages(teacher, student, mask, gamma=cfg.gamma, reward_scaling=cfg.reward_scaling,
                                 reward_clip=cfg.reward_clip, length_norm=cfg.length_norm, single_step=cfg.single_step,
                                 whiten_advantages=cfg.whiten)
    else:
        adv = sampled_token_advantages(teacher, student, mask)
    for i, r in enumerate(records):
        r["advantage"] = adv[i, : len(r["response_ids"])].numpy()


def collate_rollouts(records: list[dict[str, Any]], pad_id: int, k: int) -> dict[str, torch.Tensor]:
    """`tasks.train.batches.collate` plus the rollouts' per-token fields at the same (shifted) positions."""
    batch = collate(records, pad_id, k)
    shape = batch["mask"].shape
    for field in PER_TOKEN:
        if field not in records[0]:
            continue
        values = torch.zeros(shape, dtype=torch.float64)
        for i, r in enumerate(records):
            p, t = len(r["prompt_ids"]), len(r["response_ids"])
            values[i, p - 1 : p - 1 + t] = torch.as_tensor(np.asarray(r[field], dtype=np.float64))
        batch[field] = values
    return batch


def student_token_logprobs(model, batch: dict[str, torch.Tensor], k: int):
    """Full-vocabulary student log-probs at the teacher's top-k ids [N, k] and at the sampled token [N] for the
    N valid response positions (row-major), chunked over the vocabulary; and those rows."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    mask = batch["mask"]
    row_break = logits.shape[1] if _as_2d(logits) is None else None
    plan = plan_chunks(mask, auto_chunk_size(logits.shape[-1]), row_break)
    rows = plan.rows
    ids = batch["ids"].reshape(-1, k).index_select(0, rows)
    target = batch["target_ids"].reshape(-1).index_select(0, rows)
    (outs,) = gather_student_logprobs(logits, plan, [(1.0, torch.cat([ids, target[:, None]], dim=1))])
    return outs[:, :k], outs[:, k], rows


def flat(batch: dict[str, torch.Tensor], field: str, rows: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return batch[field].reshape(-1).index_select(0, rows).to(dtype)


@torch.no_grad()
def round_metrics(model, records: list[dict[str, Any]], pad_id: int, k: int, batch_size: int) -> dict[str, float]:
    """Before the update, at policy r: reverse KL to the teacher on the stored support (per token), the
    length-normalised reward mean_t(log p - log q) per rollout, mean response length, importance weights, and how
    far the rollout's recorded log-probs are from this process's forward (sampler/trainer mismatch)."""
    model.eval()
    rkl_sum, tokens, mismatch = 0.0, 0, 0.0
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        batch = collate_rollouts(chunk, pad_id, k)
        s_topk, s_tok, rows = student_token_logprobs(model, batch, k)
        per_token = single_step_reverse_kl(s_topk, batch["logprobs"].reshape(-1, k).index_select(0, rows),
                                           batch["tail_logmass"].reshape(-1).index_select(0, rows))
        rkl_sum += float(per_token.double().sum())
        tokens += int(rows.numel())
        mismatch = max(mismatch, float((s_tok.double() - flat(batch, "student_logprob", rows, torch.float64)).abs().max()))
    model.train()
    rewards = [float(np.mean(np.asarray(r["token_logprob"], np.float64) - np.asarray(r["student_logprob"], np.float64)))
               for r in records]
    weights = np.concatenate([np.exp(np.asarray(r["student_logprob"], np.float64) - np.asarray(r["sampling_logprob"], np.float64))
                              for r in records])
    return {"reward": float(np.mean(rewards)), "reverse_kl": rkl_sum / max(tokens, 1),
            "mean_response_length": float(np.mean([len(r["response_ids"]) for r in records])), "tokens": tokens,
            "importance_weight_mean": float(weights.mean()), "importance_weight_min": float(weights.min()),
            "logprob_mismatch_max": mismatch}


def policy_gradient_step(cfg: OnPolicyConfig, model, batch: dict[str, torch.Tensor], k: int,
                         ref_batch: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one MiniLLM / onpolicy_rkl step: (sum of per-token losses) / tokens, plus lm_coef * the mean
    cross-entropy of the reference batch."""
    s_topk, s_tok, rows = student_token_logprobs(model, batch, k)
    n = max(int(rows.numel()), 1)
    sampling = flat(batch, "sampling_logprob", rows)
    advantage = flat(batch, "advantage", rows)
    if cfg.method == "minillm":
        parts = minillm_token_losses(
            s_tok, s_topk, sampling, advantage, batch["logprobs"].reshape(-1, k).index_select(0, rows),
            batch["tail_logmass"].reshape(-1).index_select(0, rows), clip_eps=cfg.clip_eps, single_step=cfg.single_step)
    else:
        parts = sampled_token_losses(s_tok, flat(batch, "student_logprob", rows), advantage)
    sums = {name: v.sum() / n for name, v in parts.items()}
    loss = sum(sums.values())
    if ref_batch is not None:
        ce = build_objective("ce")
        logits = model(input_ids=ref_batch["input_ids"], attention_mask=ref_batch["attention_mask"]).logits[:, :-1]
        labels = SparseLabels(ids=ref_batch["ids"], logprobs=ref_batch["logprobs"], tail_logmass=ref_batch["tail_logmass"],
                              target_ids=ref_batch["target_ids"])
        sums["lm"] = ce(logits, labels, ref_batch["mask"])
        loss = loss + cfg.lm_coef * sums["lm"]
    return loss, {name: float(v.detach()) for name, v in sums.items()}


def run_update(cfg: OnPolicyConfig, model, optimizer, scheduler, records: list[dict[str, Any]], round_index: int, *,
               pad_id: int, k: int, where: str, references: list[dict[str, Any]] | None = None,
               stored_labels: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """cfg.inner_epochs passes over the round's rollouts, cfg.batch_size per optimizer step. Returns step stats."""
    from tasks.train.loop import accumulate_gradients

    rng = np.random.default_rng([cfg.seed, round_index, 11])
    jsd = build_objective("jsd", beta=cfg.gkd_beta) if cfg.method == "gkd" else None
    use_lm = cfg.method == "minillm" and cfg.lm_coef > 0 and references
    runtime = LocalRuntime()
    losses: list[float] = []
    part_sums: dict[str, float] = {}
    on_policy = steps = 0
    model.train()
    for epoch in range(cfg.inner_epochs):
        order = np.random.default_rng([cfg.seed, round_index, epoch]).permutation(len(records))
        for start in range(0, len(records), cfg.batch_size):
            batch_records = [records[i] for i in order[start : start + cfg.batch_size]]
            optimizer.zero_grad(set_to_none=True)
            if cfg.method == "gkd":
                take_rollouts = stored_labels is None or rng.random() < cfg.gkd_lambda
                if not take_rollouts:
                    picks = rng.choice(len(stored_labels), size=min(cfg.batch_size, len(stored_labels)), replace=False)
                    batch_records = [stored_labels[i] for i in sorted(picks)]
                check_policy_version(batch_records, round_index, where)
                on_policy += int(take_rollouts)
                mb_k = int(np.shape(batch_records[0]["topk_ids"])[-1])
                loss, parts = accumulate_gradients(model, jsd, [collate(batch_records, pad_id, mb_k)], runtime)
            else:
                check_policy_version(batch_records, round_index, where)
                ref_batch = None
                if use_lm:
                    picks = rng.choice(len(references), size=min(cfg.lm_batch_size, len(references)), replace=False)
                    ref_batch = collate([references[i] for i in sorted(picks)], pad_id, 1)
                loss_t, parts = policy_gradient_step(cfg, model, collate_rollouts(batch_records, pad_id, k), k, ref_batch)
                loss_t.backward()
                loss = float(loss_t.detach())
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            steps += 1
            losses.append(loss)
            for name, value in parts.items():
                part_sums[name] = part_sums.get(name, 0.0) + value
    return {"steps": steps, "loss": float(np.mean(losses)) if losses else None,
            **{f"loss_{name}": value / max(steps, 1) for name, value in part_sums.items()},
            **({"on_policy_batches": on_policy} if cfg.method == "gkd" else {})}
