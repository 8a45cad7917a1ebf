"""Expansion: the teacher writes new prompts from seed prompts (few-shot), with lineage.

Each request shows `shots` seed prompts, sampled without replacement from the seeds by a
generator seeded from (seed, round), then asks for one more; the teacher samples
`samples_per_request` completions at `temperature`/`top_p`, each stopping at the first
newline, with a per-request sampling seed. From each completion the first non-empty line
is the new instruction (a repeated `example_prefix` is stripped). Rejected, and counted in
the manifest: empty outputs, outputs identical (after `tasks.curate.filters.normalise`) to
a seed, and outputs identical to an earlier accepted one. Rounds continue until
`num_prompts` are accepted or `max_rounds` is reached.

Output, under `out_dir`: `prompts.parquet` (the prompts-table columns of tasks/data.py
PROMPT_SCHEMA — example_id, prompt, prompt_ids, references (empty: the teacher labels them
later) — plus lineage: seed_ids, teacher, teacher_hash, sampling (JSON), generation_seed,
round, raw_output), then `manifest.json`. Curate the output (tasks/curate, with the
held-out prompts for decontamination) before labelling it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage.atomic import sha256_file, sha256_json, write_json, write_parquet
from storage.errors import UserError
from tasks.curate.filters import normalise
from tasks.expand.config import ExpandConfig
from tasks.identity import model_content_hash
from tasks.prompting import DEFAULT_TEMPLATE, format_prompt

OUTPUT_NAME = "prompts.parquet"
MANIFEST_NAME = "manifest.json"

EXPANDED_SCHEMA = pa.schema([
    ("example_id", pa.string()),
    ("prompt", pa.string()),
    ("prompt_ids", pa.list_(pa.int32())),
    ("references", pa.list_(pa.string())),
    ("seed_ids", pa.list_(pa.string())),
    ("teacher", pa.string()),
    ("teacher_hash", pa.string()),
    ("sampling", pa.string()),
    ("generation_seed", pa.int64()),
    ("round", pa.int32()),
    ("raw_output", pa.string()),
])


class ExpansionError(UserError):
    """Expansion cannot run as asked; the message names the setting or file."""


def fewshot_request(seeds: list[str], cfg: ExpandConfig) -> str:
    lines = [cfg.header, ""] + [f"{cfg.example_prefix}{' '.join(s.split())}" for s in seeds] + [cfg.example_prefix.rstrip()]
    return "\n".join(lines)


def parse_instruction(text: str, cfg: ExpandConfig) -> str:
    """The first non-empty line of a completion, with a repeated example prefix removed ('' if none)."""
    prefix = cfg.example_prefix.strip()
    for line in text.splitlines():
        line = line.strip()
        while prefix and line.startswith(prefix):
            line = line[len(prefix):].strip()
        if line:
            return line
    return ""


def request_seed(base: int, round_: int, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"expand:{base}:{round_}:{index}".encode()).digest()[:4], "little")


def choose_seeds(num_seeds: int, shots: int, base: int, round_: int, requests: int) -> list[list[int]]:
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(base) & 0xFFFFFFFF, int(round_)])))
    return [sorted(rng.choice(num_seeds, size=shots, replace=False).tolist()) for _ in range(requests)]


def expand_with_llm(llm, tokenizer, seeds: list[dict[str, Any]], cfg: ExpandConfig, *, teacher: str, teacher_hash: str,
                    prompt_template: str = DEFAULT_TEMPLATE, use_chat_template_for_prompts: bool = False,
                    log_fn=print) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run the rounds on a ready `vllm.LLM`; return (rows, stats). `seeds`: rows with example_id and prompt."""
    from vllm import SamplingParams

    if len(seeds) < cfg.shots:
        raise ExpansionError(f"expand.shots={cfg.shots} but only {len(seeds)} seed prompts; lower shots or give more seeds")
    seen_seed = {normalise(s["prompt"]) for s in seeds}
    accepted: set[str] = set()
    sampling = {"temperature": cfg.temperature, "top_p": cfg.top_p, "n": cfg.samples_per_request,
                "max_new_tokens": cfg.max_new_tokens, "stop": ["\n"]}
    sampling_json = json.dumps(sampling, sort_keys=True)
    stats = {"requests": 0, "completions": 0, "accepted": 0, "rejected_empty": 0, "rejected_seed_copy": 0,
             "rejected_duplicate": 0, "rounds": 0}
    rows: list[dict[str, Any]] = []
    for round_ in range(cfg.max_rounds):
        if len(rows) >= cfg.num_prompts:
            break
        stats["rounds"] += 1
        picks = choose_seeds(len(seeds), cfg.shots, cfg.seed, round_, cfg.requests_per_round)
        texts = [fewshot_request([seeds[i]["prompt"] for i in pick], cfg) for pick in picks]
        if cfg.use_chat_template:
            texts = [format_prompt(t, tokenizer=tokenizer, use_chat_template=True) for t in texts]
        requests = [{"prompt_token_ids": tokenizer(t, add_special_tokens=not cfg.use_chat_template)["input_ids"]} for t in texts]
        gen_seeds = [request_seed(cfg.seed, round_, r) for r in range(len(requests))]
        params = [SamplingParams(n=cfg.samples_per_request, temperature=cfg.temperature, top_p=cfg.top_p,
                                 max_tokens=cfg.max_new_tokens, stop=["\n"], seed=s) for s in gen_seeds]
        outputs = llm.generate(requests, params, use_tqdm=False)
        stats["requests"] += len(requests)
        for pick, gen_seed, out in zip(picks, gen_seeds, outputs):
            for completion in out.outputs:
                stats["completions"] += 1
                text = parse_instruction(completion.text, cfg)
                key = normalise(text)
                if not key:
                    stats["rejected_empty"] += 1
                elif key in seen_seed:
                    stats["rejected_seed_copy"] += 1
                elif key in accepted:
                    stats["rejected_duplicate"] += 1
                elif len(rows) < cfg.num_prompts:
                    accepted.add(key)
                    ids = tokenizer(format_prompt(text, prompt_template, tokenizer, use_chat_template_for_prompts),
                                    add_special_tokens=not use_chat_template_for_prompts)["input_ids"]
                    rows.append({
                        "example_id": f"gen-{cfg.seed}-{len(rows):06d}", "prompt": text, "prompt_ids": ids, "references": [],
                        "seed_ids": [str(seeds[i]["example_id"]) for i in pick], "teacher": teacher, "teacher_hash": teacher_hash,
                        "sampling": sampling_json, "generation_seed": gen_seed, "round": round_, "raw_output": completion.text,
                    })
        log_fn(f"expand: round {round_ + 1}: {len(rows)}/{cfg.num_prompts} prompts accepted")
    stats["accepted"] = len(rows)
    return rows, {**stats, "sampling": sampling}


