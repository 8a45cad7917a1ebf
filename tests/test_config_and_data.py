"""Bad input fails before any model loads, with a message naming the field or file."""

import json

import pytest
from pydantic import ValidationError

from tasks.config import PipelineConfig, load_config
from tasks.data import DataError, prepare
from tasks.demo import task
from tasks.demo.models import llama_config, train_tokenizer
from tasks.models import ModelError, resolve_model_dir


def test_unknown_setting_is_rejected():
    with pytest.raises(ValidationError, match="stepz"):
        PipelineConfig.model_validate({"train": {"stepz": 3}})


def test_gate_rule_with_unknown_metric_is_rejected():
    with pytest.raises(ValidationError, match="bleu"):
        PipelineConfig.model_validate({"promotion": {"gate": {"rules": [{"metric": "bleu", "kind": "absolute", "threshold": 1}]}}})


def test_wrong_type_names_field():
    with pytest.raises(ValidationError, match="top_k"):
        PipelineConfig.model_validate({"teacher": {"top_k": "many"}})


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 7\nteacher:\n  top_k: 8\n")
    cfg = load_config(path, {"train.objective": "akl", "data.max_train_examples": 5})
    assert (cfg.train.steps, cfg.teacher.top_k, cfg.train.objective, cfg.data.max_train_examples) == (7, 8, "akl", 5)


def test_prompt_template_needs_placeholder():
    with pytest.raises(ValidationError, match="prompt_template"):
        PipelineConfig.model_validate({"data": {"prompt_template": "no placeholder"}})


