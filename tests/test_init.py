"""Student initialisation: train.init=sft fine-tunes on the references with the production loop."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage import soft_labels
from tasks.config import TrainConfig
from tasks.init.sft import SFTError, run_sft, write_reference_labels


def _prompts_parquet(path, tiny_student, n=64, references=True):
    from tasks.demo import task
    from tasks.models import load_tokenizer
    from tasks.prompting import format_prompt

    tok = load_tokenizer(tiny_student)
    examples = task.generate(sizes={"train": n, "validation": 1, "test": 1})["train"]
    rows = [{"example_id": ex.id, "prompt": ex.prompt, "prompt_ids": tok(format_prompt(ex.prompt))["input_ids"],
             "references": list(ex.references) if references else []} for ex in examples]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path, rows, tok


def test_reference_labels_are_valid_one_hot_labels(tiny_student, tmp_path):
    path, rows, tok = _prompts_parquet(tmp_path / "train.parquet", tiny_student, n=5)
    manifest = write_reference_labels(path, tiny_student, tmp_path / "labels")
    meta = soft_labels.load_manifest(manifest)["metadata"]
    assert (meta["k"], meta["response_source"]) == (1, "reference")
    got = list(soft_labels.read(manifest, vocab_size=len(tok)))
    assert len(got) == 5
    for record, row in zip(got, rows):
        expected = tok(" " + row["references"][0], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert record["response_ids"].tolist() == expected
        assert record["topk_ids"][:, 0].tolist() == expected and (record["topk_logprobs"] == 0).all()


def test_sft_lowers_the_loss_and_writes_a_loadable_model(tiny_student, tmp_path):
    from transformers import AutoModelForCausalLM

    path, _, _ = _prompts_parquet(tmp_path / "train.parquet", tiny_student)
    cfg = TrainConfig(init="sft", sft_steps=25, batch_size=16, warmup_steps=2, sft_learning_rate=3e-3)
    result = run_sft(cfg, tiny_student, path, tmp_path / "sft", log_fn=lambda m: None, threads=1)
    assert result["steps"] == 25 and result["rows"] == 64
    assert result["last_loss"] < 0.7 * result["first_loss"]
    model = AutoModelForCausalLM.from_pretrained(result["checkpoint"])
    assert model.config.num_hidden_layers == 1


def test_sft_without_references_is_a_user_error(tiny_student, tmp_path):
    from storage.errors import UserError

    path, _, _ = _prompts_parquet(tmp_path / "train.parquet", tiny_student, n=3, references=False)
    with pytest.raises(SFTError, match="reference") as info:
        run_sft(TrainConfig(init="sft", sft_steps=2), tiny_student, path, tmp_path / "sft", log_fn=lambda m: None)
    assert isinstance(info.value, UserError)
