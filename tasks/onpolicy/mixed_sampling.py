"""Teacher-mixed sampling (MiniLLM): teacher and student decode in lockstep, token by token.

At each step both models see the same prefix; the next token is drawn from
p~ = alpha * p_teacher + (1 - alpha) * q_student, and the step records log q(y_t),
log p(y_t) and log p~(y_t), from which the trainer forms the importance weight
w_t = q(y_t) / p~(y_t). vLLM cannot mix two models' distributions inside one
decoding step, so this runs both transformers models in one process (a Ray actor
in the stage), one prompt at a time with a KV cache each, seeded per prompt and
round: a rollout does not depend on which other prompts share the round.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


def mix_log_probs(teacher_lp: Tensor, student_lp: Tensor, alpha: float) -> Tensor:
    """log(alpha * p + (1 - alpha) * q) from log p and log q (float64 advised)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha == 0.0:
        return student_lp.clone()
    if alpha == 1.0:
        return teacher_lp.clone()
    return torch.logaddexp(teacher_lp + math.log(alpha), student_lp + math.log1p(-alpha))


@torch.no_grad()
def mixed_decode(student, teacher, prompt_ids: list[int], *, alpha: float, max_new_tokens: int, eos_id: int | None,
                 generator: torch.Generator, temperature: float = 1.0) -> dict[str, Any]:
    """One rollout by lockstep decoding. Returns response_ids and, per token, student_logprob (log q),
    teacher_logprob (log p) and sampling_logprob (log p~), all at temperature `temperature` and in float64."""
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    s_out = student(input_ids=ids, use_cache=True)
    t_out = teacher(input_ids=ids, use_cache=True)
    response: list[int] = []
    lq: list[float] = []
    lp: list[float] = []
    lmix: list[float] = []
    for _ in range(max_new_tokens):
        log_q = torch.log_softmax(s_out.logits[0, -1].double() / temperature, -1)
        log_p = torch.log_softmax(t_out.logits[0, -1].double() / temperature, -1)
        log_m = mix_log_probs(log_p, log_q, alpha)
        token = int(torch.multinomial(log_m.exp(), 1, generator=generator))
        response.append(token)
        lq.append(float(log_q[token]))
        lp.append(float(log_p[token]))
        lmix.append(float(log_m[token]))
        if eos_id is not None and token == eos_id:
            break
        step = torch.tensor([[token]], dtype=torch.long)
        s_out = student(input_ids=step, past_key_values=s_out.past_key_values, use_cache=True)
        t_out = teacher(input_ids=step, past_key_values=t_out.past_key_values, use_cache=True)
    return {"response_ids": response, "student_logprob": lq, "teacher_logprob": lp, "sampling_logprob": lmix}


class MixedSampler:
    """Teacher and student (transformers, float32) in one process; methods run inside a Ray actor."""

    def __init__(self, teacher_dir: str, threads: int = 1):
        from tasks.models import load_causal_lm, load_tokenizer

        torch.set_num_threads(threads)
        self.teacher = load_causal_lm(teacher_dir).eval()
        self.eos_id = load_tokenizer(teacher_dir).eos_token_id
        self.student = None
        self.student_dir = None

    def load(self, student_dir: str) -> None:
        from tasks.models import load_causal_lm

        self.student = load_causal_lm(student_dir).eval()
        self.student_dir = student_dir

    def sample(self, prompts: list[dict[str, Any]], seeds: list[int], *, alpha: float, max_new_tokens: int,
               temperature: float = 1.0) -> list[dict[str, Any]]:
        out = []
        for p, seed in zip(prompts, seeds):
            gen = torch.Generator().manual_seed(int(seed))
            out.append(mixed_decode(self.student, self.teacher, list(p["prompt_ids"]), alpha=alpha,
                                    max_new_tokens=max_new_tokens, eos_id=self.eos_id, generator=gen,
                                    temperature=temperature))
        return out
