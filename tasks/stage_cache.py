"""One stage-cache mechanism for every stage: content key → folder → completion record → reuse.

A stage declares itself once with `StageSpec` (its name, code version, output
type, what identifies its inputs, and how to check a finished output is still
intact). `run_cached` does the rest: it hashes the stage config's output-relevant
fields with the input identity into a key, returns the recorded output when the
folder holds a completion record that still verifies, and otherwise runs the
stage in that folder and writes the record last (write-then-rename), so an
interrupted stage is never taken for finished and its retry continues in the
same folder (finished shards and checkpoints are kept there).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from storage.atomic import read_json, write_json
from tasks.contracts import StageOutput
from tasks.faults import NO_FAULTS, FaultPlan
from tasks.identity import stage_key

COMPLETION_RECORD = "output.json"

Config = TypeVar("Config", bound=BaseModel)
Inputs = TypeVar("Inputs")
Output = TypeVar("Output", bound=StageOutput)


@dataclass(frozen=True)
class StageContext:
    """What a stage body gets besides its config and inputs: where to write, how to log, which faults to inject."""

    out_dir: Path
    key: str
    log: Callable[[str], None] = print
    faults: FaultPlan = NO_FAULTS
    ray_address: str | None = None


@dataclass(frozen=True)
class StageSpec(Generic[Config, Inputs, Output]):
    """A cacheable stage. `key_parts(config, inputs)` returns the identity of the inputs (upstream keys, model
    identities, prompt hashes); `verify(output)` says whether a recorded output is still intact on disk."""

    name: str
    version: int
    output_type: type[Output]
    run: Callable[[Config, Inputs, StageContext], Output]
    key_parts: Callable[[Config, Inputs], dict[str, Any]]
    verify: Callable[[Output], bool] = field(default=lambda output: True)
    describe: str = "output"


def content_fields(config: BaseModel) -> dict[str, Any]:
    """A stage config's fields that change outputs: everything but its declared `output_neutral_fields`."""
    neutral = getattr(type(config), "output_neutral_fields", frozenset())
    return config.model_dump(mode="json", exclude=set(neutral))


def key_for(spec: StageSpec, config: BaseModel, inputs: Any) -> str:
    return stage_key(spec.name, spec.version, config=content_fields(config), inputs=spec.key_parts(config, inputs))


def recorded_output(spec: StageSpec, folder: Path) -> StageOutput | None:
    """The completion record of `folder` if it exists, parses as the stage's output and still verifies."""
    record = folder / COMPLETION_RECORD
    if not record.exists():
        return None
    try:
        output = spec.output_type.model_validate(read_json(record))
    except (ValueError, ValidationError, OSError):
        return None  # an old or damaged record: the stage runs again in the same folder
    return output if spec.verify(output) else None


def run_cached(spec: StageSpec[Config, Inputs, Output], config: Config, inputs: Inputs, *, cache_root: Path,
               log: Callable[[str], None] = print, faults: FaultPlan = NO_FAULTS, ray_address: str | None = None) -> Output:
    """The stage's output for (config, inputs): reused from `cache_root/<stage>/<key>` when finished, else made there."""
    key = key_for(spec, config, inputs)
    folder = Path(cache_root).resolve() / spec.name / key
    done = recorded_output(spec, folder)
    if done is not None:
        log(f"{spec.name}: reusing finished {spec.describe} {folder} (same inputs and settings)")
        return done.model_copy(update={"reused": True})
    folder.mkdir(parents=True, exist_ok=True)
    output = spec.run(config, inputs, StageContext(out_dir=folder, key=key, log=log, faults=faults, ray_address=ray_address))
    if output.key != key:
        raise RuntimeError(f"stage {spec.name} returned an output keyed {output.key}, expected {key}")
    write_json(folder / COMPLETION_RECORD, output.model_dump(mode="json", exclude={"reused"}))
    return output
