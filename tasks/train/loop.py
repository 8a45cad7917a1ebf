"""The per-worker training loop: data, forward, loss, backward, step, log, checkpoint.

Kept in one readable function (nanoGPT style). Two rules make it exact:
- the loss is a sum over valid tokens divided by the GLOBAL count of valid
  tokens in the optimizer step (all ranks, all micro-batches), so gradients do
  not depend on how tokens fall across workers or accumulation steps;
- the batch of a step is a pure function of (seed, step, rank) and the
  manifest (tasks.train.stream), so a run resumed from a checkpoint sees the
  same data as an uninterrupted one; the checkpoint records that data position
  and a resume checks it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from tasks.train.loop_config import LoopConfig
from tasks.train.runtime import Runtime


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def open_stream(config: LoopConfig, rank: int, world: int, tokenizer_hash: str, vocab_size: int):
    """This worker's ShardStream over the manifest; labels are checked against the student's tokenizer up front."""
    from storage import soft_labels
    from tasks.train.stream import ShardStream

    manifest = soft_labels.load_manifest(config.manifest)
    found = manifest["metadata"].get("tokenizer_hash")
    if found is not None and found != tokenizer_hash:
        raise soft_labels.SoftLabelError(
            f"{config.manifest}: field tokenizer_hash {found} does not match the student's tokenizer {tokenizer_hash}; "
            "teacher and student must share a tokenizer"
        )

    # Shards flagged `teacher_labels: false` hold reference rows without teacher labels (lazy labelling,
    # storage/FORMAT.md): their rows train with cross-entropy only (objectives.weighting.TeacherMasked).
    no_teacher = {i for i, s in enumerate(manifest["shards"]) if s.get("teacher_labels") is False}
    pair = paired_manifest(config, manifest)

    def read_shard(index: int) -> list[dict[str, Any]]:
        rows = list(soft_labels.read(config.manifest, expected_tokenizer_hash=tokenizer_hash, vocab_size=vocab_size,
                                     shards=[index]))
        if no_teacher:
            for r in rows:
                r["teacher_labels"] = index not in no_teacher
        if pair is not None:
            from tasks.teacher.ensemble import attach_pair

            small = soft_labels.read(pair, expected_tokenizer_hash=tokenizer_hash, vocab_size=vocab_size, shards=[index])
            attach_pair(rows, small, where=f"{config.manifest} shard {index} / {pair}")
        return rows

    stream = ShardStream([s["rows"] for s in manifest["shards"]], read_shard, rank=rank, world=world,
                         batch_size=config.train.batch_size // world, seed=config.train.seed,
                         bucket_by_length=config.train.length_bucketing)
    return stream, int(manifest["metadata"]["k"])


def paired_manifest(config: LoopConfig, manifest: dict[str, Any]) -> str | None:
    """train.dynamic_teacher: the small teacher's label set stored with the main one (metadata `pair`), else None."""
    from storage import soft_labels

    if config.train.dynamic_teacher == "off":
        return None
    pair = manifest["metadata"].get("pair")
    if not pair:
        raise soft_labels.SoftLabelError(
            f"{config.manifest}: train.dynamic_teacher={config.train.dynamic_teacher} needs a paired label set (metadata "
            "field pair, written by the multi-teacher stage with one `teachers:` entry); set train.dynamic_teacher=off")
    path = f"{manifest['_dir'].rstrip('/')}/{pair['manifest']}"
    small = soft_labels.load_manifest(path)
    if [s["rows"] for s in small["shards"]] != [s["rows"] for s in manifest["shards"]]:
        raise soft_labels.SoftLabelError(f"{path}: its shards do not hold the same rows as {config.manifest}; "
                                         "rerun the multi-teacher stage")
    return path


def build_loss(cfg, manifest_has_no_teacher_rows: bool):
    """The configured objective, wrapped as the settings ask: uncertainty weights (train.uncertainty_weighting),
    two teachers (train.dynamic_teacher), cross-entropy on rows without teacher labels (lazy labelling)."""
    from tasks.objectives import build_objective
    from tasks.objectives.weighting import DynamicTeacher, TeacherMasked, UncertaintyWeighted

    objective = build_objective(cfg.objective, support=cfg.support, temperature=cfg.temperature, **cfg.objective_params)
    if (cfg.dynamic_teacher != "off" or manifest_has_no_teacher_rows) and cfg.fused_head:
        raise ValueError("train.fused_head does not support train.dynamic_teacher or label sets with rows without "
                         "teacher labels; set train.fused_head=false")
    if cfg.uncertainty_weighting:
        objective = UncertaintyWeighted(objective)
    if cfg.dynamic_teacher != "off":
        return DynamicTeacher(objective, cfg.dynamic_teacher)
    return TeacherMasked(objective) if manifest_has_no_teacher_rows else objective