def test_demo_task_is_deterministic_and_multi_form():
    a, b = task.generate(seed=3, sizes={"train": 50, "validation": 5, "test": 5}), task.generate(seed=3, sizes={"train": 50, "validation": 5, "test": 5})
    assert a == b
    assert a != task.generate(seed=4, sizes={"train": 50, "validation": 5, "test": 5})
    assert all(ex.response in ex.references for ex in a["train"])
    assert sum(len(ex.references) > 1 for ex in a["train"]) == 50


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Two model folders with configs + tokenizers only (no weights needed for data checks)."""
    root = tmp_path_factory.mktemp("models")
    splits = task.generate(sizes={"train": 200, "validation": 5, "test": 20})
    texts = [ex.prompt for ex in splits["train"]] + [r for ex in splits["train"] for r in ex.references]
    dirs = {}
    for name, vocab in (("teacher", 400), ("student", 400), ("other", 300)):
        tok = train_tokenizer(texts, root / name, vocab_size=vocab)
        llama_config(tok, hidden=64, layers=1, heads=1).save_pretrained(root / name)
        dirs[name] = str(root / name)
    data = root / "data"
    task.write_jsonl(splits, data)
    return dirs, data


def test_prepare_writes_prompt_shards(tiny_models, tmp_path):
    from tasks.config import DataConfig
    from tasks.data import read_prompts

    dirs, data = tiny_models
    manifest = prepare(DataConfig(max_train_examples=10), str(data), dirs["teacher"], dirs["student"], tmp_path, 16)
    assert manifest["splits"]["train"]["rows"] == 10 and manifest["splits"]["test"]["rows"] == 20
    rows = read_prompts(manifest["splits"]["test"]["path"])
    assert rows[0]["prompt_ids"][0] == 1  # <s>
    assert rows[0]["references"] and json.loads((tmp_path / "manifest.json").read_text())["tokenizer_hash"]


def test_vocabulary_mismatch(tiny_models, tmp_path):
    from tasks.config import DataConfig

    dirs, data = tiny_models
    with pytest.raises(DataError, match="differs from student tokenizer"):
        prepare(DataConfig(), str(data), dirs["teacher"], dirs["other"], tmp_path, 16)


def test_empty_split_missing_field_and_bad_path(tiny_models, tmp_path):
    from tasks.config import DataConfig

    dirs, data = tiny_models
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "train.jsonl").write_text("")
    (empty / "test.jsonl").write_text("")
    with pytest.raises(DataError, match="'train' is empty"):
        prepare(DataConfig(), str(empty), dirs["teacher"], dirs["student"], tmp_path / "o", 16)
    with pytest.raises(DataError, match="field 'question'"):
        prepare(DataConfig(prompt_field="question"), str(data), dirs["teacher"], dirs["student"], tmp_path / "o", 16)
    with pytest.raises(DataError, match="does not exist"):
        prepare(DataConfig(), str(tmp_path / "nowhere"), dirs["teacher"], dirs["student"], tmp_path / "o", 16)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "train.jsonl").write_text((data / "train.jsonl").read_text())
    with pytest.raises(DataError, match="no test.jsonl"):
        prepare(DataConfig(), str(partial), dirs["teacher"], dirs["student"], tmp_path / "o", 16)


def test_prompt_longer_than_context(tiny_models, tmp_path):
    from tasks.config import DataConfig

    dirs, data = tiny_models
    with pytest.raises(DataError, match="more than the"):
        prepare(DataConfig(), str(data), dirs["teacher"], dirs["student"], tmp_path, 250)


def test_model_reference_checks(tiny_models, tmp_path):
    dirs, _ = tiny_models
    with pytest.raises(ModelError, match="no .safetensors"):
        resolve_model_dir(dirs["teacher"], None)
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model_dir(str(tmp_path / "missing"), None)
    (tmp_path / "m").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model_dir(str(tmp_path / "m"), None)


# --- bad input named by file, row and field; split leakage (issue 20) ------------------------------------------


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(prefix, n, **extra):
    return [{"id": f"{prefix}{i}", "prompt": f"What is {i} plus {prefix}?", "references": [str(i)], **extra} for i in range(n)]


def test_data_error_is_a_user_error():
    from storage.errors import UserError

    assert issubclass(DataError, UserError)


def test_data_config_checks_templates_and_splits():
    from tasks.config import DataConfig

    with pytest.raises(ValidationError, match="both 'train'"):
        DataConfig(eval_split="train")
    with pytest.raises(ValidationError, match="column names"):
        DataConfig(prompt_template="{} and {0}")
    with pytest.raises(ValidationError, match="not a valid template"):
        DataConfig(prompt_template="{instruction")
    with pytest.raises(ValidationError, match="eval_fraction"):
        DataConfig(eval_fraction=1.5)


def test_single_file_source_is_refused_with_the_fix(tiny_models, tmp_path):
    from tasks.config import DataConfig

    dirs, data = tiny_models
    with pytest.raises(DataError, match=r"train.jsonl is one file used for both splits.*data.eval_fraction"):
        prepare(DataConfig(), str(data / "train.jsonl"), dirs["teacher"], dirs["student"], tmp_path / "o", 16)
    with pytest.raises(DataError, match=r"one pattern \(3 files\) used for both splits"):
        prepare(DataConfig(), str(data / "*.jsonl"), dirs["teacher"], dirs["student"], tmp_path / "o", 16)
    manifest = prepare(DataConfig(eval_fraction=0.1, max_train_examples=30), str(data / "train.jsonl"), dirs["teacher"], dirs["student"], tmp_path / "o", 16)
    assert manifest["checks"]["eval_seen_in_train"] == 0 and manifest["splits"]["test"]["rows"] > 0


def test_same_file_for_both_splits_is_refused(tiny_models, tmp_path):
    from tasks.config import DataConfig

    dirs, data = tiny_models
    folder = tmp_path / "linked"
    folder.mkdir()
    (folder / "train.jsonl").write_text((data / "train.jsonl").read_text())
    (folder / "test.jsonl").symlink_to(folder / "train.jsonl")
    with pytest.raises(DataError, match="read for both the 'train' and the 'test' split"):
        prepare(DataConfig(), str(folder), dirs["teacher"], dirs["student"], tmp_path / "o", 16)


def test_eval_prompts_seen_in_training_are_refused_or_reported(tiny_models, tmp_path):
    from tasks.config import DataConfig

    dirs, _ = tiny_models
    data = tmp_path / "data"
    train = _rows("t", 10) + [{"id": "dup", "prompt": "What is 1 plus t?", "references": ["1"]}]
    _jsonl(data / "train.jsonl", train)
    seen = [{"id": f"e{i}", "prompt": f"what is {i}  PLUS t", "references": [str(i)]} for i in range(3)]  # normalised = seen
    _jsonl(data / "test.jsonl", seen + _rows("e", 4)[3:])
    with pytest.raises(DataError, match=r"3 of 4 evaluation prompts \('test'\) also appear among the training prompts \('train'.*allow_eval_overlap"):
        prepare(DataConfig(), str(data), dirs["teacher"], dirs["student"], tmp_path / "o", 16)
    assert not list((tmp_path / "o").glob("*.parquet")) and not (tmp_path / "o" / "manifest.json").exists()
    manifest = prepare(DataConfig(allow_eval_overlap=True), str(data), dirs["teacher"], dirs["student"], tmp_path / "o", 16)
    checks = manifest["checks"]
    assert (checks["eval_seen_in_train"], checks["train_duplicates"], checks["eval_duplicates"], checks["eval_ids_in_train"]) == (3, 1, 0, 0)
    assert checks["format"] == "prompt" and checks["eval_overlap_allowed"] is True


def test_eval_ids_in_training_are_refused(tiny_models, tmp_path):
    from tasks.config import DataConfig

    dirs, _ = tiny_models
    data = tmp_path / "data"
    _jsonl(data / "train.jsonl", _rows("a", 5))
    _jsonl(data / "test.jsonl", [{**r, "id": f"a{i}"} for i, r in enumerate(_rows("b", 2))])
    with pytest.raises(DataError, match=r"2 of 2 evaluation rows \('test'\) have an 'id' that is also a training id \('train'\)"):
        prepare(DataConfig(), str(data), dirs["teacher"], dirs["student"], tmp_path / "o", 16)


@pytest.mark.parametrize("value, got", [(42, r"42 \(int\)"), (["ok", 7], r"a list whose item 1 is 7 \(int\)"), ({"a": 1}, r"\{'a': 1\} \(dict\)")])
def test_reference_of_wrong_type_names_file_row_field_and_type(tiny_models, tmp_path, value, got):
    from tasks.config import DataConfig

    dirs, _ = tiny_models
    data = tmp_path / "data"
    rows = _rows("a", 3)
    rows[2]["references"] = value
    _jsonl(data / "train.jsonl", rows)
    _jsonl(data / "test.jsonl", _rows("b", 1))
    expected = rf"train.jsonl row 2 \(line 3\): field 'references' is {got}; expected a string or a list of strings"
    with pytest.raises(DataError, match=expected):
        prepare(DataConfig(), str(data), dirs["teacher"], dirs["student"], tmp_path / "o", 16)


def test_non_utf8_bytes_and_broken_json_are_named_by_offset_and_line(tiny_models, tmp_path):
    from tasks.config import DataConfig

    dirs, _ = tiny_models
    data = tmp_path / "data"
    good = "".join(json.dumps(r) + "\n" for r in _rows("a", 2)).encode()
    (data).mkdir()
    (data / "train.jsonl").write_bytes(good + b'{"prompt": "caf\xe9", "references": ["x"]}\n')
    _jsonl(data / "test.jsonl", _rows("b", 1))
    offset = len(good) + len(b'{"prompt": "caf')
    with pytest.raises(DataError, match=rf"train.jsonl: line 3, byte offset {offset}: byte 0xe9 is not UTF-8; re-encode"):
        prepare(DataConfig(), str(data), dirs["teacher"], dirs["student"], tmp_path / "o", 16)
    (data / "train.jsonl").write_bytes(good + b'{"prompt": "cut off\n')
    with pytest.raises(DataError, match=r"train.jsonl: row 2 \(line 3\) is not valid JSON"):
        prepare(DataConfig(), str(data), dirs["teacher"], dirs["student"], tmp_path / "o", 16)


def test_top_k_above_the_vocabulary_is_refused_before_reading(tiny_models, tmp_path):
    from tasks.config import DataConfig

    dirs, data = tiny_models
    with pytest.raises(DataError, match=r"teacher.top_k=401 is larger than the teacher's vocabulary \(400 tokens"):
        prepare(DataConfig(), str(data), dirs["teacher"], dirs["student"], tmp_path / "o", 16, top_k=401)
