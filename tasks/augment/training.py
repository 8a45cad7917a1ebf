"""MixKD inside the training loop (train.mixkd): which mixed pairs a step trains on, and its three-term loss.

Built once per worker before the loop (`MixKDStep.open`). Step s on rank r of w, with B sequences
per step (B / w per rank), trains on the plan rows

    g = (s · B + r · B/w + m) mod N,   m = 0 … B/w − 1

of the plan's rows in stored order (epoch 0 rows, then epoch 1, …; N rows in all), so the mixed
pairs of a step are a pure function of (plan, step, rank), like its original sequences
(tasks.train.stream): a resumed run sees the same pairs, and w workers see the rows one worker
would. Within a step, micro-batch i of n gets the rows m ≡ i (mod n), as the originals do.

The loss is `MixKDLoss` (tasks/augment/loss.py): the train objective on the originals plus the
student mixup and teacher-mixup KD terms on the pairs, each normalised by its global count of
valid tokens (all ranks, all micro-batches) as the loop does for the objective alone. The mixed
forward runs on the bare model (not its DDP wrapper), so there is one DDP forward per
micro-batch and one backward of the summed loss; DDP reduces each parameter's summed gradient.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from storage import soft_labels
from tasks.augment.flow_stage import MixKDLabels
from tasks.augment.loss import MixKDLoss, MixKDWeights, mixed_batch
from tasks.augment.mixing import MixedBatch, frame_logits
from tasks.augment.plan import load_plan, read_epoch
from tasks.augment.stage import load_sequences
from tasks.objectives import SparseLabels


def build_loss(train_cfg) -> MixKDLoss:
    """The MixKD loss of a TrainConfig with `mixkd` set: its objective on the originals, the configured weights."""
    mix = train_cfg.mixkd
    return MixKDLoss(original=train_cfg.objective, mixed=mix.mixed_objective,
                     weights=MixKDWeights(kd=mix.kd_weight, sm=mix.sm_weight, tmkd=mix.tmkd_weight),
                     support=train_cfg.support, temperature=train_cfg.temperature, **train_cfg.objective_params)


def step_rows(num_rows: int, step: int, rank: int, world: int, batch_size: int) -> list[int]:
    """Indices (into the plan's rows in stored order) of the pairs rank `rank` trains on at `step`."""
    per_rank = batch_size // world
    base = step * batch_size + rank * per_rank
    return [(base + m) % num_rows for m in range(per_rank)]


class MixKDStep:
    """The loop's objective when train.mixkd is set: `loss = step(model, mb, mixed, num_orig, num_mix)`."""

    def __init__(self, loss: MixKDLoss, rows: list[dict[str, Any]], records: dict[str, dict[str, Any]],
                 sequences: dict[str, tuple[list[int], list[int]]], pad_id: int, rank: int, world: int, batch_size: int):
        self.loss, self.rows, self.records, self.sequences = loss, rows, records, sequences
        self.pad_id, self.rank, self.world, self.batch_size = pad_id, rank, world, batch_size

    @classmethod
    def open(cls, train_cfg, data: MixKDLabels, *, rank: int, world: int, pad_id: int, tokenizer_hash: str,
             vocab_size: int) -> "MixKDStep":
        plan = load_plan(data.plan_dir)
        rows = [r for e in range(plan["epochs"]) for r in read_epoch(plan, e)]
        records = {}
        for manifest in data.label_manifests:
            for rec in soft_labels.read(Path(manifest), expected_tokenizer_hash=tokenizer_hash, vocab_size=vocab_size):
                records[rec["example_id"]] = rec
        missing = [r["plan_row_id"] for r in rows if r["plan_row_id"] not in records]
        if missing:
            raise soft_labels.SoftLabelError(f"{data.label_manifests}: no mixed-input labels for {len(missing)} plan row(s) "
                                             f"(e.g. {missing[0]}); delete {Path(data.plan_dir).parent} and rerun (the mixkd stage rewrites it)")
        return cls(build_loss(train_cfg), rows, records, load_sequences(data.source_manifest), pad_id, rank, world,
                   train_cfg.batch_size)

    @property
    def last_parts(self) -> dict[str, float]:
        return self.loss.last_parts

    def plan_rows(self, step: int) -> list[dict[str, Any]]:
        return [self.rows[g] for g in step_rows(len(self.rows), step, self.rank, self.world, self.batch_size)]

    def micro_batches(self, step: int, n: int, device) -> list[tuple[MixedBatch, SparseLabels]]:
        """This rank's pairs of `step` in `n` micro-batches (rows m ≡ i mod n), with the teacher's labels."""
        rows = self.plan_rows(step)
        out = []
        for i in range(n):
            part = rows[i::n]
            batch, teacher = mixed_batch([self.records[r["plan_row_id"]] for r in part], {r["plan_row_id"]: r for r in part},
                                         self.sequences, self.pad_id)
            out.append((batch, teacher.to(device)))
        return out

    @staticmethod
    def tokens(mixed: list[tuple[MixedBatch, SparseLabels]]) -> torch.Tensor:
        return sum(batch.union_mask.sum() for batch, _ in mixed).float()

    def __call__(self, model, mb: dict[str, torch.Tensor], mixed: tuple[MixedBatch, SparseLabels], num_orig, num_mix) -> torch.Tensor:
        from tasks.train.batches import model_inputs

        labels = SparseLabels(ids=mb["ids"], logprobs=mb["logprobs"], tail_logmass=mb["tail_logmass"], target_ids=mb["target_ids"])
        logits = model(**model_inputs(mb)).logits[:, :-1]
        core = model.module if hasattr(model, "module") else model  # DDP: the mixed forward on the bare model
        batch, teacher = mixed
        return self.loss(logits, labels, mb["mask"], frame_logits(core, batch), batch, teacher, num_orig, num_mix)
