"""One pydantic model per stage; the flow parameter composes them.

The same models validate the CLI's YAML, the Prefect UI form and Python calls,
and reject unknown keys so a misspelt setting is an error, not a silent default.
"""

from __future__ import annotations

import os
import string
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from storage.errors import UserError
from tasks.augment.config import MixKDConfig
from tasks.config_base import EngineConfig, StageConfig
from tasks.curate.config import CurateConfig
from tasks.expand.config import ExpandConfig
from tasks.gate import GateConfig, GateRule
from tasks.onpolicy.config import OnPolicyConfig
from tasks.tracking import TrackingConfig


def default_data_dir() -> str:
    return os.environ.get("STILLHOUSE_DATA_DIR", str(Path.cwd() / "stillhouse-data"))


class DataConfig(StageConfig):
    """Where prompts (and optional reference responses) come from."""

    source: str = Field(
        "demo",
        description="'demo' for the built-in task; a local folder with one file per split (train.jsonl, test.parquet, or "
        "shards such as train-*.jsonl or train/*.parquet); a Hugging Face dataset id (needs a reachable hub); or one file or "
        "glob (data/*.jsonl) together with data.eval_fraction.",
    )
    format: Literal["auto", "prompt", "messages", "alpaca"] = Field(
        "auto",
        description="Row layout. prompt: a prompt column (data.prompt_field) and optional references (data.reference_field); "
        "messages: a list of {role, content} turns, the prompt is every turn before the last assistant turn (rendered with "
        "the tokenizer's chat template), that turn is the reference; alpaca: instruction / input / output (output is the "
        "reference). auto picks messages, then alpaca, then prompt from the columns present.",
    )
    prompt_field: str = Field("prompt", description="Column holding the instruction text (format prompt).")
    reference_field: str | None = Field(
        "references", description="Column with acceptable answers (a string or list of strings); None if absent (format prompt).")
    messages_field: str = Field("messages", description="Column holding the conversation (format messages).")
    train_split: str = "train"
    eval_split: str = "test"
    eval_fraction: float | None = Field(
        None, gt=0, lt=1,
        description="Hold out this fraction of a single source (one file, a glob, or the train split of a hub dataset) as the "
        "evaluation split: each row goes by a hash of its normalised prompt, so the split is deterministic and no prompt is "
        "on both sides. None: read the evaluation split from its own file(s).",
    )
    allow_eval_overlap: bool = Field(
        False,
        description="Accept evaluation prompts that also appear among the training prompts (same normalised text) or share "
        "an example id with them; they are counted in the prepared manifest's checks either way. False: such data is "
        "refused before any model loads.",
    )
    max_train_examples: int | None = Field(None, ge=1, description="Cap on training prompts (None: all).")
    max_eval_examples: int | None = Field(None, ge=1, description="Cap on held-out prompts (None: all).")
    prompt_template: str | None = Field(
        None,
        description="Text built from named columns, e.g. '{instruction}\\n\\n{input}' (formats prompt and alpaca; every "
        "placeholder must be a column). None: '{prompt}\\nAnswer:' for prompt ('{prompt}' with the chat template), "
        "'{instruction}' plus '\\n\\n{input}' when the input is not empty for alpaca.",
    )
    use_chat_template: bool = Field(
        False, description="Format prompts with the tokenizer's chat template (instruct models); format messages always uses it.")
    demo_seed: int = Field(0, description="Seed of the generated demo task.")
    demo_teacher_steps: int = Field(1500, ge=1, description="Training steps of the demo teacher (built once, then reused).")
    demo_base_steps: int = Field(300, ge=1, description="Language-model pre-training steps of the demo's base student (built once, then reused).")
    demo_task: Literal["qa", "transform", "classify", "mix"] = Field(
        "qa", description="Built-in task family (data.source 'demo'): qa (arithmetic, opposites, colours...), transform "
        "(uppercase, plurals, word order), classify (sentiment/topic labels as words), or mix (all three: multi-task). "
        "Each has its own tokenizer, teacher and students, built once; evaluation prompts never occur in training.",
    )

    @field_validator("prompt_template")
    @classmethod
    def _named_placeholders(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            names = [name for _, name, _, _ in string.Formatter().parse(value) if name is not None]
        except ValueError as exc:
            raise ValueError(f"prompt_template {value!r} is not a valid template ({exc}); write literal braces as {{{{ and }}}}") from exc
        if not names:
            raise ValueError("prompt_template must contain at least one named placeholder such as {prompt} or {instruction}")
        bad = [n for n in names if not n.isidentifier()]
        if bad:
            raise ValueError(f"prompt_template placeholders must be column names such as {{instruction}}, not {bad[0]!r}")
        return value

    @model_validator(mode="after")
    def _distinct_splits(self) -> "DataConfig":
        if self.train_split == self.eval_split:
            raise ValueError(f"data.train_split and data.eval_split are both {self.train_split!r}: evaluation would run on "
                             "training prompts; name two different splits, or set data.eval_fraction to hold out part of one")
        return self


class TeacherConfig(StageConfig):
    """Teacher stage: vLLM generates responses and records top-k log-probabilities."""

    output_neutral_fields: ClassVar[frozenset[str]] = frozenset({"replicas", "cpus_per_replica", "use_gpu"})

    model: str = Field("demo", description="'demo', a local HF model folder, or a Hugging Face model id.")
    revision: str | None = Field(None, description="Model revision for hub ids.")
    top_k: int = Field(20, ge=1, le=1024, description="Log-probabilities stored per response token.")
    logprobs_mode: Literal["raw_logprobs", "processed_logprobs"] = "raw_logprobs"
    temperature: float = Field(1.0, ge=0.0, description="Sampling temperature of teacher responses.")
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(32, ge=1)
    samples_per_prompt: int = Field(1, ge=1)
    shard_rows: int = Field(2048, ge=1, description="Sequences per Parquet shard (the unit of resume).")
    mode: Literal["generate", "score"] = Field(
        "generate",
        description="Training labels: 'generate' = the teacher samples responses; 'score' = teacher forcing of each "
        "prompt's first reference + EOS (needs data.reference_field). Held-out prompts are always labelled greedily.",
    )
    reference_prefix: str = Field(" ", description="Text put before a reference when it is tokenised in score mode (the demo's answers follow 'Answer:' after a space).")
    codec: Literal["compact-v1", "baseline", "plain-f32"] = Field(
        "compact-v1", description="Soft-label shard codec (storage/FORMAT.md): compact-v1 ~2 bytes per top-k entry, baseline uint32+float16, plain-f32 exact."
    )
    replicas: int = Field(1, ge=1, description="Teacher engines (Ray actors) labelling shards in parallel (data parallel).")
    cpus_per_replica: float = Field(1.0, gt=0, description="Ray CPUs reserved per teacher replica.")
    use_gpu: bool = Field(False, description="Give each replica engine.tensor_parallel_size GPUs (vLLM on a GPU cluster).")
    engine: EngineConfig = Field(default_factory=EngineConfig)

    @model_validator(mode="after")
    def _samples_differ(self) -> "TeacherConfig":
        if self.mode == "generate" and self.temperature == 0 and self.samples_per_prompt > 1:
            raise ValueError(f"teacher.temperature=0 is greedy decoding: its {self.samples_per_prompt} samples per prompt "
                             "would be identical; set teacher.temperature > 0 or teacher.samples_per_prompt=1")
        return self


class LoraSettings(StageConfig):
    """Low-rank adapters (peft) instead of full fine-tuning; merged into the weights at the end."""

    rank: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1, description="Module names to adapt (Llama-style names by default).",
    )


