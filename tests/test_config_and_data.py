"""Bad input fails before any model loads, with a message naming the field or file."""

import json
from pathlib import Path

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
