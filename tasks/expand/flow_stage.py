"""The flow's expand-prompts stage: the teacher writes new prompts from the training prompts (vLLM, in a Ray actor).

Between prepare-data and curate-prompts (flows/distill.py). The seeds are the prepared
training prompts as instructions: under the default prompt template prepare stores the prompt
itself ("What is 3 plus 5?"; the answer cue is added when it is tokenised), under a user
template with the one placeholder {prompt} the template is taken off again (`prompt_frame`,
`unfill`) and put back around what the teacher writes (`fill`) before curation tokenises it. The expanded prompts keep their
lineage (seed ids, teacher, sampling settings, generation seed: tasks/expand/stage.py).

Not imported by `tasks.expand` itself: `tasks.config` composes `ExpandConfig`, and this
module reads `tasks.config`'s stage models (importing it from the package would be a cycle).
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import pyarrow as pa

from storage.atomic import sha256_file, write_parquet
from tasks.config import DataConfig, TeacherConfig
from tasks.contracts import Frozen, PreparedData, SplitFile, StageOutput
from tasks.data import read_prompts
from tasks.expand.config import ExpandConfig
from tasks.expand.stage import MANIFEST_NAME, ExpansionError, run_expand_stage
from tasks.identity import model_identity
from tasks.stage_cache import StageContext, StageSpec

SEEDS_NAME = "seeds.parquet"


def prompt_frame(data: DataConfig, fmt: str) -> str | None:
    """The template between an instruction and the stored prompt text (tasks/data), when there is one to undo:
    a user's data.prompt_template with the one placeholder {prompt} (format prompt). None when the stored prompt
    is the instruction itself (the default template: prepare stores the prompt and adds the cue when tokenising)
    or cannot be split into one (alpaca, several placeholders: the teacher then sees, and writes, whole prompts)."""
    if fmt != "prompt" or data.prompt_template is None:
        return None
    names = [name for _, name, _, _ in string.Formatter().parse(data.prompt_template) if name is not None]
    return data.prompt_template if names == ["prompt"] else None


def unfill(template: str | None, prompt: str) -> str:
    """The instruction inside a stored prompt (the inverse of template.format(prompt=...)); the prompt itself
    when there is no frame or it does not match."""
    if template is None:
        return prompt
    prefix, _, suffix = template.partition("{prompt}")
    prefix, suffix = prefix.replace("{{", "{").replace("}}", "}"), suffix.replace("{{", "{").replace("}}", "}")
    if prompt.startswith(prefix) and prompt.endswith(suffix) and len(prompt) > len(prefix) + len(suffix):
        return prompt[len(prefix) : len(prompt) - len(suffix)]
    return prompt


def fill(template: str | None, instruction: str) -> str:
    return instruction if template is None else template.format(prompt=instruction)


class ExpandInputs(Frozen):
    """What expansion reads: the prepared training prompts (seeds), the teacher and its engine, the prompt frame."""

    prepared: PreparedData
    teacher: TeacherConfig
    template: str | None


class ExpandedPrompts(StageOutput):
    """expand-prompts: the teacher's new prompts (instructions, not yet in the template) with lineage
    (prompts.parquet: seed ids, teacher, sampling, generation seed) and the rejection counts."""

    prompts: SplitFile
    manifest: str
    template: str | None
    seeds: int
    stats: dict[str, Any]
    complete: bool


class ExpandWorker:
    """The teacher engine in a Ray actor (vLLM spawns its engine process; the actor is killed afterwards)."""

    def __init__(self, teacher_dir: str, teacher: TeacherConfig):
        from tasks.teacher.engine import build_engine

        self.llm = build_engine(teacher_dir, teacher.engine)

    def expand(self, teacher_dir: str, seeds_path: str, out_dir: str, cfg: ExpandConfig, teacher_model: str) -> dict[str, Any]:
        return run_expand_stage(teacher_dir, seeds_path, out_dir, cfg, None, teacher_model=teacher_model, llm=self.llm,
                                prompt_template="{prompt}", log_fn=lambda line: print(line, flush=True))


def write_seeds(prepared: PreparedData, template: str | None, path: Path) -> int:
    rows = read_prompts(prepared.train.path)
    table = pa.table({"example_id": [r["example_id"] for r in rows], "prompt": [unfill(template, r["prompt"]) for r in rows]})
    write_parquet(table, path)
    return len(rows)


def run(cfg: ExpandConfig, inputs: ExpandInputs, ctx: StageContext) -> ExpandedPrompts:
    import ray

    from tasks.ray_runtime import ensure_ray

    prepared, teacher = inputs.prepared, inputs.teacher
    if prepared.train.rows < cfg.shots:
        raise ExpansionError(f"expand.shots={cfg.shots} but the training split has {prepared.train.rows} prompts; lower expand.shots")
    seeds_path = ctx.out_dir / SEEDS_NAME
    seeds = write_seeds(prepared, inputs.template, seeds_path)
    ensure_ray(ctx.ray_address)
    gpus = teacher.engine.tensor_parallel_size if teacher.use_gpu else 0
    actor = ray.remote(ExpandWorker).options(num_cpus=teacher.cpus_per_replica, num_gpus=gpus).remote(prepared.teacher_dir, teacher)
    try:
        manifest = ray.get(actor.expand.remote(prepared.teacher_dir, str(seeds_path), str(ctx.out_dir), cfg, teacher.model))
    finally:
        ray.kill(actor)
    stats = {k: v for k, v in manifest["stats"].items() if k != "sampling"}
    ctx.log(f"expand: {manifest['rows']} new prompts from {seeds} seeds ({stats})")
    return ExpandedPrompts(key=ctx.key, prompts=SplitFile(path=manifest["output"], rows=manifest["rows"], sha256=manifest["sha256"]),
                           manifest=str(ctx.out_dir / MANIFEST_NAME), template=inputs.template, seeds=seeds, stats=stats,
                           complete=manifest["complete"])


def _key_parts(cfg: ExpandConfig, inputs: ExpandInputs) -> dict[str, Any]:
    teacher = inputs.teacher
    return {"teacher_model": model_identity(inputs.prepared.teacher_dir), "seeds": inputs.prepared.train.sha256,
            "template": inputs.template, "engine": {"dtype": teacher.engine.dtype, "seed": teacher.engine.seed}}


def _intact(output: ExpandedPrompts) -> bool:
    path = Path(output.prompts.path)
    return path.exists() and Path(output.manifest).exists() and sha256_file(path) == output.prompts.sha256


STAGE = StageSpec(name="expand", version=1, output_type=ExpandedPrompts, run=run, key_parts=_key_parts, verify=_intact,
                  describe="expanded prompts")