class TrainConfig(StageConfig):
    """Training stage: Ray Train workers fit the student to the stored soft labels."""

    output_neutral_fields: ClassVar[frozenset[str]] = frozenset({"ray_address", "checkpoint_storage"})

    student: str = Field("demo", description="'demo', a local HF model folder, or a Hugging Face model id (initial weights).")
    objective: str = Field("fkl+ce", description="Objective name or mixture, e.g. 'fkl', 'akl', '0.5*akl+0.5*ce', 'ce' (no KD).")
    support: Literal["renormalize", "tail_bucket"] = "tail_bucket"
    temperature: float = Field(1.0, gt=0)
    objective_params: dict[str, float] = Field(default_factory=dict, description="beta / alpha / mu for the objective.")
    steps: int = Field(300, ge=1)
    batch_size: int = Field(32, ge=1, description="Sequences per optimizer step across all workers.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step on each worker.")
    checkpoint_every: int = Field(100, ge=1, description="Steps between checkpoints (the unit of resume).")
    max_failures: int = Field(1, ge=0, description="Worker crashes to survive by restarting from the last checkpoint.")
    learning_rate: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(20, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    num_workers: int = Field(1, ge=1)
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="Data parallel with a full model copy per worker (ddp), or parameters, gradients and optimizer "
        "state sharded across workers (fsdp, torch FSDP2) for students that do not fit one device.",
    )
    lora: LoraSettings | None = Field(None, description="Train LoRA adapters (merged at the end) instead of all weights.")
    init: Literal["as_is", "sft"] = Field(
        "as_is", description="Start from train.student as it is, or first fine-tune it with cross-entropy on the training "
        "references (sft: MiniLLM's starting point; needs data.reference_field) for train.sft_steps.",
    )
    sft_steps: int = Field(300, ge=1, description="Steps of the train.init=sft pass (objective ce on the first reference + EOS).")
    sft_learning_rate: float | None = Field(None, gt=0, description="Learning rate of the sft pass (None: train.learning_rate).")
    length_bucketing: bool = Field(
        False, description="Batch sequences of similar length together (within a shard) to cut padding. Off by default: "
        "bucketed batches are no longer random samples of the data, and where length tracks content they are one kind "
        "of example each (on the demo task held-out exact match fell from 0.70 to 0.08 at 300 steps). Turn on for long, "
        "varied sequences where padding dominates, and check the held-out metrics.",
    )
    fused_head: bool = Field(
        False, description="Compute the loss from the student's final hidden states and lm-head weight in vocabulary "
        "blocks (tasks/objectives/fused_head.py) instead of from [tokens x vocabulary] logits: same loss and gradients "
        "(float round-off), far less memory at large vocabularies. Plain linear heads only (no bias or logit "
        "soft-capping); not with strategy=fsdp.",
    )
    packing: Literal["auto", "on", "off"] = Field(
        "auto", description="Pack several sequences per row (first-fit up to the longest sequence of the micro-batch), "
        "position ids restarting per sequence and attention kept inside each (tasks/train/packing.py), instead of one "
        "padded row per sequence: the same sequences per step and the same loss as padding, fewer pad tokens (the train "
        "log reports padding_waste). auto: pack when a probe forward shows the student's attention keeps packed "
        "sequences apart, else pad and say so; on: pack or fail with that error; off: pad. true/false mean on/off.",
    )
    packing_max_tokens: int | None = Field(
        None, ge=1, description="With train.packing: tokens per packed row (a longer sequence gets a row of its own). "
        "None: the longest sequence of the micro-batch, so rows are never longer than padded ones.",
    )
    uncertainty_weighting: bool = Field(
        False, description="Dynamic KD's per-example weights (tasks/objectives/weighting.py): the objective's teacher terms "
        "weighted by the student's normalised entropy (no gradient); target terms (ce) unweighted. Not with fused_head.",
    )
    dynamic_teacher: Literal["off", "hard", "soft", "soft_instance"] = Field(
        "off", description="Dynamic teacher adoption from two teachers' labels of the same responses (the main teacher = "
        "large, the single `teachers:` entry = small): hard sends the uncertain half of each batch to the small teacher, "
        "soft weights both by the batch's mean uncertainty, soft_instance per example. Needs exactly one `teachers:` entry.",
    )
    mixkd: MixKDConfig | None = Field(
        None, description="MixKD (tasks/augment): a stored mixup plan over the training labels, the teacher's labels on "
        "the mixed input embeddings (stage mixkd, after teacher-labels), and the student trained on the objective plus "
        "the student-mixup and teacher-mixup KD terms. For short answers and classification-style tasks. None: off "
        "(`--set 'train.mixkd={}'` turns it on with the defaults).",
    )
    use_gpu: bool = False
    seed: int = 0
    ray_address: str | None = Field(None, description="Existing Ray cluster (also honoured: RAY_ADDRESS); None starts a local one.")
    checkpoint_storage: str | None = Field(
        None, description="Where Ray Train keeps checkpoints: a shared path or a URI (s3://bucket/prefix, gs://...) "
        "that every worker reaches; None: under the stage's cache folder on this machine.",
    )

    @field_validator("packing", mode="before")
    @classmethod
    def _packing_from_bool(cls, value):
        """true/false (YAML, --set train.packing=true, earlier configs) mean on/off."""
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return "on" if value.lower() == "true" else "off"
        return value

    @model_validator(mode="after")
    def _fused_head_needs_ddp(self) -> "TrainConfig":
        if self.fused_head and self.strategy == "fsdp":
            raise ValueError("train.fused_head with train.strategy=fsdp is not supported (the lm-head weight is sharded); "
                             "use strategy=ddp or fused_head=false")
        return self

    @model_validator(mode="after")
    def _lora_needs_ddp(self) -> "TrainConfig":
        if self.lora is not None and self.strategy == "fsdp":
            raise ValueError("train.lora with train.strategy=fsdp is not supported; use strategy=ddp for LoRA students")
        return self

    @model_validator(mode="after")
    def _dynamic_kd_paths(self) -> "TrainConfig":
        if self.fused_head and (self.uncertainty_weighting or self.dynamic_teacher != "off"):
            raise ValueError("train.fused_head does not support train.uncertainty_weighting or train.dynamic_teacher "
                             "(both read the student's full logits); turn fused_head off")
        if self.uncertainty_weighting and self.dynamic_teacher != "off":
            raise ValueError("train.dynamic_teacher already weights the teachers by uncertainty; "
                             "set train.uncertainty_weighting=false")
        return self

    @model_validator(mode="after")
    def _mixkd_settings(self) -> "TrainConfig":
        if self.mixkd is None:
            return self
        if self.fused_head or self.uncertainty_weighting or self.dynamic_teacher != "off":
            raise ValueError("train.mixkd does not combine with train.fused_head, train.uncertainty_weighting or "
                             "train.dynamic_teacher; turn those off or set train.mixkd to null")
        from tasks.augment.loss import MixKDLoss

        try:
            MixKDLoss(original=self.objective, mixed=self.mixkd.mixed_objective, support=self.support,
                      temperature=self.temperature, **self.objective_params)
        except ValueError as exc:
            raise ValueError(f"train.mixkd.mixed_objective {self.mixkd.mixed_objective!r}: {exc}") from None
        return self

    @model_validator(mode="after")
    def _objective_is_known(self) -> "TrainConfig":
        """A misspelt objective, a bad mixture or an unknown parameter fails here, before the teacher labels anything."""
        from tasks.objectives import build_objective

        try:
            build_objective(self.objective, support=self.support, temperature=self.temperature, **self.objective_params)
        except ValueError as exc:
            raise ValueError(f"train.objective {self.objective!r} / train.objective_params {self.objective_params}: {exc}") from None
        return self


