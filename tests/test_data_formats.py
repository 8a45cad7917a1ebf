"""Dataset layouts (prompt, messages, alpaca) and sources (folders, shards, globs) through the prepare stage."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.config import DataConfig
from tasks.data import DataError, prepare, read_prompts
from tasks.demo.models import llama_config, train_tokenizer
from tasks.models import load_tokenizer

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TEXTS = ["What is the capital of France?", "Paris is the capital.", "Tell me more about it.", "Summarise: red fox jumps",
         "It is a large city.", "Translate hello", "Bonjour", "You are helpful."] * 20


@pytest.fixture(scope="module")
def chat_models(tmp_path_factory):
    """Teacher/student folders (config + tokenizer, no weights) whose tokenizer has a chat template, and one without."""
    root = tmp_path_factory.mktemp("chat_models")
    dirs = {}
    for name, template in (("chat", CHAT_TEMPLATE), ("plain", None)):
        tok = train_tokenizer(TEXTS, root / name, vocab_size=300)
        if template:
            tok.chat_template = template
            tok.save_pretrained(root / name)
        llama_config(tok, hidden=64, layers=1, heads=1).save_pretrained(root / name)
        dirs[name] = str(root / name)
    return dirs


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def conversation(i: int, turns: int) -> dict:
    msgs = [{"role": "system", "content": "You are helpful."}]
    for t in range(turns):
        msgs += [{"role": "user", "content": f"Question {i}.{t}?"}, {"role": "assistant", "content": f"Answer {i}.{t}."}]
    return {"id": f"c{i}", "messages": msgs}


def run(cfg, source, dirs, out, **kw):
    return prepare(cfg, str(source), dirs["chat"], dirs["chat"], out, 8, **kw)


def test_messages_multi_turn_prompt_is_history_and_reference_is_last_assistant_turn(chat_models, tmp_path):
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", [conversation(i, 1 + i % 3) for i in range(6)])
    write_jsonl(data / "test.jsonl", [conversation(100 + i, 3) for i in range(2)])
    manifest = run(DataConfig(), data, chat_models, tmp_path / "out")
    assert manifest["checks"]["format"] == "messages"
    row = read_prompts(manifest["splits"]["test"]["path"])[0]
    tok = load_tokenizer(chat_models["chat"])
    expected = ("<|system|>You are helpful.\n<|user|>Question 100.0?\n<|assistant|>Answer 100.0.\n<|user|>Question 100.1?\n"
                "<|assistant|>Answer 100.1.\n<|user|>Question 100.2?\n<|assistant|>")
    assert row["prompt"] == expected                      # earlier turns kept, generation prompt added
    assert row["references"] == ["Answer 100.2."]          # the last assistant turn
    assert row["prompt_ids"] == tok(expected, add_special_tokens=False)["input_ids"]
    assert row["example_id"] == "c100"


def test_messages_without_final_assistant_turn_has_no_reference(chat_models, tmp_path):
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", [{"messages": [{"role": "user", "content": "Hi?"}]}])
    write_jsonl(data / "test.jsonl", [{"messages": [{"role": "user", "content": "Bye?"}]}])
    manifest = run(DataConfig(format="messages"), data, chat_models, tmp_path / "out")
    assert read_prompts(manifest["splits"]["train"]["path"])[0]["references"] == []


def test_messages_need_a_chat_template(chat_models, tmp_path):
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", [conversation(0, 1)])
    write_jsonl(data / "test.jsonl", [conversation(1, 1)])
    with pytest.raises(DataError, match="has no chat template"):
        prepare(DataConfig(), str(data), chat_models["plain"], chat_models["plain"], tmp_path / "out", 8)


def test_bad_turn_named_by_row_and_turn(chat_models, tmp_path):
    data = tmp_path / "data"
    bad = conversation(1, 2)
    bad["messages"][2] = {"role": "user", "content": None}
    write_jsonl(data / "train.jsonl", [conversation(0, 1), bad])
    write_jsonl(data / "test.jsonl", [conversation(5, 1)])
    with pytest.raises(DataError, match=r"train.jsonl row 1 \(line 2\): field 'messages' turn 2"):
        run(DataConfig(), data, chat_models, tmp_path / "out")


def test_alpaca_default_template_with_and_without_input(chat_models, tmp_path):
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", [{"instruction": "Translate hello", "input": "", "output": "Bonjour"},
                                       {"instruction": "Summarise", "input": "red fox jumps", "output": "fox"}])
    write_jsonl(data / "test.jsonl", [{"instruction": "Tell me more", "input": "Paris", "output": "A city."}])
    manifest = run(DataConfig(), data, chat_models, tmp_path / "out")
    assert manifest["checks"]["format"] == "alpaca"
    rows = read_prompts(manifest["splits"]["train"]["path"])
    assert [r["prompt"] for r in rows] == ["Translate hello", "Summarise\n\nred fox jumps"]
    assert [r["references"] for r in rows] == [["Bonjour"], ["fox"]]


def test_alpaca_with_chat_template_and_named_template(chat_models, tmp_path):
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", [{"instruction": "Summarise", "input": "red fox", "output": "fox"}])
    write_jsonl(data / "test.jsonl", [{"instruction": "Translate", "input": "hello", "output": "Bonjour"}])
    cfg = DataConfig(use_chat_template=True, prompt_template="Task: {instruction}\nText: {input}")
    manifest = run(cfg, data, chat_models, tmp_path / "out")
    row = read_prompts(manifest["splits"]["test"]["path"])[0]
    tok = load_tokenizer(chat_models["chat"])
    assert row["prompt"] == "Task: Translate\nText: hello"
    assert row["prompt_ids"] == tok("<|user|>Task: Translate\nText: hello\n<|assistant|>", add_special_tokens=False)["input_ids"]


def test_template_placeholder_must_be_a_column(chat_models, tmp_path):
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", [{"question": "Q?", "references": ["A"]}])
    write_jsonl(data / "test.jsonl", [{"question": "R?", "references": ["B"]}])
    ok = run(DataConfig(prompt_template="Q: {question}\nA:"), data, chat_models, tmp_path / "o1")
    assert read_prompts(ok["splits"]["train"]["path"])[0]["prompt"] == "Q: Q?\nA:"
    with pytest.raises(DataError, match=r"field 'context' \(data.prompt_template\) missing; the columns are"):
        run(DataConfig(prompt_template="{context}\n{question}"), data, chat_models, tmp_path / "o2")


def test_shards_and_mixed_file_types_in_a_folder(chat_models, tmp_path):
    data = tmp_path / "data"
    write_jsonl(data / "train-00000-of-00002.jsonl", [{"prompt": f"p{i}", "references": ["a"]} for i in range(5)])
    table = pa.Table.from_pylist([{"prompt": f"q{i}", "references": ["b"]} for i in range(4)])
    pq.write_table(table, data / "train-00001-of-00002.parquet")
    write_jsonl(data / "test" / "part-0.jsonl", [{"prompt": "t0", "references": ["c"]}])
    manifest = run(DataConfig(), data, chat_models, tmp_path / "out", batch_rows=2)
    assert manifest["splits"]["train"]["rows"] == 9 and manifest["splits"]["test"]["rows"] == 1
    assert [r["example_id"] for r in read_prompts(manifest["splits"]["train"]["path"])][-1] == "train-0000008"


def test_glob_source_with_eval_fraction_is_deterministic_and_disjoint(chat_models, tmp_path):
    rows = [{"prompt": f"Prompt number {i}", "references": ["x"]} for i in range(200)]
    rows += [{"prompt": f"prompt NUMBER {i}!", "references": ["x"]} for i in range(20)]  # same prompts, other spelling
    for k in range(3):
        write_jsonl(tmp_path / "pool" / f"part{k}.jsonl", rows[k::3])
    cfg = DataConfig(eval_fraction=0.2)
    a = run(cfg, tmp_path / "pool" / "*.jsonl", chat_models, tmp_path / "a")
    b = run(cfg, tmp_path / "pool" / "*.jsonl", chat_models, tmp_path / "b")
    assert a["splits"]["test"]["sha256"] == b["splits"]["test"]["sha256"]
    assert a["splits"]["train"]["rows"] + a["splits"]["test"]["rows"] == 220
    assert 20 <= a["splits"]["test"]["rows"] <= 70
    assert a["checks"]["eval_seen_in_train"] == 0 and a["checks"]["split_by"] == "eval_fraction"
    assert a["checks"]["train_duplicates"] + a["checks"]["eval_duplicates"] == 20


def test_references_mixing_strings_and_lists_keep_their_text(chat_models, tmp_path):
    """datasets stores a column of mixed JSON types as JSON text and reads "12" back as 12; such files are read line by line."""
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", [{"prompt": "Add 5 and 7", "references": "12"}, {"prompt": "Count", "references": ["8", "eight"]},
                                       {"prompt": "None", "references": None}])
    write_jsonl(data / "test.jsonl", [{"prompt": "Add 1 and 1", "references": "2"}])
    manifest = run(DataConfig(), data, chat_models, tmp_path / "out")
    assert [r["references"] for r in read_prompts(manifest["splits"]["train"]["path"])] == [["12"], ["8", "eight"], []]


def test_prompt_field_under_the_default_template_and_stored_prompt(chat_models, tmp_path):
    """{prompt} in the default template reads data.prompt_field; the shard stores the prompt without the answer cue."""
    from tasks.data import load_rows

    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", [{"question": "Q one?", "answer": "A"}, {"question": "Q one?", "answer": "A", "id": "x"}])
    write_jsonl(data / "test.jsonl", [{"question": "Q two?", "answer": "B"}])
    manifest = run(DataConfig(prompt_field="question", reference_field="answer"), data, chat_models, tmp_path / "out")
    row = read_prompts(manifest["splits"]["test"]["path"])[0]
    tok = load_tokenizer(chat_models["chat"])
    assert (row["prompt"], row["references"], row["example_id"]) == ("Q two?", ["B"], "test-0000000")
    assert row["prompt_ids"] == tok("Q two?\nAnswer:")["input_ids"]
    assert manifest["checks"]["train_duplicates"] == 1
    assert [r["question"] for r in load_rows(str(data), "train")] == ["Q one?", "Q one?"]
