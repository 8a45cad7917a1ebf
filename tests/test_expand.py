"""Expansion: few-shot requests, parsing, rejection counts (fake engine), and format + lineage on a tiny vLLM teacher."""

import json
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.curate import CurateConfig, run_curate_stage
from tasks.data import PROMPT_SCHEMA
from tasks.expand import EXPANDED_SCHEMA, ExpandConfig, ExpansionError, expand_with_llm, fewshot_request, parse_instruction

SEEDS = [{"example_id": f"s{i}", "prompt": p} for i, p in enumerate(
    ["What is 3 plus 5?", "What color is snow?", "What is the opposite of hot?", "Which is bigger, 2 or 7?"])]


class FakeTokenizer:
    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [len(w) for w in text.split()]}


class FakeLLM:
    """Returns canned completions in order; records what it was asked."""

    def __init__(self, texts):
        self.texts = list(texts)
        self.calls = []

    def generate(self, requests, params, use_tqdm=False):
        self.calls.append((requests, params))
        outs = []
        for p in params:
            outs.append(SimpleNamespace(outputs=[SimpleNamespace(text=self.texts.pop(0) if self.texts else "") for _ in range(p.n)]))
        return outs


def test_fewshot_request_and_parse():
    cfg = ExpandConfig()
    text = fewshot_request(["What is 1 plus 1?", "What  color\nis sky?"], cfg)
    assert text.splitlines() == [cfg.header, "", "Instruction: What is 1 plus 1?", "Instruction: What color is sky?", "Instruction:"]
    assert parse_instruction("  Name a fruit.\nInstruction: more", cfg) == "Name a fruit."
    assert parse_instruction("\n Instruction: Instruction: Count to 3.", cfg) == "Count to 3."
    assert parse_instruction("   \n", cfg) == ""


def test_rejections_counted_and_lineage():
    cfg = ExpandConfig(num_prompts=3, shots=2, samples_per_request=2, requests_per_round=2, max_rounds=2, seed=4)
    llm = FakeLLM([
        "What is 3 plus 5?",          # seed copy
        "Name a red fruit.",          # accepted
        "  name a RED fruit. ",       # duplicate after normalisation
        "",                           # empty
        "What is 4 plus 4?",          # accepted (round 2)
        "What color is grass?",       # accepted -> 3 reached
        "Another one.",               # over the target: neither accepted nor counted as rejected
    ])
    rows, stats = expand_with_llm(llm, FakeTokenizer(), SEEDS, cfg, teacher="t", teacher_hash="h", log_fn=lambda _: None)
    assert [r["prompt"] for r in rows] == ["Name a red fruit.", "What is 4 plus 4?", "What color is grass?"]
    assert {k: stats[k] for k in ("requests", "completions", "accepted", "rejected_empty", "rejected_seed_copy", "rejected_duplicate", "rounds")} == \
        {"requests": 4, "completions": 8, "accepted": 3, "rejected_empty": 2, "rejected_seed_copy": 1, "rejected_duplicate": 1, "rounds": 2}
    assert [r["example_id"] for r in rows] == ["gen-4-000000", "gen-4-000001", "gen-4-000002"]
    for r in rows:
        assert len(r["seed_ids"]) == 2 and set(r["seed_ids"]) <= {s["example_id"] for s in SEEDS}
        assert json.loads(r["sampling"]) == {"temperature": 1.0, "top_p": 0.95, "n": 2, "max_new_tokens": 64, "stop": ["\n"]}
    params = llm.calls[0][1]
    assert len({p.seed for p in params}) == len(params)  # one sampling seed per request
    assert rows[0]["generation_seed"] == params[0].seed and rows[1]["round"] == 1
    rows2, _ = expand_with_llm(FakeLLM(llm.texts or [f"x{i}" for i in range(20)]), FakeTokenizer(), SEEDS, cfg, teacher="t",
                               teacher_hash="h", log_fn=lambda _: None)
    assert [r["seed_ids"] for r in rows2][:1] == [rows[0]["seed_ids"]]  # seed choice is a function of (seed, round)


def test_too_few_seeds_is_a_user_error():
    with pytest.raises(ExpansionError, match="shots"):
        expand_with_llm(FakeLLM([]), FakeTokenizer(), SEEDS[:1], ExpandConfig(shots=2), teacher="t", teacher_hash="h")


@pytest.mark.integration
def test_tiny_teacher_writes_prompts_with_lineage(tmp_path, tiny_student, monkeypatch):
    from tasks.config import EngineConfig
    from tasks.expand import run_expand_stage

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    seeds = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist([{**s, "prompt_ids": [1, 2], "references": ["x"]} for s in SEEDS], schema=PROMPT_SCHEMA), seeds)
    cfg = ExpandConfig(num_prompts=6, shots=2, samples_per_request=2, requests_per_round=4, max_rounds=3, max_new_tokens=12, seed=1)
    manifest = run_expand_stage(tiny_student, seeds, tmp_path / "expanded", cfg, EngineConfig(), log_fn=lambda _: None)
    table = pq.read_table(manifest["output"])
    assert table.schema == EXPANDED_SCHEMA
    assert PROMPT_SCHEMA.names == table.schema.names[: len(PROMPT_SCHEMA)]
    rows = table.to_pylist()
    stats = manifest["stats"]
    assert len(rows) == stats["accepted"] == manifest["rows"] and 1 <= len(rows) <= 6
    assert stats["completions"] >= stats["accepted"] + stats["rejected_empty"] + stats["rejected_seed_copy"] + stats["rejected_duplicate"]
    for r in rows:
        assert r["prompt"].strip() and "\n" not in r["prompt"] and r["prompt_ids"]
        assert len(r["seed_ids"]) == 2 and r["teacher"] == tiny_student and len(r["teacher_hash"]) == 16
        assert json.loads(r["sampling"])["temperature"] == 1.0 and r["generation_seed"] >= 0
    assert len({r["prompt"] for r in rows}) == len(rows)
    saved = json.loads((tmp_path / "expanded" / "manifest.json").read_text())
    assert saved["seeds"]["rows"] == 4 and saved["config"]["seed"] == 1 and saved["vllm_version"]
    # expansion output feeds curation unchanged (lineage columns kept)
    curated = run_curate_stage(manifest["output"], tmp_path / "curated", CurateConfig(), heldout=[s["prompt"] for s in SEEDS])
    assert pq.read_schema(curated.output) == EXPANDED_SCHEMA