class EvalConfig(StageConfig):
    """Evaluation stage: held-out generation and distribution metrics."""

    max_new_tokens: int = Field(32, ge=1)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    sample_seeds: int = Field(
        0, ge=0, le=20,
        description="Sampled runs at temperature 1 (MiniLLM's protocol, e.g. 3 or 5), in the same engine call as greedy; "
        "adds rouge_l_sampled (ROUGE-L averaged over seeds). 0: greedy only (fastest).",
    )
    lm_eval_tasks: list[str] = Field(
        default_factory=list,
        description="lm-eval-harness task names run on the student (e.g. ['arc_easy']); skipped, with the reason in "
        "metrics.json, when lm-eval is not installed or the tasks' datasets are not reachable. Gate name: lm_eval:<task>.",
    )
    lm_eval_limit: int | None = Field(None, ge=1, description="Examples per lm-eval task (None: all).")


class SelectConfig(StageConfig):
    """Lazy, uncertainty-driven labelling (Dynamic KD): the student scores the training prompts, the teacher labels
    only the most uncertain fraction (tasks/select)."""

    enabled: bool = Field(False, description="Run the selection stage before teacher-labels (off: the teacher labels every prompt).")
    method: Literal["entropy", "margin", "confidence", "random"] = Field(
        "entropy", description="Student uncertainty on its own greedy answer: highest mean token entropy, smallest "
        "top-1/top-2 margin, lowest confidence; random is the seeded control.",
    )
    fraction: float = Field(0.1, gt=0, le=1, description="r: share of the training prompts sent to the teacher. A later "
                            "run with a larger r (same student, method and prompts) labels only the difference.")
    seed: int = Field(0, description="Seed of the random method and of the student's sampling.")
    top_k: int = Field(20, ge=2, le=1024, description="Student log-probs per position used for the scores (margin needs 2).")
    max_new_tokens: int = Field(32, ge=1, description="Longest student answer scored per prompt.")
    temperature: float = Field(0.0, ge=0, description="Student sampling temperature for the scoring pass (0: greedy).")
    unlabelled: Literal["ce", "none"] = Field(
        "ce", description="What the prompts the teacher did not label contribute: ce = cross-entropy on their first "
        "reference (needs data.reference_field; KD terms masked there), none = nothing (they are left out).",
    )
    engine: EngineConfig = Field(default_factory=EngineConfig, description="vLLM settings of the student's scoring pass.")


