"""Model card for a registered student: a README.md in the Hugging Face model-card format.

The YAML metadata (base model = the initial student, datasets, evaluation results in the
model-index form) is written through `huggingface_hub.ModelCardData`, not by hand, so the
card is what `huggingface_hub.ModelCard.load`, the Hub and `vllm serve` expect. The body
says what the student was distilled from, how, how it scored against the teacher (with
95% intervals), what the gate decided and why, and the hashes that identify its inputs.

Everything comes from the registry entry (lineage, metrics, decision), so a card can be
(re)written for any version, also one registered before cards existed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from storage.atomic import tmp_path_for
from tasks.evaluate.metrics import LOWER_IS_BETTER
from tasks.report import format_cell, metric_order

CARD_NAME = "README.md"
TAGS = ["knowledge-distillation", "stillhouse"]
# A Hub repo id: "name" or "org/name"; anything else (a path, 'demo') stays out of the metadata.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def hub_id(ref: Any) -> str | None:
    """`ref` if it names a Hugging Face repo (not 'demo', not an existing local folder), else None.

    The Hub rejects cards whose base_model/datasets are not repo ids, so local references
    are named in the body only."""
    if not isinstance(ref, str) or ref == "demo" or not _HUB_ID.match(ref) or Path(ref).expanduser().exists():
        return None
    return ref


def write_model_card(version_dir: str | Path, *, lineage: Mapping, metrics: Mapping, decision: Mapping,
                     version: str | None = None) -> Path:
    """Write <version_dir>/README.md (write-then-rename) from a registry entry's fields; returns its path.

    `ModelRegistry.register(..., before_publish=write_card_for_entry)` calls it on the staging folder,
    so a version is never visible without its card."""
    path = Path(version_dir) / CARD_NAME
    card = build_model_card(lineage=lineage, metrics=metrics, decision=decision, version=version or Path(version_dir).name)
    tmp = tmp_path_for(path)
    tmp.write_text(str(card), encoding="utf-8")
    tmp.replace(path)
    return path


def write_card_for_entry(version_dir: Path, entry) -> Path:
    """`before_publish` hook for `ModelRegistry.register`/export: the card from a RegistryEntry."""
    return write_model_card(version_dir, lineage=entry.lineage, metrics=entry.metrics, decision=entry.decision, version=entry.version)


def build_model_card(*, lineage: Mapping, metrics: Mapping, decision: Mapping, version: str) -> ModelCard:
    train = lineage.get("train_config") or {}
    teacher = lineage.get("teacher") or {}
    teacher = teacher if isinstance(teacher, Mapping) else {"model": teacher}
    data = lineage.get("data") or {}
    data = data if isinstance(data, Mapping) else {"source": data}
    student_init = lineage.get("student_init") or {}
    student_ref = (student_init.get("model") if isinstance(student_init, Mapping) else None) or train.get("student")
    dataset = hub_id(data.get("source"))
    sides = _sides(metrics)

    eval_results = [
        EvalResult(task_type="text-generation", task_name="Distillation held-out evaluation",
                   dataset_type=dataset or "stillhouse-heldout", dataset_name=dataset or "held-out prompts",
                   dataset_split=data.get("eval_split"), metric_type=name, metric_name=name, metric_value=value)
        for name in metric_order({"student": sides["student"]})
        if (value := _value(sides["student"].get(name))) is not None
    ]
    card_data = ModelCardData(
        model_name=f"stillhouse-{version}",
        base_model=hub_id(student_ref),
        datasets=[dataset] if dataset else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=TAGS,
        eval_results=eval_results or None,
    )
    body = _body(version, lineage, train, teacher, data, student_ref, metrics, sides, decision)
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}")


# ----- body ---------------------------------------------------------------------------


def _body(version, lineage, train, teacher, data, student_ref, metrics, sides, decision) -> str:
    objective = train.get("objective", "?")
    params = train.get("objective_params") or {}
    if params:
        objective += " (" + ", ".join(f"{k}={v}" for k, v in sorted(params.items())) + ")"
    lines = [f"# stillhouse student {version}", "",
             f"A student language model distilled from the teacher `{teacher.get('model', '?')}` with stillhouse "
             + "(knowledge distillation on stored top-k teacher log-probabilities).", "",
             "| | |", "|---|---|",
             f"| teacher | `{teacher.get('model', '?')}` |",
             f"| initial student (base model) | `{student_ref or '?'}` |",
             f"| objective | `{objective}`, support `{train.get('support', '?')}`, temperature {train.get('temperature', '?')} |",
             f"| training steps | {train.get('steps', '?')} (batch {train.get('batch_size', '?')} sequences, "
             + f"learning rate {train.get('learning_rate', '?')}) |"]
    if train.get("lora"):
        lora = train["lora"]
        lines.append(f"| LoRA | rank {lora.get('rank')}, alpha {lora.get('alpha')} (merged into the weights) |")
    if data:
        lines.append(f"| data | `{data.get('source', '?')}`" + (f", evaluated on split `{data['eval_split']}`" if data.get("eval_split") else "") + " |")

    lines += ["", "## Evaluation", "",
              f"Held-out examples: {metrics.get('num_examples', '?')}. Each cell: value [95% bootstrap interval] (n).", "",
              "| metric | better | student | teacher |", "|---|---|---|---|"]
    for name in metric_order(sides):
        better = "lower" if name in LOWER_IS_BETTER else "higher"
        lines.append(f"| {name} | {better} | {format_cell(_stat(sides['student'], name))} | {format_cell(_stat(sides['teacher'], name))} |")

    verdict = "passed" if decision.get("promoted") else "did not pass"
    lines += ["", "## Promotion gate", "",
              f"The gate **{verdict}**: {decision.get('summary', 'no summary recorded')}", ""]
    if decision.get("champion_before"):
        lines += [f"Champion at decision time: {decision['champion_before']}.", ""]
    rules = decision.get("rules") or []
    if rules:
        lines += ["| rule | metric | kind | value | threshold | passed | reason |", "|---|---|---|---|---|---|---|"]
        for r in rules:
            lines.append(f"| {_cell(r.get('name'))} | {_cell(r.get('metric', ''))} | {_cell(r.get('kind', ''))} | {_num(r.get('value'))} | "
                         f"{_num(r.get('threshold'))} | {_rule_status(r)} | {_cell(r.get('reason', ''))} |")

    lines += ["", "## Lineage", "", "| input | identity |", "|---|---|",
              f"| teacher weights | `{teacher.get('hash', '?')}` |",
              f"| soft-label manifest (sha256 of its shard list) | `{lineage.get('soft_labels_manifest_sha256', '?')}` |",
              f"| evaluation set (sha256) | `{lineage.get('eval_set_sha256', '?')}` |",
              f"| training stage key | `{lineage.get('train_key', '?')}` |",
              f"| code version | `{lineage.get('code_version', '?')}` |"]

    lines += ["", "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              'model = AutoModelForCausalLM.from_pretrained("PATH_TO_THIS_FOLDER")',
              'tokenizer = AutoTokenizer.from_pretrained("PATH_TO_THIS_FOLDER")', "```", "",
              "or `vllm serve PATH_TO_THIS_FOLDER`."]
    return "\n".join(lines) + "\n"


def _sides(metrics: Mapping) -> dict[str, dict]:
    """{"student": {...}, "teacher": {...}} from the flow's layout; a flat dict is the student's."""
    if isinstance(metrics.get("student"), Mapping):
        return {"student": dict(metrics["student"]), "teacher": dict(metrics.get("teacher") or {})}
    return {"student": {k: v for k, v in metrics.items() if _value(v) is not None}, "teacher": {}}


def _value(raw: Any) -> float | None:
    if isinstance(raw, Mapping):
        raw = raw.get("value")
    if isinstance(raw, (int, float)) and not isinstance(raw, bool) and math.isfinite(raw):
        return float(raw)
    return None


def _stat(side: Mapping, name: str) -> dict | None:
    raw = side.get(name)
    if isinstance(raw, Mapping):
        return {"value": raw.get("value"), "ci_low": raw.get("ci_low"), "ci_high": raw.get("ci_high"), "n": raw.get("n")}
    value = _value(raw)
    return None if value is None else {"value": value, "ci_low": None, "ci_high": None, "n": None}


def _rule_status(rule: Mapping) -> str:
    status = rule.get("status")
    if status is not None:
        return {"passed": "pass", "failed": "FAIL", "not_evaluable": "not evaluable"}.get(status, str(status))
    return "pass" if rule.get("passed") else "FAIL"


def _num(x: Any) -> str:
    return "—" if x is None else (f"{x:.4f}" if isinstance(x, float) else str(x))


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")
