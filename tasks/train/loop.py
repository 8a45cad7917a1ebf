"""The per-worker training loop: data, forward, loss, backward, step, log, checkpoint.

Kept in one readable function (nanoGPT style). The loss is a sum over valid
tokens divided by the GLOBAL count of valid tokens in the step (all ranks),
so the gradient does not depend on how tokens fall across workers.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any

import torch


def _schedule(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def worker_shards(num_shards: int, rank: int, world: int) -> list[int] | None:
    """Disjoint shard indices for a rank; None means 'all shards, split by row' (fewer shards than ranks)."""
    if num_shards >= world:
        return list(range(rank, num_shards, world))
    return None


def load_worker_records(manifest: str, rank: int, world: int, tokenizer_hash: str, vocab_size: int) -> list[dict[str, Any]]:
    from storage import soft_labels

    num_shards = len(soft_labels.load_manifest(manifest)["shards"])
    shards = worker_shards(num_shards, rank, world)
    records = list(soft_labels.read(manifest, expected_tokenizer_hash=tokenizer_hash, vocab_size=vocab_size, shards=shards))
    if shards is None:
        records = records[rank::world]
    return records


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import torch.distributed as dist

    from tasks.models import load_causal_lm, load_tokenizer, tokenizer_hash
    from tasks.objectives import SparseLabels, build_objective
    from tasks.train.batches import collate

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(config["threads_per_worker"])))
    torch.manual_seed(config["seed"])
    device = ray.train.torch.get_device()

    tokenizer = load_tokenizer(config["student_dir"])
    records = load_worker_records(config["manifest"], rank, world, tokenizer_hash(tokenizer), len(tokenizer))
    if not records:
        raise ValueError(f"worker {rank}: no soft-label rows assigned; use fewer workers than rows")
    model = load_causal_lm(config["student_dir"]).to(device)
    model = ray.train.torch.prepare_model(model) if world > 1 else model
    core = model.module if hasattr(model, "module") else model
    objective = build_objective(config["objective"], support=config["support"], temperature=config["temperature"], **config["objective_params"])
    opt = torch.optim.AdamW(model.parameters(), lr=config["learning_rate"], weight_decay=config["weight_decay"], betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, config["warmup_steps"], config["steps"]))
    per_worker = config["batch_size"] // world
    rng = random.Random(config["seed"] * 1000 + rank)
    k = int(records[0]["topk_ids"].shape[1])
    log_path = Path(config["out_dir"]) / "train_log.jsonl"
    model.train()
    start, tokens_seen = time.time(), 0
    for step in range(config["steps"]):
        batch = collate(rng.sample(records, min(per_worker, len(records))), tokenizer.pad_token_id, k)
        batch = {name: t.to(device) for name, t in batch.items()}
        local_tokens = batch["mask"].sum()
        global_tokens = local_tokens.clone().float()
        if world > 1:
            dist.all_reduce(global_tokens)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = SparseLabels(ids=batch["ids"], logprobs=batch["logprobs"], tail_logmass=batch["tail_logmass"], target_ids=batch["target_ids"])
        # DDP averages gradients over ranks, so scale by world to get sum / global count.
        loss = objective(logits, labels, batch["mask"], num_valid_tokens=global_tokens / world)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config["grad_clip"])
        opt.step()
        sched.step()
        tokens_seen += int(global_tokens.item())
        if step % config["log_every"] == 0 or step == config["steps"] - 1:
            names = list(objective.last_parts)
            # Each rank holds world * local_sum / global; the mean over ranks is the global loss.
            stats = torch.tensor([loss.item(), *objective.last_parts.values()], dtype=torch.float64)
            if world > 1:
                dist.all_reduce(stats)
            stats = (stats / world).tolist()
        if rank == 0 and (step % config["log_every"] == 0 or step == config["steps"] - 1):
            elapsed = time.time() - start
            entry = {"step": step + 1, "loss": stats[0], **{f"loss_{n}": v for n, v in zip(names, stats[1:])},
                     "lr": sched.get_last_lr()[0], "grad_norm": float(grad_norm), "tokens_per_s": tokens_seen / max(elapsed, 1e-9),
                     "elapsed_s": round(elapsed, 2)}
            with log_path.open("a") as f:
                f.write(json.dumps(entry) + "\n")
            print(f"train: step {step + 1}/{config['steps']} loss {entry['loss']:.4f} {entry['tokens_per_s']:.0f} tok/s", flush=True)
    if rank == 0:
        from tasks.models import save_pretrained_atomic

        save_pretrained_atomic(core, tokenizer, Path(config["out_dir"]) / "student")
