"""The flow's curate-prompts stage: filter the original + expanded training prompts, tokenised like any prompts.

Between prepare-data (and expand-prompts, when on) and teacher-labels (flows/distill.py):

1. the union: the prepared training prompts (first, so a duplicate keeps the original) and the
   expanded ones put into the data's prompt template (`tasks.expand.flow_stage.fill`);
2. tokenised by the prepare stage's own code (`tasks.data.prepare` over a local folder of the
   union and the evaluation prompts, with the data's chat setting and the default template where
   the data used it, "{prompt}" where the stored prompt is already the filled template), so a
   stored prompt text gets exactly the ids prepare gave it;
3. curated (tasks/curate: dedup, length, repetition, decontamination against the evaluation
   prompts, optional teacher self-score = the teacher's mean log-likelihood of the prompt tokens);
4. refused if evaluation prompts are still among the kept ones and data.allow_eval_overlap is off.

The kept rows are the new training `SplitFile`; the flow hands the teacher
`prepared.model_copy(update={"train": curated.train})`. The per-filter counts are in the
output (`removed_by`) and the curate manifest.

Not imported by `tasks.curate` itself (`tasks.config` composes `CurateConfig`; this module reads
`tasks.config` and `tasks.data`, which import it back).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from storage.atomic import sha256_file, write_parquet
from tasks.config import DataConfig
from tasks.contracts import Frozen, PreparedData, SplitFile, StageOutput
from tasks.curate.config import CurateConfig
from tasks.curate.stage import CurationError, run_curate_stage
from tasks.data import prepare, read_prompts
from tasks.expand.flow_stage import ExpandedPrompts, fill
from tasks.identity import model_identity
from tasks.stage_cache import StageContext, StageSpec
from tasks.textnorm import seen_in

SOURCE_SCHEMA = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("references", pa.list_(pa.string()))])


class CurateInputs(Frozen):
    """What curation reads: the prepared prompts, the expanded ones (or None) and how prompts are tokenised."""

    prepared: PreparedData
    expanded: ExpandedPrompts | None = None
    data: DataConfig
    max_new_tokens: int


class CuratedPrompts(StageOutput):
    """curate-prompts: the kept training prompts (a prompt shard like prepare's) and what each filter removed."""

    train: SplitFile
    manifest: str
    rows_in: int
    rows_out: int
    original_rows: int
    expanded_rows: int
    kept_original: int
    kept_expanded: int
    removed_by: dict[str, int]

    def summary(self) -> dict[str, Any]:
        """The counts for run.json and the report."""
        return {"rows_in": self.rows_in, "rows_out": self.rows_out, "original_rows": self.original_rows,
                "expanded_rows": self.expanded_rows, "kept_original": self.kept_original, "kept_expanded": self.kept_expanded,
                "removed_by": dict(self.removed_by), "manifest": self.manifest}


def _write(rows: list[dict[str, Any]], path: Path) -> None:
    write_parquet(pa.Table.from_pylist(rows, schema=SOURCE_SCHEMA), path)


def union_rows(prepared: PreparedData, expanded: ExpandedPrompts | None) -> tuple[list[dict[str, Any]], int]:
    """(rows, how many are original): the prepared training prompts, then the expanded ones in the prompt template."""
    original = [{"id": r["example_id"], "prompt": r["prompt"], "references": list(r["references"] or [])}
                for r in read_prompts(prepared.train.path)]
    extra = []
    if expanded is not None:
        extra = [{"id": r["example_id"], "prompt": fill(expanded.template, r["prompt"]), "references": []}
                 for r in read_prompts(expanded.prompts.path)]
    return original + extra, len(original)


def tokenise_like_prepare(rows: list[dict[str, Any]], prepared: PreparedData, data: DataConfig, max_new_tokens: int,
                          out_dir: Path) -> dict[str, Any]:
    """Prompt shards of `rows` (train) and the evaluation prompts (test) by tasks.data.prepare, i.e. the ids prepare
    gave (or would give) these stored prompt texts: under the default template prepare stores the prompt itself and
    fills the template when tokenising, so it is kept; otherwise the stored text is the filled template ("{prompt}")."""
    if prepared.checks.get("format") == "messages":
        raise CurationError("expand/curate work on prompt and alpaca layouts; with data.format messages the stored prompt is "
                            "a rendered conversation that cannot be tokenised again the same way; turn expand and curate off")
    source = out_dir / "source"
    source.mkdir(parents=True, exist_ok=True)
    _write(rows, source / "train.parquet")
    _write([{"id": r["example_id"], "prompt": r["prompt"], "references": list(r["references"] or [])}
            for r in read_prompts(prepared.eval.path)], source / "test.parquet")
    stored_raw = prepared.checks.get("format") == "prompt" and data.prompt_template is None
    cfg = DataConfig(source=str(source), format="prompt", prompt_field="prompt", reference_field="references",
                     train_split="train", eval_split="test", prompt_template=None if stored_raw else "{prompt}",
                     use_chat_template=data.use_chat_template,
                     allow_eval_overlap=True)  # overlaps are curation's to remove (decontaminate), checked after it
    return prepare(cfg, str(source), prepared.teacher_dir, prepared.student_dir, out_dir / "union", max_new_tokens)


def teacher_self_scores(teacher_dir: str, rows: list[dict[str, Any]], batch_size: int = 32) -> dict[str, float]:
    """example_id -> the teacher's mean log-probability (nats) of each prompt token after the first
    (transformers, float32, teacher forcing of the prompt ids)."""
    import torch

    from tasks.models import load_causal_lm

    model = load_causal_lm(teacher_dir).eval()
    scores: dict[str, float] = {}
    with torch.no_grad():
        for a in range(0, len(rows), batch_size):
            chunk = [r for r in rows[a : a + batch_size]]
            width = max(len(r["prompt_ids"]) for r in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            attn = torch.zeros_like(ids)
            for b, r in enumerate(chunk):
                ids[b, : len(r["prompt_ids"])] = torch.tensor(r["prompt_ids"])
                attn[b, : len(r["prompt_ids"])] = 1
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=attn).logits[:, :-1].float(), -1)
            tok = logp.gather(-1, ids[:, 1:, None])[..., 0] * attn[:, 1:]
            counts = attn[:, 1:].sum(1).clamp(min=1)
            for r, total, n in zip(chunk, tok.sum(1).tolist(), counts.tolist()):
                scores[r["example_id"]] = total / n
    return scores


