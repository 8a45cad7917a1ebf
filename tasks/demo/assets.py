"""Build (once) and reuse the demo's dataset, tokenizer, trained teacher and untrained student."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from storage.atomic import read_json, sha256_json, write_json
from tasks.demo import models, task
from tasks.models import save_pretrained_atomic

log = logging.getLogger(__name__)

# Bump when the demo's recipe changes, so cached assets are rebuilt.
RECIPE_VERSION = 2
TEACHER_SHAPE = dict(hidden=256, layers=4, heads=4)
STUDENT_SHAPE = dict(hidden=128, layers=2, heads=2)


def demo_paths(data_dir: Path) -> dict[str, Path]:
    root = Path(data_dir) / "demo"
    return {
        "root": root,
        "dataset": root / "dataset",
        "tokenizer": root / "tokenizer",
        "teacher": root / "teacher",
        "student": root / "student-init",
        "stamp": root / "assets.json",
    }


def ensure_demo_assets(data_dir: Path, seed: int = 0, teacher_steps: int = 1500, log_fn=log.info) -> dict[str, str]:
    """Return paths of the demo assets, building whatever is missing or stale."""
    paths = demo_paths(data_dir)
    recipe = {"version": RECIPE_VERSION, "seed": seed, "teacher_steps": teacher_steps, "teacher": TEACHER_SHAPE, "student": STUDENT_SHAPE}
    key = sha256_json(recipe)
    if paths["stamp"].exists() and read_json(paths["stamp"]).get("key") == key and all(
        (paths[p] / "config.json").exists() for p in ("teacher", "student")
    ):
        return {name: str(p) for name, p in paths.items()}

    start = time.time()
    splits = task.generate(seed=seed)
    task.write_jsonl(splits, paths["dataset"])
    corpus = [ex.prompt for ex in splits["train"]] + [r for ex in splits["train"] for r in ex.references]
    tokenizer = models.train_tokenizer(corpus, paths["tokenizer"])
    log_fn(f"demo: dataset and tokenizer ready (vocab {len(tokenizer)})")

    torch.manual_seed(seed)
    student = LlamaForCausalLM(models.llama_config(tokenizer, **STUDENT_SHAPE))
    save_pretrained_atomic(student, tokenizer, paths["student"])

    torch.manual_seed(seed + 1)
    teacher = LlamaForCausalLM(models.llama_config(tokenizer, **TEACHER_SHAPE))
    from tasks.demo.train_teacher import train_sft

    train_sft(teacher, tokenizer, splits["train"], steps=teacher_steps, seed=seed, log_fn=log_fn)
    save_pretrained_atomic(teacher, tokenizer, paths["teacher"])
    write_json(paths["stamp"], {"key": key, "recipe": recipe, "build_seconds": round(time.time() - start, 1)})
    log_fn(f"demo: assets built in {time.time() - start:.0f}s under {paths['root']}")
    return {name: str(p) for name, p in paths.items()}
