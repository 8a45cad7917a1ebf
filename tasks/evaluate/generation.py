"""Greedy generation with vLLM in a Ray actor, scored by exact match and ROUGE-L."""

from __future__ import annotations

from typing import Any

from tasks.config import EngineConfig
from tasks.evaluate.metrics import exact_match, rouge_l


class GenerationReplica:
    """A vLLM engine for one model; runs inside a Ray actor that is killed afterwards."""

    def __init__(self, model_dir: str, cfg: EngineConfig):
        from tasks.teacher.engine import build_engine

        self.llm = build_engine(model_dir, cfg)

    def greedy(self, prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, detokenize=False)
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompt_ids], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]


def greedy_generate(model_dir: str, cfg: EngineConfig, prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    import ray

    actor = ray.remote(num_cpus=1)(GenerationReplica).remote(model_dir, cfg)
    try:
        return ray.get(actor.greedy.remote(prompt_ids, max_new_tokens))
    finally:
        ray.kill(actor)


def score_generations(tokenizer, prompts: list[dict[str, Any]], responses: list[list[int]]) -> list[dict[str, Any]]:
    """One record per example: the decoded response and its scores."""
    rows = []
    for p, ids in zip(prompts, responses):
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        refs = list(p["references"])
        rows.append({"example_id": p["example_id"], "prompt": p["prompt"], "response": text, "references": refs,
                     "exact_match": exact_match(text, refs) if refs else float("nan"),
                     "rouge_l": rouge_l(text, refs) if refs else float("nan")})
    return rows
