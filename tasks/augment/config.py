"""MixKD settings: one typed model (no `tasks.config` import, so `tasks/config.py` can compose it).

Default weights and alpha are ours, not the paper's: the MixKD paper's loss weights and
alpha could not be checked (../shared/reference/seeds.md §4 marks them "memory — verify"),
so every term gets weight 1 and alpha = 0.4, the upper end of the range the mixup paper
(Zhang et al. 2018) found to work (0.1–0.4); Beta(0.4, 0.4) puts most lambdas near 0 or 1,
so most mixed inputs stay close to one real example.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class MixKDConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    alpha: float = Field(0.4, gt=0, description="lambda ~ Beta(alpha, alpha) per mixed pair.")
    epochs: int = Field(1, ge=1, description="Epochs of the mixup plan (each with its own pairs and lambdas).")
    pairs_per_epoch: int | None = Field(None, ge=1, description="Mixed pairs per epoch; None: one per training sequence.")
    seed: int = Field(0, description="Seed of the plan; the same seed gives byte-identical plan files.")
    kd_weight: float = Field(1.0, ge=0, description="Weight of the KD loss on the original sequences (the train objective).")
    sm_weight: float = Field(1.0, ge=0, description="Weight of the student mixup loss (student on mixed input vs interpolated targets).")
    tmkd_weight: float = Field(1.0, ge=0, description="Weight of the teacher-mixup KD loss (student vs teacher on the same mixed input).")
    mixed_objective: str = Field("fkl", description="Divergence to the teacher on mixed inputs (a registered objective spec without ce).")
    top_k: int = Field(20, ge=1, description="Teacher top-k stored per mixed position.")
    batch_size: int = Field(8, ge=1, description="Mixed pairs per teacher forward pass.")
    shard_rows: int = Field(2048, ge=1, description="Mixed sequences per soft-label shard (the unit of resume).")
