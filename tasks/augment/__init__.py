"""MixKD (Liang et al., ICLR 2021) for causal LMs: a stored mixup plan, teacher labels on mixed
input embeddings, and the three-term student loss. Where it fits a generative model and where
it does not: tasks/augment/loss.py.

    from tasks.augment import MixKDConfig, run_plan_stage, run_mixkd_teacher_stage, MixKDLoss
    plan = run_plan_stage(labels_manifest, "mixkd/plan", cfg)
    manifests = run_mixkd_teacher_stage(teacher_dir, labels_manifest, "mixkd/plan", "mixkd/labels", cfg)
"""

from tasks.augment.config import MixKDConfig
from tasks.augment.loss import MixKDLoss, MixKDWeights, interpolated_labels, mixed_batch
from tasks.augment.mixing import MixedBatch, align_pair, collate, frame_logits, mixed_embeddings, teacher_label_rows
from tasks.augment.plan import PlanError, draw_epoch, load_plan, read_epoch, write_plan
from tasks.augment.stage import MixupScorer, load_sequences, run_mixkd_teacher_stage, run_plan_stage

__all__ = [
    "MixKDConfig", "MixKDLoss", "MixKDWeights", "MixedBatch", "MixupScorer", "PlanError", "align_pair", "collate",
    "draw_epoch", "frame_logits", "interpolated_labels", "load_plan", "load_sequences", "mixed_batch", "mixed_embeddings",
    "read_epoch", "run_mixkd_teacher_stage", "run_plan_stage", "teacher_label_rows", "write_plan",
]