def write_expansion(out_dir: str | Path, rows: list[dict[str, Any]], manifest: dict[str, Any]) -> dict[str, Any]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / OUTPUT_NAME
    write_parquet(pa.Table.from_pylist(rows, schema=EXPANDED_SCHEMA), path)
    manifest = {**manifest, "output": str(path), "rows": len(rows), "sha256": sha256_file(path)}
    write_json(out_dir / MANIFEST_NAME, manifest)
    return manifest


def read_seeds(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        raise ExpansionError(f"{path}: seed prompts table not found")
    table = pq.read_table(path)
    missing = [c for c in ("example_id", "prompt") if c not in table.column_names]
    if missing:
        raise ExpansionError(f"{path}: column(s) {', '.join(missing)} missing; pass a prompts table (tasks/data.py PROMPT_SCHEMA)")
    return table.select(["example_id", "prompt"]).to_pylist()


def run_expand_stage(teacher_dir: str, seeds_path: str | Path, out_dir: str | Path, cfg: ExpandConfig, engine_cfg, *,
                     teacher_model: str | None = None, prompt_template: str = DEFAULT_TEMPLATE,
                     use_chat_template_for_prompts: bool = False, llm=None, log_fn=print) -> dict[str, Any]:
    """Write teacher-generated prompts from the seed prompts table; returns the manifest.

    `engine_cfg`: the teacher's `EngineConfig` (tasks/config.py); `llm`: an engine already
    built (tests share one). Call under `if __name__ == "__main__":` or in an actor (vLLM spawns).
    """
    from tasks.models import load_tokenizer
    from tasks.teacher.engine import build_engine, vllm_version

    seeds = read_seeds(seeds_path)
    tokenizer = load_tokenizer(teacher_dir)
    if llm is None:
        llm = build_engine(teacher_dir, engine_cfg)
    teacher_hash = model_content_hash(teacher_dir)
    rows, stats = expand_with_llm(llm, tokenizer, seeds, cfg, teacher=teacher_model or teacher_dir, teacher_hash=teacher_hash,
                                  prompt_template=prompt_template, use_chat_template_for_prompts=use_chat_template_for_prompts,
                                  log_fn=log_fn)
    manifest = {
        "seeds": {"path": str(seeds_path), "rows": len(seeds), "sha256": sha256_file(Path(seeds_path))},
        "teacher": teacher_model or teacher_dir, "teacher_hash": teacher_hash, "vllm_version": vllm_version(),
        "config": cfg.model_dump(), "prompt_template": prompt_template, "use_chat_template_for_prompts": use_chat_template_for_prompts,
        "stats": stats, "complete": stats["accepted"] >= cfg.num_prompts,
        "key": sha256_json({"seeds": sha256_file(Path(seeds_path)), "teacher_hash": teacher_hash, "cfg": cfg.model_dump(),
                            "template": prompt_template, "chat": use_chat_template_for_prompts})[:16],
    }
    if not manifest["complete"]:
        log_fn(f"expand: only {stats['accepted']} of {cfg.num_prompts} prompts after {cfg.max_rounds} rounds "
               f"({stats['rejected_seed_copy']} seed copies, {stats['rejected_duplicate']} duplicates, {stats['rejected_empty']} empty)")
    return write_expansion(out_dir, rows, manifest)
