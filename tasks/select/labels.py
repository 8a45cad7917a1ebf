"""selected-labels stage: one training label set from the teacher's labels of each selection increment, plus (with
`select.unlabelled: ce`) reference rows without teacher labels for the prompts the teacher did not see.

Layout (storage/FORMAT.md, "Lazy labelling"): every increment's shards are hard-linked (copied where links fail)
into this stage's own `train/` folder with their sidecars, so shard paths stay inside the manifest's folder; the
reference rows follow in shards whose manifest record says `teacher_labels: false`. Their labels are placeholders
(the reference token at log-prob 0): the training loop trains those rows with cross-entropy only
(tasks.objectives.weighting.TeacherMasked).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from storage import soft_labels
from storage.atomic import write_json
from tasks.config import SelectConfig
from tasks.contracts import Frozen, TeacherLabels
from tasks.models import load_tokenizer
from tasks.select.scores import SelectionError
from tasks.select.stage import SelectedPrompts
from tasks.stage_cache import StageContext, StageSpec
from tasks.teacher.ensemble import link_or_copy

PLACEHOLDER_LOGPROB = -60.0  # the other k-1 entries of a reference row (never read: KD is masked there)
REFERENCE_SHARD_ROWS = 2048


class SelectedLabelsInputs(Frozen):
    selection: SelectedPrompts
    parts: list[TeacherLabels]  # the teacher's labels of each selection increment, in order
    student_dir: str
    reference_prefix: str = " "


def placeholder_labels(response: list[int], k: int, vocab_size: int) -> dict[str, np.ndarray]:
    """Reference token at rank 1 with log-prob 0; k-1 other ids at PLACEHOLDER_LOGPROB; tail −inf."""
    t = len(response)
    ids = np.zeros((t, k), dtype=np.int64)
    for i, tok in enumerate(response):
        others = [x for x in range(k) if x != tok][: k - 1]
        ids[i] = [tok, *others]
    lp = np.full((t, k), PLACEHOLDER_LOGPROB, dtype=np.float32)
    lp[:, 0] = 0.0
    return {"topk_ids": ids, "topk_logprobs": lp, "token_logprob": np.zeros(t, dtype=np.float32),
            "tail_logmass": np.full(t, -np.inf, dtype=np.float32)}


def reference_rows(prompts_parquet: str, student_dir: str, prefix: str, k: int, vocab_size: int,
                   label_key: str) -> list[dict[str, Any]]:
    from tasks.teacher.capture import sample_id

    tokenizer = load_tokenizer(student_dir)
    rows = []
    for p in pq.read_table(prompts_parquet, columns=["example_id", "prompt_ids", "references"]).to_pylist():
        refs = [r for r in (p.get("references") or []) if r and r.strip()]
        if not refs:
            raise SelectionError(f"{prompts_parquet}: example {p['example_id']} has no reference; select.unlabelled=ce "
                                 "trains unselected prompts on their first reference (set data.reference_field, or "
                                 "select.unlabelled=none)")
        response = tokenizer(prefix + refs[0], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append({"sample_id": sample_id(p["prompt_ids"], response, "reference", label_key),
                     "example_id": p["example_id"], "split": "train", "response_source": "reference",
                     "prompt_ids": list(p["prompt_ids"]), "response_ids": response,
                     **placeholder_labels(response, k, vocab_size)})
    return rows


def run_selected_labels(cfg: SelectConfig, inputs: SelectedLabelsInputs, ctx: StageContext) -> TeacherLabels:
    if not inputs.parts:
        raise SelectionError("the selection holds no prompts for the teacher; raise select.fraction")
    out = ctx.out_dir / "train"
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    parts = []
    metadata: dict[str, Any] | None = None
    for part in inputs.parts:
        loaded = soft_labels.load_manifest(part.train_manifest)
        metadata = metadata or dict(loaded["metadata"])
        for field in ("tokenizer_hash", "k", "codec", "teacher_key"):
            if loaded["metadata"].get(field) != metadata.get(field):
                raise SelectionError(f"{part.train_manifest}: field {field} differs from the first increment's; the "
                                     "increments of one selection must come from the same teacher settings")
        for record in loaded["shards"]:
            name = soft_labels.shard_name(len(records))
            link_or_copy(Path(loaded["_dir"]) / record["path"], out / name)
            records.append({**record, "path": name})
            write_json((out / name).with_suffix(".json"), records[-1])
        parts.append({"manifest": loaded["_manifest"], "rows": loaded["num_rows"]})
    labelled = sum(r["rows"] for r in records)
    without = 0
    if cfg.unlabelled == "ce" and inputs.selection.unselected.rows:
        ref_meta = {**metadata, "response_source": "reference", "teacher_labels": False}
        rows = reference_rows(inputs.selection.unselected.path, inputs.student_dir, inputs.reference_prefix,
                              int(metadata["k"]), int(metadata["vocab_size"]), metadata["teacher_key"])
        for start in range(0, len(rows), REFERENCE_SHARD_ROWS):
            record = soft_labels.write_shard(out, len(records), rows[start:start + REFERENCE_SHARD_ROWS], ref_meta)
            records.append({**record, "teacher_labels": False})
            write_json((out / record["path"]).with_suffix(".json"), records[-1])
        without = len(rows)
    metadata["selection"] = {"manifest": inputs.selection.manifest, "method": inputs.selection.method,
                             "fraction": inputs.selection.fraction, "parts": parts, "unlabelled": cfg.unlabelled,
                             "rows_with_teacher_labels": labelled, "rows_without_teacher_labels": without,
                             "teacher_tokens_saved": inputs.selection.teacher_tokens_saved}
    manifest = soft_labels.write_manifest(out, records, metadata)
    ctx.log(f"select: training labels {manifest}: {labelled} rows labelled by the teacher, {without} reference rows "
            f"without teacher labels ({cfg.unlabelled})")
    return TeacherLabels(key=ctx.key, train_manifest=str(manifest), eval_manifest=inputs.parts[-1].eval_manifest)


def _key_parts(cfg: SelectConfig, inputs: SelectedLabelsInputs) -> dict[str, Any]:
    from tasks.identity import model_identity

    return {"selection": inputs.selection.key, "parts": [p.key for p in inputs.parts],
            "student_model": model_identity(inputs.student_dir), "reference_prefix": inputs.reference_prefix}


def _intact(output: TeacherLabels) -> bool:
    from tasks.teacher.stage import labels_intact

    return labels_intact(output)


STAGE = StageSpec(name="selected-labels", version=1, output_type=TeacherLabels, run=run_selected_labels,
                  key_parts=_key_parts, verify=_intact, describe="selected labels")