# logits_to_keep for the fused head: keep none (the loss reads hidden states and the lm-head weight instead)
_NO_LOGITS = torch.empty(0, dtype=torch.long)


def student_loss(model, objective, mb: dict[str, torch.Tensor], num_valid_tokens, fused=None) -> torch.Tensor:
    """The student's forward and the objective on one micro-batch (padded or packed: batches.model_inputs).
    With ``fused`` (a FusedHead) no logits are built: the loss is computed from the final hidden states
    and the lm-head weight in vocabulary blocks; same value and gradients."""
    from tasks.objectives import SparseLabels
    from tasks.objectives.weighting import PER_EXAMPLE_LOSSES
    from tasks.train.batches import model_inputs

    labels = SparseLabels(ids=mb["ids"], logprobs=mb["logprobs"], tail_logmass=mb["tail_logmass"], target_ids=mb["target_ids"])
    if fused is None:
        logits = model(**model_inputs(mb)).logits[:, :-1]
        # per-example losses read a packed batch's examples from its segments (rows of a padded one)
        extra = {"segments": mb["segments"]} if "segments" in mb and isinstance(objective, PER_EXAMPLE_LOSSES) else {}
        if "small_ids" in mb:  # train.dynamic_teacher: the small teacher's labels of the same tokens (DynamicTeacher)
            small = SparseLabels(ids=mb["small_ids"], logprobs=mb["small_logprobs"], tail_logmass=mb["small_tail_logmass"],
                                 target_ids=mb["target_ids"])
            return objective(logits, small, labels, mb["mask"], num_valid_tokens=num_valid_tokens, **extra)
        if "kd_rows" in mb:  # rows without teacher labels: cross-entropy only (TeacherMasked)
            extra["kd_rows"] = mb["kd_rows"]
        return objective(logits, labels, mb["mask"], num_valid_tokens=num_valid_tokens, **extra)
    out = model(**model_inputs(mb), output_hidden_states=True, logits_to_keep=_NO_LOGITS.to(mb["input_ids"].device))
    core = model.module if hasattr(model, "module") else model  # DDP
    weight = core.get_output_embeddings().weight
    return fused.loss(out.hidden_states[-1][:, :-1], weight, labels, mb["mask"], num_valid_tokens=num_valid_tokens)


def stream_has_no_teacher_rows(config: LoopConfig) -> bool:
    from storage import soft_labels

    return any(s.get("teacher_labels") is False for s in soft_labels.load_manifest(config.manifest)["shards"])


def with_label_extras(mb: dict[str, torch.Tensor], records: list[dict[str, Any]], pad_id: int, k: int,
                      collate=None) -> dict[str, torch.Tensor]:
    """Add what the lazy-labelling and dynamic-teacher losses read: kd_rows [len(records)] (records with teacher
    labels) and the small teacher's labels (small_ids, small_logprobs, small_tail_logmass) in the layout of
    ``collate`` (the one that made ``mb``: padded by default, or packed, which places the same tokens alike)."""
    from tasks.train.batches import collate as padded

    if records and "teacher_labels" in records[0]:
        mb["kd_rows"] = torch.tensor([bool(r["teacher_labels"]) for r in records])
    if records and "small" in records[0]:
        small = (collate or padded)([{**r, **r["small"]} for r in records], pad_id, k)
        mb.update(small_ids=small["ids"], small_logprobs=small["logprobs"], small_tail_logmass=small["tail_logmass"])
    return mb


def accumulate_gradients(model, objective, micro_batches: list[dict[str, torch.Tensor]], runtime: Runtime,
                         fused=None, mixed=None) -> tuple[float, dict[str, float]]:
    """Forward/backward over micro-batches; returns the step's global loss and its parts.
    ``fused``: a FusedHead over ``objective`` (train.fused_head), or None for the logits path.
    ``mixed``: MixKD (train.mixkd): ``objective`` is a tasks.augment.training.MixKDStep and mixed[i] the
    mixed pairs of micro-batch i, normalised by their own global token count."""

    local_tokens = sum(mb["mask"].sum() for mb in micro_batches).float()
    global_tokens = runtime.all_reduce_sum(local_tokens)
    # DDP averages gradients over ranks, so each rank scales by world to get sum / global count.
    per_rank_count = global_tokens / runtime.world
    if mixed is not None:
        mix_count = runtime.all_reduce_sum(objective.tokens(mixed)) / runtime.world
    loss_total, parts_total = 0.0, {}
    for i, mb in enumerate(micro_batches):
        sync = i == len(micro_batches) - 1
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter only on the last micro-batch
            model.set_requires_gradient_sync(sync)
        skip_sync = not sync and hasattr(model, "no_sync")  # DDP
        with model.no_sync() if skip_sync else contextlib.nullcontext():
            if mixed is None:
                loss = student_loss(model, objective, mb, per_rank_count, fused)
            else:
                loss = objective(model, mb, mixed[i], per_rank_count, mix_count)
            loss.backward()
        loss_total += float(loss.detach())
        for name, value in objective.last_parts.items():
            parts_total[name] = parts_total.get(name, 0.0) + float(value)
    # Each rank holds world * local_sum / global; the mean over ranks is the global loss.
    stats = runtime.all_reduce_sum(torch.tensor([loss_total, *parts_total.values()], dtype=torch.float64)) / runtime.world
    return float(stats[0]), dict(zip(parts_total, stats[1:].tolist()))


