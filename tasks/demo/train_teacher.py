"""Supervised fine-tuning of the demo teacher on the demo task (plain PyTorch, one process)."""

from __future__ import annotations

import math
import random
import time

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from tasks.demo.task import Example
from tasks.prompting import format_prompt


def _encode(tokenizer: PreTrainedTokenizerFast, ex: Example) -> tuple[list[int], list[int]]:
    prompt_ids = tokenizer(format_prompt(ex.prompt), add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(" " + ex.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids, response_ids


def cosine_schedule(steps: int):
    """Learning-rate factor: linear warmup over 5% of the steps, then cosine decay to 0."""
    warmup = max(1, steps // 20)
    return lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))


def train_sft(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    examples: list[Example],
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    log_fn=print,
) -> None:
    """Cross-entropy on response tokens only, AdamW with warmup and cosine decay."""
    fit_causal_lm(model, [_encode(tokenizer, ex) for ex in examples], tokenizer.pad_token_id, steps=steps,
                  batch_size=batch_size, lr=lr, seed=seed, log_fn=log_fn, what="demo teacher", loss_name="loss")


def fit_causal_lm(model: LlamaForCausalLM, pairs: list[tuple[list[int], list[int]]], pad: int, *, steps: int,
                  batch_size: int = 32, lr: float = 3e-3, seed: int = 0, log_fn=print, what: str = "demo model",
                  loss_name: str = "loss") -> float:
    """Train on (context, target) token pairs, loss on the target tokens only (AdamW, warmup + cosine decay); the
    demo's teacher and its base student share it. Returns the last loss."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_schedule(steps))
    model.train()
    start, loss = time.time(), torch.tensor(float("nan"))
    for step in range(steps):
        batch = rng.sample(pairs, batch_size)
        length = max(len(p) + len(r) for p, r in batch)
        input_ids = torch.full((batch_size, length), pad, dtype=torch.long)
        labels = torch.full((batch_size, length), -100, dtype=torch.long)
        attention = torch.zeros((batch_size, length), dtype=torch.long)
        for i, (p, r) in enumerate(batch):
            seq = p + r
            input_ids[i, : len(seq)] = torch.tensor(seq)
            labels[i, len(p) : len(seq)] = torch.tensor(r)
            attention[i, : len(seq)] = 1
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log_fn(f"{what}: step {step + 1}/{steps} {loss_name} {loss.item():.3f} ({time.time() - start:.0f}s)")
    model.eval()
    return float(loss.detach())