class MemberTeacherConfig(StageConfig):
    """An extra teacher (multi-teacher labels): it scores the main teacher's training responses."""

    output_neutral_fields: ClassVar[frozenset[str]] = frozenset({"replicas", "cpus_per_replica", "use_gpu"})

    model: str = Field(description="'demo-small' (the demo's 2 x 128 teacher, built once), a local HF folder or a hub id; "
                       "must share the student's tokenizer.")
    revision: str | None = None
    top_k: int | None = Field(None, ge=1, le=1024, description="Top-k stored per token (None: teacher.top_k).")
    weight: float = Field(1.0, gt=0, description="Weight in the probability mean (ensemble.mode mean); the main teacher has ensemble.main_weight.")
    replicas: int = Field(1, ge=1)
    cpus_per_replica: float = Field(1.0, gt=0)
    use_gpu: bool = False
    engine: EngineConfig = Field(default_factory=EngineConfig)


class EnsembleConfig(StageConfig):
    """How the main teacher and the `teachers:` members combine into the label set the student trains on."""

    mode: Literal["mean", "route"] = Field(
        "mean", description="mean: the weighted mean of the members' probabilities over the union of their top-k "
        "(storage/FORMAT.md, mean-prob-union-v1); route: each example takes one member's labels, chosen by a dataset "
        "column (ensemble.route_column, values mapped by ensemble.routes). With train.dynamic_teacher the pair is kept "
        "unmerged instead.",
    )
    main_weight: float = Field(1.0, gt=0, description="Weight of the main teacher in the mean.")
    k: int | None = Field(None, ge=1, description="Merged top-k (None: the largest member k for mean, the smallest for route).")
    route_column: str | None = Field(None, description="Prompt column that picks the teacher per example (mode route).")
    routes: dict[str, int] = Field(default_factory=dict, description="route_column value -> member: 0 = the main "
                                   "teacher, i = teachers[i-1]. Every value in the data must be listed.")