def train(config: LoopConfig, runtime: Runtime) -> None:
    from tasks.models import load_causal_lm, load_tokenizer, tokenizer_hash
    from tasks.objectives.fused_head import FusedHead, check_plain_head
    from tasks.train.batches import make_collate
    from tasks.train.checkpoint import load_checkpoint, save_checkpoint
    from tasks.train.fsdp import gather_full_state, is_sharded
    from tasks.train.packing import padding_waste
    from tasks.train.stream import Position

    rank, world, device = runtime.rank, runtime.world, runtime.device
    cfg = config.train
    torch.set_num_threads(config.threads_per_worker)
    torch.manual_seed(cfg.seed)

    # Data: this worker's disjoint share of the shards, streamed one shard at a time.
    tokenizer = load_tokenizer(config.student_dir)
    stream, k = open_stream(config, rank, world, tokenizer_hash(tokenizer), len(tokenizer))

    # Model, objective, optimizer, schedule.
    model = load_causal_lm(config.student_dir).to(device)
    packing = cfg.packing != "off" and packing_is_safe(model, cfg.packing, rank)  # on the device it trains on
    if cfg.lora is not None:
        from tasks.train.lora import apply_lora, trainable_fraction

        model = apply_lora(model, cfg.lora.model_dump())
        if rank == 0:
            print(f"train: LoRA rank {cfg.lora.rank}, {trainable_fraction(model):.2%} of the weights trainable", flush=True)
    model = runtime.prepare_model(model.to(device), strategy=cfg.strategy)
    sharded = is_sharded(model)
    objective = build_loss(cfg, stream_has_no_teacher_rows(config))
    if cfg.fused_head:
        check_plain_head(model.module if hasattr(model, "module") else model)  # refuses heads the fused path would change
    fused = FusedHead(objective) if cfg.fused_head else None
    mixkd = None
    if cfg.mixkd is not None:  # MixKD: the plan's mixed pairs of each step and the three-term loss (tasks/augment/training.py)
        from tasks.augment.training import MixKDStep

        mixkd = MixKDStep.open(cfg, config.mixkd, rank=rank, world=world, pad_id=tokenizer.pad_token_id,
                               tokenizer_hash=tokenizer_hash(tokenizer), vocab_size=len(tokenizer))
    collate = make_collate(packing, cfg.packing_max_tokens)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps))

    # Resume from the latest checkpoint, if the run has one.
    start_step = 0
    resume_dir = runtime.latest_checkpoint()
    if resume_dir is not None:
        state = load_checkpoint(resume_dir, model=model, optimizer=opt, scheduler=sched)
        start_step = state["step"]
        saved = state.get("data_position")
        if rank == 0 and saved is not None and Position(**saved) != stream.position(start_step):
            raise ValueError(
                f"{resume_dir}: the checkpoint's data position {saved} is not where step {start_step} falls in "
                f"{config.manifest} ({stream.position(start_step).to_dict()}); the labels or batch settings changed - "
                "use a fresh run name"
            )
        if rank == 0:
            print(f"train: resumed from checkpoint at step {start_step} (data position {stream.position(start_step).to_dict()})",
                  flush=True)

    accum = cfg.grad_accum_steps
    batches = stream.iter_from(start_step)
    log_path = Path(config.out_dir) / "train_log.jsonl"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    model.train()
    start, tokens_seen = time.time(), 0
    for step in range(start_step, cfg.steps):
        if config.faults.kill_now(step, rank):  # tests only (FaultPlan): SIGKILL this worker
            os.kill(os.getpid(), signal.SIGKILL)
        if config.faults.step_pause_s:
            time.sleep(config.faults.step_pause_s)  # tests only: widen the window for a kill
        _, batch = next(batches)
        micro = [with_label_extras(collate(batch[i::accum], tokenizer.pad_token_id, k), batch[i::accum], tokenizer.pad_token_id, k,
                                   collate) for i in range(min(accum, len(batch)))]
        micro = [{name: t.to(device) for name, t in mb.items()} for mb in micro]
        opt.zero_grad(set_to_none=True)
        mixed = mixkd.micro_batches(step, len(micro), device) if mixkd else None
        loss, parts = accumulate_gradients(model, mixkd or objective, micro, runtime, fused, mixed)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        tokens_seen += int(runtime.all_reduce_sum(sum(mb["mask"].sum() for mb in micro).float()))

        last = step == cfg.steps - 1
        if rank == 0 and (step % config.log_every == 0 or last):
            elapsed = time.time() - start
            done = step + 1 - start_step
            entry = {"step": step + 1, "loss": loss, **{f"loss_{n}": v for n, v in parts.items()}, "lr": sched.get_last_lr()[0],
                     "grad_norm": float(grad_norm), "padding_waste": round(padding_waste(micro), 4), "packed": packing, "tokens_per_s": tokens_seen / max(elapsed, 1e-9), "elapsed_s": round(elapsed, 2),
                     "eta_s": round(elapsed / done * (cfg.steps - step - 1), 1)}
            with log_path.open("a") as f:
                f.write(json.dumps(entry) + "\n")
            print(f"train: step {step + 1}/{cfg.steps} loss {loss:.4f} "
                  + " ".join(f"{n} {v:.4f}" for n, v in parts.items())
                  + f" | {entry['tokens_per_s']:.0f} tok/s, eta {entry['eta_s']:.0f}s", flush=True)
        if (step + 1) % cfg.checkpoint_every == 0 or last:
            full_state = gather_full_state(model, opt) if sharded else None  # a collective: every rank
            with tempfile.TemporaryDirectory() as tmp:
                if rank == 0:
                    save_checkpoint(Path(tmp), model=model, optimizer=opt, scheduler=sched, step=step + 1,
                                    extra={"loss": loss, "data_position": stream.position(step + 1).to_dict()},
                                    full_state=full_state)
                    if last:  # the student rides in the final checkpoint too: a driver that does not share
                        # the workers' filesystem fetches it from checkpoint storage (tasks.train.stage.fetch_student)
                        save_student(model, full_state[0] if sharded else None, config, tokenizer, Path(tmp) / "student")
                        try:
                            copy_folder_atomic(Path(tmp) / "student", Path(config.out_dir) / "student")
                        except OSError as exc:  # another node's filesystem: the driver fetches it instead
                            print(f"train: student not copied to {config.out_dir} from this worker ({exc}); "
                                  "the driver fetches it from the checkpoint", flush=True)
                runtime.report({"step": step + 1, "loss": loss}, Path(tmp) if rank == 0 else None)
    batches.close()  # stops the shard prefetch
    if start_step >= cfg.steps:  # resumed from the final checkpoint: nothing trained in this process
        final_state = gather_full_state(model, opt)[0] if sharded else None  # a collective: every rank
        if rank == 0:
            save_student(model, final_state, config, tokenizer, Path(config.out_dir) / "student")


