"""Typed stage outputs: what each stage hands the next, and the completion record its cache folder keeps.

Every model is frozen and serialisable as JSON, so the same object is the
Prefect task's (small) result, the `output.json` in the stage's cache folder and
the thing the next stage reads. `reused` is the only field not stored: it says
whether this run made the output or found it in the stage cache.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class StageOutput(Frozen):
    key: str = Field(description="Content key of the stage run that made this output (tasks.identity.stage_key).")
    reused: bool = Field(False, description="Found in the stage cache rather than made by this run (not stored).")


class SplitFile(Frozen):
    path: str
    rows: int
    sha256: str


class PreparedData(StageOutput):
    """prepare-data: validated, tokenised prompt shards and the resolved model folders."""

    source: str
    train: SplitFile
    eval: SplitFile
    train_split: str
    eval_split: str
    tokenizer_hash: str
    vocab_size: int
    teacher_dir: str
    student_dir: str
    teacher_hash: str = Field(description="sha256 of the teacher's weight files (label lineage), computed once per model version.")
    checks: dict[str, Any] = Field(default_factory=dict, description="Data-check counts (duplicates, eval prompts seen in training, format).")


class TeacherLabels(StageOutput):
    """teacher-labels: soft-label manifests for the training prompts and the held-out prompts."""

    train_manifest: str
    eval_manifest: str


class StudentInit(StageOutput):
    """student-init: the weights training starts from (the given student, or it fine-tuned on references)."""

    student_dir: str
    init: str = Field(description="'base' (a pretrained LM or the demo's base student), 'random', or 'sft'.")
    log: str | None = None


class TrainedStudent(StageOutput):
    """train-student: the distilled student (HF folder, safetensors) and its training log."""

    checkpoint: str
    log: str


class Evaluation(StageOutput):
    """evaluate: held-out metrics of student and teacher, with 95% intervals."""

    metrics_file: str
    metrics: dict[str, Any]

    def values(self, who: str) -> dict[str, float]:
        return {name: stat["value"] for name, stat in self.metrics[who].items() if isinstance(stat, dict)}


class PromotionOutcome(Frozen):
    """gate-and-promote: the decision (one entry per rule) and where the report is."""

    promoted: bool
    version: str | None
    champion_before: str | None
    champion_after: str | None
    summary: str
    report_md: str
    report_png: str | None
    decision: dict[str, Any] = Field(description="The full decision record as stored in the registry.")