def default_gate() -> GateConfig:
    return GateConfig(
        rules=[
            GateRule(metric="exact_match", kind="absolute", threshold=0.2),
            GateRule(metric="exact_match", kind="relative_to_champion", margin=0.0),
        ]
    )


class PromotionConfig(StageConfig):
    """Gate rules and the registry the student is promoted in."""

    gate: GateConfig = Field(default_factory=default_gate)
    registry_dir: str | None = Field(None, description="Registry folder; default <data_dir>/registry.")
    require_approval: bool = Field(
        False, description="Pause before promotion until a person approves or rejects in the Prefect UI (a typed form)."
    )
    approval_timeout_s: int = Field(3600, ge=1, description="How long to wait for the approval; no answer means not promoted.")


class PipelineConfig(StageConfig):
    """Everything one distillation run needs; the Prefect UI renders this as its form."""

    @field_validator("run_name", mode="before")
    @classmethod
    def _plain_run_name(cls, value):
        import re

        if isinstance(value, str) and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", value):
            raise ValueError(f"run_name {value!r} must be a plain name (letters, digits, '.', '_', '-'; at most 100; "
                             "no '/' or leading '.'): runs live under <data_dir>/runs")
        return value

    run_name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
        json_schema_extra={"examples": ["nightly-akl"]},
        description="Run folder name under <data_dir>/runs: letters, digits, '.', '_' and '-' (no paths); an existing run's "
        "name gets a numbered suffix. Default: a timestamp.",
    )
    data_dir: str = Field(default_factory=default_data_dir, description="Where data, runs and the registry live.")
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="Experiment tracking (MLflow by default, local store).")
    onpolicy: OnPolicyConfig | None = Field(
        None, description="On-policy distillation instead of training on stored labels: rounds of student rollouts, "
        "teacher scoring and updates (method minillm | gkd | onpolicy_rkl; tasks/onpolicy). None: offline KD.",
    )
    expand: ExpandConfig | None = Field(
        None, description="Expansion (tasks/expand): the teacher writes new training prompts from the training prompts "
        "(stage expand, after prepare-data); needs `curate`. None: off (`--set 'expand={}'` turns it on).")
    curate: CurateConfig | None = Field(
        None, description="Curation (tasks/curate) of the training prompts (original + expanded) before the teacher labels "
        "them: dedup, length, repetition, decontamination against the evaluation prompts, teacher self-score; the counts "
        "per filter go to run.json. None: off (`--set 'curate={}'` turns it on with the defaults).")

    @model_validator(mode="after")
    def _augmentation(self) -> "PipelineConfig":
        if self.expand is not None and self.curate is None:
            raise ValueError("expand needs curate: the teacher's prompts are filtered (and decontaminated against the "
                             "evaluation prompts) before they are labelled; set curate (e.g. --set 'curate={}')")
        if self.expand is not None and self.teacher.mode == "score":
            raise ValueError("expand with teacher.mode=score: expanded prompts have no references to score; use teacher.mode=generate")
        if (self.expand is not None or self.curate is not None) and self.data.format == "messages":
            raise ValueError("expand/curate work on prompt and alpaca layouts, not data.format messages; turn them off")
        return self
    select: SelectConfig = Field(default_factory=SelectConfig, description="Uncertainty-driven selection of the prompts the teacher labels.")
    teachers: list[MemberTeacherConfig] = Field(
        default_factory=list, description="Extra teachers (multi-teacher labels); each scores the main teacher's training responses.")
    ensemble: EnsembleConfig = Field(default_factory=EnsembleConfig, description="How the teachers' labels combine (with `teachers:`).")

    def _check_dynamic_kd(self) -> None:
        _check_dynamic_kd_config(self)

    @model_validator(mode="after")
    def _check(self) -> "PipelineConfig":
        from tasks.evaluate.metrics import known_metric_names

        self.promotion.gate.validate_metrics(set(known_metric_names(self.eval.lm_eval_tasks)))
        if self.eval.sample_seeds == 0 and any(r.metric == "rouge_l_sampled" for r in self.promotion.gate.rules):
            raise ValueError("a gate rule uses rouge_l_sampled but eval.sample_seeds is 0; set eval.sample_seeds >= 1")
        if self.train.num_workers > self.train.batch_size:
            raise ValueError("train.num_workers must not exceed train.batch_size")
        self._check_dynamic_kd()
        return self


