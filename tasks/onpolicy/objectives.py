"""On-policy losses as pure functions over response tokens: MiniLLM, sampled-token reverse KL.

Two shapes:
- per-sequence tensors [B, T] (response position t of row b; `mask` marks real tokens, a
  response occupies positions 0..T_b-1) for rewards, returns and advantages, which run
  along a sequence and are computed once per round over all its rollouts (so they do not
  depend on how the round is cut into batches);
- flat tensors [N] over the valid tokens (row-major, the order of `mask.nonzero()`) for
  the per-token losses; callers sum them and divide by the global token count.

Notation: q = student (the policy being trained), p = teacher, p~ = the sampling
distribution (alpha*p + (1-alpha)*q with teacher-mixed sampling, q otherwise).
GKD needs nothing here: it is the registered `jsd` objective on rollout shards.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tasks.objectives.kl import rkl
from tasks.objectives.support import make_buckets


def token_rewards(teacher_lp: Tensor, student_lp: Tensor, mask: Tensor, scaling: float = 1.0,
                  clip: float | None = None) -> Tensor:
    """r_t = scaling * (log p(y_t) - log q(y_t)), clipped to +-clip; 0 at padding (MiniLLM reward.py)."""
    r = (teacher_lp - student_lp) * scaling
    if clip is not None:
        r = r.clamp(-clip, clip)
    return torch.where(mask, r, torch.zeros_like(r))


def returns(rewards: Tensor, mask: Tensor, *, gamma: float, length_norm: bool, next_step: bool) -> Tensor:
    """Discounted returns per position, optionally length-normalised.

    next_step=True (single-step decomposition): G_t = sum_{t' > t} gamma^(t'-t-1) r_t', the long-term part
    R_{t+1}; its normaliser is the number of its terms, T_b - t - 1 (1 where that is 0: G is 0 there).
    next_step=False: G_t = sum_{t' >= t} gamma^(t'-t) r_t', normalised by T_b - t.
    length_norm divides by that count (MiniLLM's R^Norm, losses.py `rw / lens`). Padding: 0.
    """
    rewards = torch.where(mask, rewards, torch.zeros_like(rewards))
    b, t_len = rewards.shape
    out = torch.zeros_like(rewards)
    running = torch.zeros(b, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(t_len)):
        if next_step:
            out[:, t] = running  # sum over t' > t
            running = rewards[:, t] + gamma * running
        else:
            running = rewards[:, t] + gamma * running
            out[:, t] = running
    if length_norm:
        remaining = mask.flip(1).cumsum(1).flip(1).to(rewards.dtype)  # T_b - t at valid t
        count = remaining - 1 if next_step else remaining
        out = out / count.clamp_min(1)
    return torch.where(mask, out, torch.zeros_like(out))


def whiten(values: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) over the valid entries (population variance; MiniLLM utils.whiten)."""
    valid = values[mask]
    mean = valid.mean()
    var = ((valid - mean) ** 2).mean()
    return torch.where(mask, (values - mean) * torch.rsqrt(var + eps), torch.zeros_like(values))


def minillm_advantages(teacher_lp: Tensor, student_lp: Tensor, mask: Tensor, *, gamma: float, reward_scaling: float,
                       reward_clip: float, length_norm: bool, single_step: bool, whiten_advantages: bool) -> Tensor:
    """MiniLLM's advantage per response token from the teacher's and the rollout policy's log-probs of the sampled tokens."""
    r = token_rewards(teacher_lp, student_lp, mask, reward_scaling, reward_clip)
    adv = returns(r, mask, gamma=gamma, length_norm=length_norm, next_step=single_step)
    return whiten(adv, mask) if whiten_advantages else adv


def sampled_token_advantages(teacher_lp: Tensor, student_lp: Tensor, mask: Tensor) -> Tensor:
    """On-policy distillation's advantage: log p(y_t) - log q(y_t), the per-token estimate of -KL(q||p); no discount."""
    return token_rewards(teacher_lp, student_lp, mask)


def importance_weight(student_old_lp: Tensor, sampling_lp: Tensor) -> Tensor:
    """w_t = q(y_t) / p~(y_t): corrects for sampling from the mixed distribution (1 when p~ = q)."""
    return torch.exp(student_old_lp - sampling_lp)


def clipped_policy_loss(student_lp: Tensor, sampling_lp: Tensor, advantages: Tensor, clip_eps: float) -> Tensor:
    """Per token max(-A rho, -A clip(rho, 1-eps, 1+eps)) with rho = q_theta(y_t) / p~(y_t).

    rho is the PPO ratio q_theta/q_old times the importance weight q_old/p~ (MiniLLM losses.py `_pg_loss`); with
    p~ = q_old it is the plain PPO ratio. Only `student_lp` carries a gradient.
    """
    ratio = torch.exp(student_lp - sampling_lp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    return torch.maximum(unclipped, clipped)


def single_step_reverse_kl(student_topk_lp: Tensor, teacher_topk_lp: Tensor, teacher_tail: Tensor) -> Tensor:
    """Per token KL(q(.|prefix) || p(.|prefix)) on the stored support: the teacher's top-k ids plus one bucket for the
    rest (tasks.objectives.support, tail_bucket). Exact for that coarsening; equals the full-vocabulary reverse KL when
    the top-k holds all the mass. `student_topk_lp` [N, k]: full-vocabulary student log-probs at the teacher's ids."""
    buckets = make_buckets("tail_bucket", teacher_topk_lp, teacher_tail, student_topk_lp, 1.0)
    return rkl(buckets)


def minillm_token_losses(student_lp: Tensor, student_topk_lp: Tensor, sampling_lp: Tensor, advantages: Tensor,
                         teacher_topk_lp: Tensor, teacher_tail: Tensor, *, clip_eps: float,
                         single_step: bool) -> dict[str, Tensor]:
    """MiniLLM's per-token losses over N valid tokens: `pg` (clipped long-term policy gradient) and, with the
    single-step decomposition, `single_step` (exact per-step reverse KL); the step loss is their sum / token count."""
    parts = {"pg": clipped_policy_loss(student_lp, sampling_lp, advantages, clip_eps)}
    if single_step:
        parts["single_step"] = single_step_reverse_kl(student_topk_lp, teacher_topk_lp, teacher_tail)
    return parts


def sampled_token_losses(student_lp: Tensor, student_old_lp: Tensor, advantages: Tensor) -> dict[str, Tensor]:
    """Sampled-token on-policy distillation: -A_t * q_theta(y_t)/q_old(y_t) (importance-sampling policy gradient;
    gradient -A_t grad log q at the rollout policy)."""
    return {"pg": -advantages * torch.exp(student_lp - student_old_lp)}
