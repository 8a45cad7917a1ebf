"""Built-in demo tasks: evaluation prompts unseen in training, several answer forms, the base-student corpus."""

import pytest

from tasks.demo import task
from tasks.demo.assets import demo_model_dir
from tasks.demo.pretrain import corpus
from tasks.textnorm import duplicate_counts, normalise_prompt, seen_in, split_report


def test_normalise_prompt():
    assert normalise_prompt("What is 3 plus 5?") == normalise_prompt("  what IS 3   plus 5 ") == "what is 3 plus 5"
    assert normalise_prompt("Uppercase: red fox") == "uppercase red fox"
    assert normalise_prompt("Say \u201chi\u201d\u2026") == "say hi"


def test_duplicate_counts_and_seen():
    counts = duplicate_counts(["A b?", "a B", "c", "c.", "c"])
    assert (counts.rows, counts.distinct, counts.duplicate_rows, counts.max_repeats) == (5, 2, 3, 3)
    assert seen_in(["What is 1 plus 2?", "new one"], ["what is 1 plus 2"]) == 1


@pytest.mark.parametrize("name", task.TASKS)
def test_evaluation_prompts_are_unseen_in_training(name):
    splits = task.generate(task=name)  # the generator's default sizes
    assert {s: len(rows) for s, rows in splits.items()} == task.DEFAULT_SIZES
    report = split_report({s: [ex.prompt for ex in rows] for s, rows in splits.items()})
    assert report["validation"]["seen_in_train"] == 0 and report["test"]["seen_in_train"] == 0
    assert report["train"]["distinct"] >= 1500  # the old demo had 1085 distinct training prompts
    assert all(ex.response in ex.references and len(ex.references) >= 2 for rows in splits.values() for ex in rows)


def test_families_and_mix():
    families = {name: {ex.family for ex in task.generate(task=name)["train"]} for name in task.TASKS}
    assert families["mix"] == set(task.FAMILIES) and families["qa"] == {"qa"}
    classify = task.generate(task="classify", sizes={"train": 200, "validation": 5, "test": 5})["train"]
    assert {ex.references[0] for ex in classify} == {"positive", "negative", "sports", "food", "weather", "music"}
    transform = task.generate(task="transform", sizes={"train": 200, "validation": 5, "test": 5})["train"]
    upper = next(ex for ex in transform if ex.task == "upper")
    assert upper.references[0] == upper.references[0].upper() and upper.references[0] in upper.prompt.upper()
    with pytest.raises(ValueError, match="demo task"):
        task.generate(task="nope")


def test_deterministic_per_seed_and_task():
    sizes = {"train": 50, "validation": 5, "test": 5}
    assert task.generate(seed=1, sizes=sizes, task="transform") == task.generate(seed=1, sizes=sizes, task="transform")
    assert task.generate(seed=1, sizes=sizes, task="transform") != task.generate(seed=2, sizes=sizes, task="transform")


@pytest.mark.parametrize("name", task.TASKS)
def test_base_corpus_is_statements_not_the_task(name):
    """The base student's corpus never holds a task prompt or the prompt format."""
    text = corpus(name, size=3000)
    splits = task.generate(task=name)
    prompts = {normalise_prompt(ex.prompt) for rows in splits.values() for ex in rows}
    assert not prompts & {normalise_prompt(t) for t in text}
    assert not any("Answer:" in t or t.endswith("?") for t in text)


def test_demo_student_names():
    assets = {"student_base": "/b", "student_random": "/r"}
    assert demo_model_dir("demo", assets) == "/b" and demo_model_dir("demo-random", assets) == "/r"
    assert demo_model_dir("/some/folder", assets) is None


def test_compare_plan_and_gap_closed():
    from flows.compare import METHODS, gap_closed, ordering, plan

    rows = plan("full", ["qa", "transform"])
    base = {r["method"] for r in rows if r["task"] == "transform" and r["init"] == "base" and r["lr"] is None}
    assert base == set(METHODS)
    assert {r["method"] for r in rows if r["init"] == "sft"} >= {"rkl", "skew_rkl", "akl", "ce"}
    assert {r["method"] for r in rows if r["init"] == "random"} >= {"fkl", "rkl", "akl", "ce"}
    run = lambda *em: {"runs": [{"exact_match": e} for e in em]}  # noqa: E731
    task = {"learning_rate": 3e-3, "teacher": {"exact_match": 0.9}, "runs": {
        "ce [base]": {"method": "ce", "init": "base", "learning_rate": 3e-3, **run(0.5, 0.5)},
        "fkl [base]": {"method": "fkl", "init": "base", "learning_rate": 3e-3, **run(0.7, 0.7)},
        "akl [base]": {"method": "akl", "init": "base", "learning_rate": 3e-3, **run(0.8, 0.8)},
        "rkl [base]": {"method": "rkl", "init": "base", "learning_rate": 3e-3, **run(0.1, 0.3)},
        "rkl [random]": {"method": "rkl", "init": "random", "learning_rate": 3e-3, **run(0.1)},
    }}
    assert abs(gap_closed(task, "fkl [base]") - 0.5) < 1e-9 and gap_closed(task, "rkl [random]") is None
    assert "holds" in ordering(task)[1] and ordering(task)[0].startswith("Ordering from base (exact match): akl")


def test_partial_comparison_runs_do_not_replace_the_committed_table():
    """A run of some tasks, methods or groups, or with other train settings, is restricted: its results go under the
    data folder unless --out says otherwise; the full grid writes docs/results."""
    from argparse import Namespace

    from flows.compare import GROUPS, TASKS, restricted

    full = dict(methods=None, train_set=[], groups=list(GROUPS), tasks=list(TASKS))
    assert not restricted(Namespace(**full))
    assert restricted(Namespace(**{**full, "methods": ["fkl"]}))
    assert restricted(Namespace(**{**full, "groups": ["main"]}))
    assert restricted(Namespace(**{**full, "train_set": ["packing=off"]}))
    assert restricted(Namespace(**{**full, "tasks": ["qa"]}))


def test_onpolicy_rows_take_a_learning_rate_factor():
    import argparse

    from flows.compare_onpolicy import op_config, row_name, split_row
    from tasks.config import TrainConfig

    assert split_row("gkd") == ("gkd", 1.0) and split_row("fkl@lr0.3x") == ("fkl", 0.3)
    assert row_name("minillm-no-mix@lr0.1x") == "minillm-no-mix@lr0.1x"
    for bad in ("nope", "gkd@0.3", "gkd@lrx", "gkd@lr-1x"):
        with pytest.raises(argparse.ArgumentTypeError):
            row_name(bad)
    args = argparse.Namespace(op_rounds=2, op_inner_epochs=1, op_prompts=8, op_max_new_tokens=4)
    train = TrainConfig()
    assert op_config("gkd@lr0.3x", args, train, 0).learning_rate == pytest.approx(0.3 * train.learning_rate)
    assert op_config("onpolicy_rkl-lr0.1x@lr0.3x", args, train, 0).learning_rate == pytest.approx(0.03 * train.learning_rate)