def _check_dynamic_kd_config(config: "PipelineConfig") -> None:
    """Selection, multi-teacher and dynamic-teacher settings that cannot work together; checked before any compute."""
    from tasks.objectives import build_objective
    from tasks.objectives.weighting import split_terms

    train, select = config.train, config.select
    if train.dynamic_teacher != "off":
        if len(config.teachers) != 1:
            raise ValueError(f"train.dynamic_teacher={train.dynamic_teacher} needs exactly one `teachers:` entry (the small "
                             f"teacher; the main teacher is the large one), got {len(config.teachers)}")
        kd, _ = split_terms(build_objective(train.objective, support=train.support, temperature=train.temperature,
                                            **train.objective_params))
        if kd is None:
            raise ValueError(f"train.dynamic_teacher needs a KD term in train.objective (e.g. fkl+ce), got {train.objective!r}")
        if config.teachers[0].top_k not in (None, config.teacher.top_k):
            raise ValueError(f"train.dynamic_teacher reads both teachers with one top-k: set teachers[0].top_k to "
                             f"teacher.top_k ({config.teacher.top_k}) or leave it unset")
    if config.teachers and config.ensemble.mode == "route" and train.dynamic_teacher == "off":
        if not config.ensemble.route_column or not config.ensemble.routes:
            raise ValueError("ensemble.mode=route needs ensemble.route_column and ensemble.routes (value -> member index)")
        bad = {v: m for v, m in config.ensemble.routes.items() if not 0 <= m <= len(config.teachers)}
        if bad:
            raise ValueError(f"ensemble.routes {bad}: members are 0 (main teacher) .. {len(config.teachers)}")
    if select.enabled:
        if config.teachers and train.dynamic_teacher != "off":
            raise ValueError("select.enabled with train.dynamic_teacher is not supported (the dynamic-teacher loss has no "
                             "cross-entropy-only rows); use ensemble.mode mean or route with selection, or turn selection off")
        if select.unlabelled == "ce" and train.fused_head:
            raise ValueError("select.unlabelled=ce trains cross-entropy-only shards, which train.fused_head does not "
                             "support yet; set train.fused_head=false or select.unlabelled=none")
        if select.unlabelled == "ce" and config.data.reference_field is None and config.data.format == "prompt":
            raise ValueError("select.unlabelled=ce needs references (data.reference_field); set it or select.unlabelled=none")


class ConfigError(UserError):
    """The configuration (YAML file, --set override or form) is invalid; the message names the field or line."""


def describe_validation_error(exc: ValidationError, where: str = "configuration") -> str:
    """One line per pydantic error folded into one message: 'field.path: what is wrong'."""
    parts = []
    for error in exc.errors():
        field = ".".join(str(p) for p in error["loc"]) or "(top level)"
        message = error["msg"].removeprefix("Value error, ")
        parts.append(f"{field}: {message}" + (f" (got {error['input']!r})" if error["type"] != "value_error" and "input" in error
                                              and not isinstance(error["input"], dict) else ""))
    return f"invalid {where}: " + "; ".join(parts)


def load_config(path: str | Path | None, overrides: dict | None = None) -> PipelineConfig:
    """Read a YAML config (or none) and apply dotted overrides such as {'train.steps': 10}; errors are ConfigError."""
    import yaml

    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found; pass an existing YAML file to --config")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save the config as UTF-8") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ConfigError(f"{path}: invalid YAML{at}: {getattr(exc, 'problem', None) or exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping (key: value) at the top level, got {type(raw).__name__}")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {dotted}: {key} is not a section")
        node[leaf] = value
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, f"configuration{f' in {path}' if path else ''}")) from None