def answer_token(tokenizer, text: str, field: str) -> int:
    """The first token id of an answer word (curate.judge_yes / judge_no)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise CurationError(f"curate.{field} {text!r} encodes to no tokens with the teacher's tokenizer; pick another word")
    return int(ids[0])


def teacher_judgements(teacher_dir: str, rows: list[dict[str, Any]], cfg: CurateConfig, batch_size: int = 16) -> dict[str, float]:
    """example_id -> p(yes) / (p(yes) + p(no)) at the teacher's next token after curate.judge_template rendered with
    the row's prompt (transformers; on a GPU in bfloat16 when there is one, else float32 on CPU; left-padded batches
    so every row's last token is at the same place; only the last position's logits are computed)."""
    import torch

    from tasks.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(teacher_dir)
    bos = tokenizer.bos_token
    yes, no = answer_token(tokenizer, cfg.judge_yes, "judge_yes"), answer_token(tokenizer, cfg.judge_no, "judge_no")
    if yes == no:
        raise CurationError(f"curate.judge_yes {cfg.judge_yes!r} and judge_no {cfg.judge_no!r} start with the same token "
                            f"({yes}); pick answers that differ in their first token")
    cuda = torch.cuda.is_available()
    model = load_causal_lm(teacher_dir, dtype=torch.bfloat16 if cuda else None).to("cuda" if cuda else "cpu").eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    judged: dict[str, float] = {}
    with torch.no_grad():
        for a in range(0, len(rows), batch_size):
            chunk = rows[a : a + batch_size]
            texts = [cfg.judge_template.format(prompt=r["prompt"]) for r in chunk]
            # a template that writes the BOS itself (chat markup) gets no second one
            encoded = [tokenizer(t, add_special_tokens=not (bos and t.startswith(bos)))["input_ids"] for t in texts]
            width = max(len(e) for e in encoded)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            attn = torch.zeros_like(ids)
            for b, e in enumerate(encoded):
                ids[b, width - len(e):] = torch.tensor(e)
                attn[b, width - len(e):] = 1
            positions = (attn.cumsum(-1) - 1).clamp(min=0)  # left padding: every row's positions start at 0
            logits = model(input_ids=ids.to(device), attention_mask=attn.to(device), position_ids=positions.to(device),
                           logits_to_keep=1).logits[:, -1].float().cpu()
            pair = torch.log_softmax(logits, -1)[:, [yes, no]]
            for r, p_yes in zip(chunk, torch.softmax(pair, -1)[:, 0].tolist()):
                judged[r["example_id"]] = p_yes
    return judged


def run(cfg: CurateConfig, inputs: CurateInputs, ctx: StageContext) -> CuratedPrompts:
    prepared = inputs.prepared
    rows, n_original = union_rows(prepared, inputs.expanded)
    union = tokenise_like_prepare(rows, prepared, inputs.data, inputs.max_new_tokens, ctx.out_dir)
    union_path = union["splits"]["train"]["path"]
    scores = teacher_self_scores(prepared.teacher_dir, read_prompts(union_path)) if cfg.uses_self_score else None
    # the judge sees only what the cheaper filters before it kept
    judged = (lambda rows: teacher_judgements(prepared.teacher_dir, rows, cfg)) if cfg.judge_template else None
    manifest = run_curate_stage(union_path, ctx.out_dir / "curated", cfg, heldout=prepared.eval.path, scores=scores,
                                judged=judged)
    kept = read_prompts(manifest.output)
    eval_prompts = [r["prompt"] for r in read_prompts(prepared.eval.path)]
    leaked = seen_in(eval_prompts, [r["prompt"] for r in kept])
    if leaked and not inputs.data.allow_eval_overlap:
        raise CurationError(f"{manifest.output}: {leaked} evaluation prompt(s) are among the curated training prompts; turn "
                            "curate.decontaminate on (or lower curate.decontaminate_threshold), or set data.allow_eval_overlap")
    original_ids = {r["id"] for r in rows[:n_original]}
    kept_original = sum(r["example_id"] in original_ids for r in kept)
    if not kept:
        raise CurationError(f"curation kept none of the {len(rows)} training prompts ({manifest.removed_by()}); loosen the curate filters")
    ctx.log(f"curate: kept {len(kept)} of {len(rows)} prompts ({kept_original} original, {len(kept) - kept_original} expanded); "
            f"removed by filter: {manifest.removed_by()}")
    return CuratedPrompts(
        key=ctx.key, train=SplitFile(path=manifest.output, rows=len(kept), sha256=sha256_file(Path(manifest.output))),
        manifest=str(ctx.out_dir / "curated" / "manifest.json"), rows_in=len(rows), rows_out=len(kept),
        original_rows=n_original, expanded_rows=len(rows) - n_original, kept_original=kept_original,
        kept_expanded=len(kept) - kept_original, removed_by=manifest.removed_by(),
    )


def _key_parts(cfg: CurateConfig, inputs: CurateInputs) -> dict[str, Any]:
    data = inputs.data
    parts = {"train": inputs.prepared.train.sha256, "eval": inputs.prepared.eval.sha256,
             "expanded": inputs.expanded.key if inputs.expanded else None, "use_chat_template": data.use_chat_template,
             "allow_eval_overlap": data.allow_eval_overlap, "max_new_tokens": inputs.max_new_tokens,
             "tokenizer": inputs.prepared.tokenizer_hash}
    if cfg.uses_self_score or cfg.judge_template is not None:
        parts["teacher_model"] = model_identity(inputs.prepared.teacher_dir)
    return parts


def _intact(output: CuratedPrompts) -> bool:
    path = Path(output.train.path)
    return path.exists() and Path(output.manifest).exists() and sha256_file(path) == output.train.sha256


STAGE = StageSpec(name="curate", version=1, output_type=CuratedPrompts, run=run, key_parts=_key_parts, verify=_intact,
                  describe="curated prompts")
