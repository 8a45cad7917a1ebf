"""Session-wide real services: one Prefect test server and one local Ray for the whole suite."""

import os

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_ACCEPT_AUTH_TOKEN_WARNING", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")


@pytest.fixture(scope="session")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from tasks.ray_runtime import ensure_ray

    ensure_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory):
    """A 1-layer Llama (head_dim 64) with a trained demo tokenizer, saved as safetensors."""
    import torch
    from transformers import LlamaForCausalLM

    from tasks.demo import task
    from tasks.demo.models import llama_config, train_tokenizer
    from tasks.models import save_pretrained_atomic

    root = tmp_path_factory.mktemp("tiny")
    splits = task.generate(sizes={"train": 300, "validation": 1, "test": 1})
    texts = [ex.prompt for ex in splits["train"]] + [r for ex in splits["train"] for r in ex.references]
    tok = train_tokenizer(texts, root / "tokenizer", vocab_size=320)
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(tok, hidden=64, layers=1, heads=1))
    save_pretrained_atomic(model, tok, root / "student")
    return str(root / "student")


@pytest.fixture(scope="session")
def tiny_labels(tmp_path_factory, tiny_student):
    """Two shards of synthetic soft labels (top-8 of random teacher logits) for the tiny student's vocabulary."""
    import numpy as np
    import torch

    from storage import soft_labels
    from tasks.models import load_tokenizer, tokenizer_hash
    from tasks.teacher.extract import tail_logmass

    tok = load_tokenizer(tiny_student)
    out = tmp_path_factory.mktemp("labels")
    gen = torch.Generator().manual_seed(1)
    k, vocab = 8, len(tok)
    meta = {"k": k, "tokenizer_hash": tokenizer_hash(tok), "schema_version": soft_labels.SCHEMA_VERSION}
    records = []
    for shard in range(2):
        rows = []
        for i in range(8):
            p, t = 4 + (i % 3), 3 + (i % 4)
            logp = torch.log_softmax(torch.randn(t, vocab, generator=gen) * 3, -1)
            top = logp.topk(k, -1)
            response = torch.randint(4, vocab, (t,), generator=gen)
            rows.append({
                "sample_id": f"s{shard}-{i}", "example_id": f"e{shard}-{i}", "split": "train", "response_source": "teacher_sample",
                "prompt_ids": [1] + torch.randint(4, vocab, (p - 1,), generator=gen).tolist(), "response_ids": response.tolist(),
                "topk_ids": top.indices.ravel().tolist(), "topk_logprobs": top.values.ravel().tolist(),
                "token_logprob": logp.gather(1, response[:, None])[:, 0].tolist(),
                "tail_logmass": tail_logmass(top.values.numpy()).astype(np.float32).tolist(),
            })
        records.append(soft_labels.write_shard(out, shard, rows, meta))
    return str(soft_labels.write_manifest(out, records, meta))


@pytest.fixture(scope="session")
def prompts(tiny_student):
    from tasks.demo import task
    from tasks.models import load_tokenizer
    from tasks.prompting import format_prompt

    tok = load_tokenizer(tiny_student)
    examples = task.generate(sizes={"train": 5, "validation": 1, "test": 1})["train"]
    return [{"example_id": f"train-{i}", "prompt_ids": tok(format_prompt(ex.prompt))["input_ids"],
             "references": list(ex.references)} for i, ex in enumerate(examples)]


def perturbed_copy(model_dir: str, out_dir, *, seed: int, scale: float) -> str:
    """Another model with `model_dir`'s tokenizer: its weights plus seeded Gaussian noise (a second teacher)."""
    import torch
    from transformers import LlamaForCausalLM

    from tasks.models import load_tokenizer, save_pretrained_atomic

    model = LlamaForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    save_pretrained_atomic(model, load_tokenizer(model_dir), out_dir)
    return str(out_dir)


def write_demo_dataset(folder, *, n_train: int, n_test_drawn: int, n_test: int) -> dict[str, list[dict]]:
    """train.jsonl / test.jsonl of demo prompts (id, prompt, references), the test prompts unseen in training."""
    import json

    from tasks.demo import task

    splits = task.generate(sizes={"train": n_train, "validation": 1, "test": n_test_drawn})
    seen = {ex.prompt for ex in splits["train"]}
    rows = {"train": [{"id": f"tr-{i}", "prompt": ex.prompt, "references": list(ex.references)} for i, ex in enumerate(splits["train"])],
            "test": [{"id": f"te-{i}", "prompt": ex.prompt, "references": list(ex.references)}
                     for i, ex in enumerate(splits["test"]) if ex.prompt not in seen][:n_test]}
    folder.mkdir(parents=True, exist_ok=True)
    for split, items in rows.items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    return rows


# Test tiers. `make test-fast` runs `-m "not integration and not e2e"`. A test that needs a real Ray cluster or a
# Prefect server (through these fixtures) is integration; files that run the flow or the stack end to end mark
# themselves `e2e`, and tests that start vLLM or Ray in a subprocess mark themselves `integration`.
INTEGRATION_FIXTURES = {"ray_local", "prefect_server"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())) and not item.get_closest_marker("e2e"):
            item.add_marker(pytest.mark.integration)
