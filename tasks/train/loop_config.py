"""The training loop's one typed config: the stage's TrainConfig plus where this run reads and writes.

Built in one place (`LoopConfig.build`) by the training stage, `make compare`,
benchmarks and tests alike, so defaults live in TrainConfig only.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from tasks.augment.flow_stage import MixKDLabels
from tasks.config import TrainConfig
from tasks.faults import NO_FAULTS, FaultPlan


class LoopConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    train: TrainConfig
    student_dir: str = Field(description="Initial weights (HF folder, safetensors).")
    manifest: str = Field(description="Soft-label manifest (path or URI) to train on.")
    out_dir: str = Field(description="Where the student folder and train_log.jsonl are written.")
    threads_per_worker: int = Field(1, ge=1)
    faults: FaultPlan = NO_FAULTS
    mixkd: MixKDLabels | None = Field(None, description="The mixkd stage's plan and mixed-input labels (train.mixkd).")

    @property
    def log_every(self) -> int:
        return max(1, self.train.steps // 20)

    @classmethod
    def build(cls, train: TrainConfig, *, student_dir: str, manifest: str, out_dir, threads_per_worker: int = 1,
              faults: FaultPlan = NO_FAULTS, mixkd: MixKDLabels | None = None) -> "LoopConfig":
        if (train.mixkd is None) != (mixkd is None):
            raise ValueError("train.mixkd and the mixkd stage's labels go together: pass mixkd= exactly when train.mixkd is set")
        return cls(train=train, student_dir=str(student_dir), manifest=str(manifest), out_dir=str(out_dir),
                   threads_per_worker=threads_per_worker, faults=faults, mixkd=mixkd)
