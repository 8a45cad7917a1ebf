"""A chat (`messages`, multi-turn) and an Alpaca dataset through `stillhouse run`, unchanged (issue 18), and the
console a person reads while it runs.

The whole flow (real vLLM teacher and evaluator, Ray training, the session's Prefect server) on the tiny model
with a chat template; the files are written as users have them and no format is configured (`data.format: auto`).
Checked in what the flow wrote: the detected layout, the teacher's prompts token for token (history rendered with
the chat template, the Alpaca fields in their template), and a promoted, registered student. Checked on the
console: at most 80 lines, no line twice, no traceback, a start and an end line per stage, the summary, and the
run.json path alone on stdout as the last line (tests/test_console.py has the console's unit tests).
"""

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def chat_student(tiny_student, tmp_path_factory):
    """The tiny student with a chat template in its tokenizer (a copy; the weights are the same safetensors)."""
    from tasks.models import load_tokenizer

    folder = tmp_path_factory.mktemp("chat") / "student"
    shutil.copytree(tiny_student, folder)
    tok = load_tokenizer(str(folder))
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)
    return str(folder)


def demo_pairs(n_train: int, n_test: int) -> tuple[list, list]:
    from tasks.demo import task as demo_task

    splits = demo_task.generate(sizes={"train": n_train, "validation": 1, "test": 4 * n_test})
    seen = {ex.prompt for ex in splits["train"]}
    return splits["train"], [ex for ex in splits["test"] if ex.prompt not in seen][:n_test]


def as_messages(examples, previous, split: str) -> list[dict]:
    """Two user turns each: an earlier exchange (another example) kept as history, then the question."""
    rows = []
    for i, (ex, prev) in enumerate(zip(examples, previous)):
        rows.append({"id": f"{split}-c{i}", "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": prev.prompt}, {"role": "assistant", "content": prev.references[0]},
            {"role": "user", "content": ex.prompt}, {"role": "assistant", "content": ex.references[0]}]})
    return rows


def as_alpaca(examples) -> list[dict]:
    return [{"instruction": "Answer the question.", "input": ex.prompt, "output": ex.references[0]} if i % 2 else
            {"instruction": ex.prompt, "input": "", "output": ex.references[0]} for i, ex in enumerate(examples)]


def run_cli(config: dict, tmp_path: Path, capsys) -> dict:
    """`stillhouse run --config` in this process (the session's Prefect server and Ray), environment restored;
    checks the console it printed and returns run.json."""
    import yaml

    from flows.cli import main as cli_main

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    saved = dict(os.environ)
    try:
        code = cli_main(["run", "--config", str(path), "--no-progress"])
    finally:
        os.environ.clear()
        os.environ.update(saved)
    captured = capsys.readouterr()
    (tmp_path / "console.txt").write_text(captured.err + captured.out)  # for a look after the test
    assert code == 0, captured.err[-3000:]
    check_console(captured)
    return json.loads(Path(captured.out.strip()).read_text())


def check_console(captured) -> None:
    console = (captured.err + captured.out).splitlines()
    run_json = Path(captured.out.strip())
    assert captured.out == f"{run_json}\n" and console[-1] == str(run_json), "stdout is the run.json path alone, the last line"
    assert len(console) <= 80, "\n".join(console)
    repeated = [line for line, n in Counter(line for line in console if line.strip()).items() if n > 1]
    assert not repeated, repeated
    assert "Traceback" not in captured.err
    for stage in ("prepare-data", "teacher-labels", "train-student", "evaluate", "gate-and-promote"):
        assert any(stage in line and " started" in line for line in console), stage
        assert any(stage in line and (" done in " in line or " reused in " in line) for line in console), stage
    assert any(line.startswith("decision: ") for line in console) and "  exact_match" in "\n".join(console)
    log = (run_json.parent / "run.log").read_text()
    assert "TeacherReplica" in log and "train: step 2/2" in log, "the workers' lines are in the run log"


def label_rows(manifest: str) -> list[dict]:
    meta = json.loads(Path(manifest).read_text())
    return [row for shard in meta["shards"] for row in
            pq.read_table(Path(manifest).parent / shard["path"], columns=["example_id", "prompt_ids"]).to_pylist()]


@pytest.mark.parametrize("layout", ["messages", "alpaca"])
def test_dataset_runs_through_stillhouse_run_unchanged(layout, chat_student, tmp_path, capsys, prefect_server, ray_local):
    from tasks.models import load_tokenizer
    from tasks.prompting import chat_prompt

    train, test = demo_pairs(32, 8)
    rows = {"messages": lambda: {"train": as_messages(train, train[1:] + train[:1], "train"),
                             "test": as_messages(test, train[:len(test)], "test")},
            "alpaca": lambda: {"train": as_alpaca(train), "test": as_alpaca(test)}}[layout]()
    data = tmp_path / "dataset"
    data.mkdir()
    for split, items in rows.items():
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    engine = {"max_model_len": 256}
    run = run_cli({
        "data_dir": str(tmp_path / "data"), "data": {"source": str(data)},
        "teacher": {"model": chat_student, "top_k": 8, "max_new_tokens": 8, "engine": engine},
        "train": {"student": chat_student, "steps": 2, "batch_size": 4},
        "eval": {"max_new_tokens": 8, "engine": engine},
        "promotion": {"gate": {"rules": [{"metric": "exact_match", "kind": "absolute", "threshold": 0.0}]}},
    }, tmp_path, capsys)

    assert run["status"] == "completed" and run["data_checks"]["format"] == layout
    assert run["decision"]["promoted"] is True and Path(run["student_checkpoint"]).is_dir()
    tok = load_tokenizer(chat_student)
    # What the teacher was given, token for token, for every held-out row.
    given = {r["example_id"]: r["prompt_ids"] for r in label_rows(run["heldout_labels_manifest"])}
    assert len(given) == len(rows["test"])
    for i, row in enumerate(rows["test"]):
        if layout == "messages":
            example_id, text = row["id"], chat_prompt(tok, row["messages"][:-1])  # the history, up to the last answer
            assert text.count("<|user|>") == 2 and row["messages"][1]["content"] in text
        else:
            # No id column: rows are numbered per split; the default template, the input left out when empty
            # (data.use_chat_template is off by default for alpaca).
            example_id = f"test-{i:07d}"
            text = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
        assert tok.decode(given[example_id], skip_special_tokens=True) == text, (layout, i)
    # The references scored are the final assistant turns / the outputs.
    metrics = json.loads(Path(run["metrics_file"]).read_text())
    assert metrics["num_examples"] == len(rows["test"])
