"""Build (once) and reuse the demo's dataset, tokenizer, trained teacher and the two initial students.

One set of assets per task selection (`data.demo_task`: qa, transform, classify,
mix), each under `<data_dir>/demo/<task>/` and keyed by its recipe: a changed
recipe rebuilds that selection only.

Students (same 2 x 128 architecture and tokenizer):
- `student_base` (what `train.student: demo` means): pre-trained briefly as a
  language model on generated statements that are not the task's
  question -> answer pairs (tasks/demo/pretrain.py says which and why);
- `student_random` (`train.student: demo-random`): random initial weights.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from storage.atomic import read_json, sha256_json, write_json
from tasks.demo import models, pretrain, task
from tasks.demo.train_teacher import train_sft
from tasks.models import save_pretrained_atomic
from tasks.textnorm import split_report

log = logging.getLogger(__name__)

# Bump when the demo's recipe changes, so cached assets are rebuilt.
RECIPE_VERSION = 3
TEACHER_SHAPE = dict(hidden=256, layers=4, heads=4)
STUDENT_SHAPE = dict(hidden=128, layers=2, heads=2)
BASE_STEPS = 300            # LM pre-training steps of the base student
BASE_CORPUS_SIZE = 20000    # generated statements

# train.student values that name a demo student, and the asset each one means.
DEMO_STUDENTS = {"demo": "student_base", "demo-base": "student_base", "demo-random": "student_random"}


def demo_paths(data_dir: Path, task_name: str = "qa") -> dict[str, Path]:
    root = Path(data_dir) / "demo" / task_name
    paths = {
        "root": root,
        "dataset": root / "dataset",
        "tokenizer": root / "tokenizer",
        "teacher": root / "teacher",
        "student_base": root / "student-base",
        "student_random": root / "student-random",
        "stamp": root / "assets.json",
    }
    paths["student"] = paths["student_base"]
    return paths


def demo_model_dir(ref: str, assets: dict[str, str]) -> str | None:
    """The folder a demo model name means ('demo', 'demo-base', 'demo-random'), else None."""
    name = DEMO_STUDENTS.get(ref)
    return assets[name] if name else None


def ensure_demo_assets(data_dir: Path, seed: int = 0, teacher_steps: int = 1500, log_fn=log.info, task_name: str = "qa",
                       base_steps: int = BASE_STEPS) -> dict[str, str]:
    """Return paths of the demo assets for one task selection, building whatever is missing or stale.

    Keys: root, dataset, tokenizer, teacher, student (= student_base), student_base, student_random, stamp.
    """
    if task_name not in task.TASKS:
        raise ValueError(f"data.demo_task {task_name!r} is not one of {task.TASKS}")
    paths = demo_paths(data_dir, task_name)
    recipe = {"version": RECIPE_VERSION, "task": task_name, "seed": seed, "teacher_steps": teacher_steps, "teacher": TEACHER_SHAPE,
              "student": STUDENT_SHAPE, "base_steps": base_steps, "base_corpus": BASE_CORPUS_SIZE}
    key = sha256_json(recipe)
    out = {name: str(p) for name, p in paths.items()}
    if paths["stamp"].exists() and read_json(paths["stamp"]).get("key") == key and all(
        (paths[p] / "config.json").exists() for p in ("teacher", "student_base", "student_random")
    ):
        return out

    start = time.time()
    splits = task.generate(seed=seed, task=task_name)
    task.write_jsonl(splits, paths["dataset"])
    statements = pretrain.corpus(task_name, BASE_CORPUS_SIZE, seed)
    texts = [ex.prompt for ex in splits["train"]] + [r for ex in splits["train"] for r in ex.references] + statements
    tokenizer = models.train_tokenizer(texts, paths["tokenizer"])
    report = split_report({name: [ex.prompt for ex in rows] for name, rows in splits.items()})
    log_fn(f"demo[{task_name}]: dataset and tokenizer ready (vocab {len(tokenizer)}); prompts {report}")

    torch.manual_seed(seed)
    student = LlamaForCausalLM(models.llama_config(tokenizer, **STUDENT_SHAPE))
    save_pretrained_atomic(student, tokenizer, paths["student_random"])
    base_loss = pretrain.pretrain_lm(student, tokenizer, statements, steps=base_steps, seed=seed, log_fn=log_fn)
    save_pretrained_atomic(student, tokenizer, paths["student_base"])

    torch.manual_seed(seed + 1)
    teacher = LlamaForCausalLM(models.llama_config(tokenizer, **TEACHER_SHAPE))
    train_sft(teacher, tokenizer, splits["train"], steps=teacher_steps, seed=seed, log_fn=log_fn)
    save_pretrained_atomic(teacher, tokenizer, paths["teacher"])
    write_json(paths["stamp"], {"key": key, "recipe": recipe, "prompts": report, "base_lm_loss": round(base_loss, 4),
                                "build_seconds": round(time.time() - start, 1)})
    log_fn(f"demo[{task_name}]: assets built in {time.time() - start:.0f}s under {paths['root']}")
    return out


SMALL_TEACHER_SHAPE = dict(hidden=128, layers=2, heads=2)
SMALL_TEACHER = "demo-small"  # teacher.model / teachers[].model name of the demo's second, smaller teacher


def ensure_small_teacher(data_dir: Path, seed: int = 0, teacher_steps: int = 1500, log_fn=log.info,
                         task_name: str = "qa") -> str:
    """The demo's second teacher (2 x 128, trained like the main one for half its steps), built once beside the
    task's other assets with its own stamp, so the main assets' recipe is unchanged. Returns its folder."""
    assets = ensure_demo_assets(data_dir, seed=seed, teacher_steps=teacher_steps, log_fn=log_fn, task_name=task_name)
    root = Path(assets["root"])
    target, stamp = root / "teacher-small", root / "teacher-small.json"
    steps = max(1, teacher_steps // 2)
    recipe = {"version": 1, "task": task_name, "seed": seed, "steps": steps, "shape": SMALL_TEACHER_SHAPE,
              "assets": read_json(Path(assets["stamp"]))["key"]}
    key = sha256_json(recipe)
    if stamp.exists() and read_json(stamp).get("key") == key and (target / "config.json").exists():
        return str(target)
    from tasks.models import load_tokenizer

    start = time.time()
    tokenizer = load_tokenizer(assets["teacher"])  # the tokenizer exactly as the main teacher saved it
    splits = task.generate(seed=seed, task=task_name)
    torch.manual_seed(seed + 2)
    model = LlamaForCausalLM(models.llama_config(tokenizer, **SMALL_TEACHER_SHAPE))
    train_sft(model, tokenizer, splits["train"], steps=steps, seed=seed + 2, log_fn=log_fn)
    save_pretrained_atomic(model, tokenizer, target)
    write_json(stamp, {"key": key, "recipe": recipe, "build_seconds": round(time.time() - start, 1)})
    log_fn(f"demo[{task_name}]: small teacher built in {time.time() - start:.0f}s at {target}")
    return str(target)
