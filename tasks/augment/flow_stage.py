"""The flow's mixkd-labels stage: the mixup plan over the teacher's training labels, then the teacher's labels
on the mixed input embeddings (tasks/augment: plan.py, stage.py). Runs after teacher-labels when
train.mixkd is set; the training stage reads its output (tasks/augment/training.py).

Not imported by `tasks.augment` itself (`tasks.config` composes `MixKDConfig`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from storage import soft_labels
from tasks.augment.config import MixKDConfig
from tasks.augment.plan import MANIFEST_NAME, load_plan
from tasks.augment.stage import run_mixkd_teacher_stage, run_plan_stage
from tasks.contracts import Frozen, StageOutput, TeacherLabels
from tasks.identity import model_identity
from tasks.stage_cache import StageContext, StageSpec


class MixKDInputs(Frozen):
    teacher_dir: str
    teacher_model: str
    labels: TeacherLabels


class MixKDLabels(StageOutput):
    """mixkd-labels: the plan folder and one mixed-input soft-label manifest per plan epoch (epoch order)."""

    source_manifest: str
    plan_dir: str
    label_manifests: list[str]
    pairs: int
    epochs: int


def run(cfg: MixKDConfig, inputs: MixKDInputs, ctx: StageContext) -> MixKDLabels:
    source = inputs.labels.train_manifest
    plan_dir = ctx.out_dir / "plan"
    run_plan_stage(source, plan_dir, cfg, log_fn=ctx.log)
    manifests = run_mixkd_teacher_stage(inputs.teacher_dir, source, plan_dir, ctx.out_dir / "labels", cfg,
                                        teacher_model=inputs.teacher_model, use_ray=True, ray_address=ctx.ray_address,
                                        log_fn=ctx.log)
    plan = load_plan(plan_dir)
    pairs = sum(f["rows"] for f in plan["files"])
    ctx.log(f"mixkd: plan of {pairs} pairs over {plan['epochs']} epoch(s) (seed {cfg.seed}, alpha {cfg.alpha}) and the "
            f"teacher's labels on the mixed inputs: {manifests}")
    return MixKDLabels(key=ctx.key, source_manifest=str(source), plan_dir=str(plan_dir), label_manifests=list(manifests),
                       pairs=pairs, epochs=plan["epochs"])


def _key_parts(cfg: MixKDConfig, inputs: MixKDInputs) -> dict[str, Any]:
    return {"labels": inputs.labels.key, "teacher_model": model_identity(inputs.teacher_dir)}


def _intact(output: MixKDLabels) -> bool:
    if not (Path(output.plan_dir) / MANIFEST_NAME).exists():
        return False
    for manifest in output.label_manifests:
        try:
            soft_labels.load_manifest(manifest)
        except (OSError, ValueError):
            return False
    return True


STAGE = StageSpec(name="mixkd", version=1, output_type=MixKDLabels, run=run, key_parts=_key_parts, verify=_intact,
                  describe="mixup plan and mixed-input labels")