def packing_is_safe(model, setting: str, rank: int) -> bool:
    """train.packing on/auto: whether the student's attention keeps packed sequences apart (a probe forward); on
    fails when it does not, auto pads instead and says so."""
    from tasks.train.packing import keeps_packed_sequences_apart

    if keeps_packed_sequences_apart(model):
        return True
    problem = (f"the student ({type(model).__name__}, attention {model.config._attn_implementation}) lets sequences "
               "packed in one row attend to each other (position-id resets ignored; checked on a probe)")
    if setting == "on":
        raise ValueError(f"train.packing=on: {problem}; set train.packing=off (or auto) for this model")
    if rank == 0:
        print(f"train: packing off: {problem}; padding instead", flush=True)
    return False


def save_student(model, full_state, config: LoopConfig, tokenizer, target: Path) -> None:
    """The trained student as a plain HF folder (safetensors): unsharded (FSDP) and with LoRA adapters merged."""
    from tasks.models import load_causal_lm, save_pretrained_atomic
    from tasks.train.lora import merged

    if full_state is not None:  # sharded: a plain copy for save_pretrained
        core = load_causal_lm(config.student_dir)
        core.load_state_dict(full_state)
    else:
        core = model.module if hasattr(model, "module") else model
    save_pretrained_atomic(merged(core), tokenizer, target)


def copy_folder_atomic(source: Path, target: Path) -> None:
    import shutil

    tmp = target.with_name(target.name + ".tmp-copy")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: `config` is a LoopConfig as JSON (what Ray ships to the workers)."""
    from tasks.train.runtime import RayRuntime

    train(LoopConfig.model_validate(config), RayRuntime())
