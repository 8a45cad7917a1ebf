"""student-init stage: the weights distillation starts from.

`train.init: as_is` starts from `train.student` as given (a pretrained model, the
demo's base student, or `demo-random`); `sft` first fine-tunes it with
cross-entropy on the training references (MiniLLM's starting point) through the
production trainer, cached by content like every stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.config import TrainConfig
from tasks.contracts import PreparedData, StudentInit
from tasks.identity import model_identity
from tasks.init.sft import run_sft, sft_train_config
from tasks.stage_cache import StageContext, StageSpec


def init_label(student_ref: str) -> str:
    """How the given student was initialised, for lineage and the comparison table."""
    return "random" if student_ref == "demo-random" else "base"


def run(cfg: TrainConfig, prepared: PreparedData, ctx: StageContext) -> StudentInit:
    result = run_sft(cfg, prepared.student_dir, prepared.train.path, ctx.out_dir, log_fn=ctx.log, runtime="ray")
    return StudentInit(key=ctx.key, student_dir=result["checkpoint"], init="sft", log=result["log"])


def _key_parts(cfg: TrainConfig, prepared: PreparedData) -> dict[str, Any]:
    return {"student_model": model_identity(prepared.student_dir), "prompts": prepared.train.sha256}


STAGE = StageSpec(name="init", version=1, output_type=StudentInit, run=run, key_parts=_key_parts,
                  verify=lambda output: (Path(output.student_dir) / "config.json").exists(), describe="sft student")


def sft_config(train: TrainConfig) -> TrainConfig:
    """The stage's config: the sft pass's own settings (changing the distillation objective reuses the sft student)."""
    return sft_train_config(train)
