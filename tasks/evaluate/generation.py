"""Student generation with vLLM in a Ray actor (greedy, plus sampled seeds), scored by exact match and ROUGE-L."""

from __future__ import annotations

from typing import Any

from tasks.config import EngineConfig
from tasks.evaluate.metrics import exact_match, rouge_l

# MiniLLM's protocol: several seeds at temperature 1, scores averaged over seeds.
SAMPLE_TEMPERATURE = 1.0


def sample_seed_values(count: int) -> list[int]:
    """The seeds used for `count` sampled runs (MiniLLM uses 10, 20, 30, ...)."""
    return [10 * (i + 1) for i in range(count)]


def request_seed(seed: int, index: int) -> int:
    """A distinct, reproducible vLLM per-request seed for prompt `index` in the run with `seed`."""
    return seed * 1_000_003 + index


class GenerationReplica:
    """A vLLM engine for one model; runs inside a Ray actor that is killed afterwards."""

    def __init__(self, model_dir: str, cfg: EngineConfig):
        from tasks.teacher.engine import build_engine

        self.llm = build_engine(model_dir, cfg)

    def greedy(self, prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        return self.generate(prompt_ids, max_new_tokens, [])["greedy"]

    def generate(self, prompt_ids: list[list[int]], max_new_tokens: int, sample_seeds: list[int],
                 temperature: float = SAMPLE_TEMPERATURE) -> dict[str, Any]:
        """Greedy answers and, per seed, one sampled answer for every prompt, in one engine call.

        Returns {"greedy": [ids per prompt], "sampled": [[ids per prompt] per seed]}."""
        from vllm import SamplingParams

        requests = [{"prompt_token_ids": list(p)} for p in prompt_ids]
        greedy = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, detokenize=False)
        params = [greedy] * len(requests)
        for seed in sample_seeds:
            params += [SamplingParams(temperature=temperature, top_p=1.0, max_tokens=max_new_tokens,
                                      seed=request_seed(seed, i), detokenize=False) for i in range(len(prompt_ids))]
        outputs = self.llm.generate(requests * (1 + len(sample_seeds)), params, use_tqdm=False)
        ids = [list(o.outputs[0].token_ids) for o in outputs]
        n = len(prompt_ids)
        return {"greedy": ids[:n], "sampled": [ids[n * (s + 1) : n * (s + 2)] for s in range(len(sample_seeds))]}


def generate_student(model_dir: str, cfg: EngineConfig, prompt_ids: list[list[int]], max_new_tokens: int,
                     sample_seeds: list[int]) -> dict[str, Any]:
    """One engine start for all of the student's answers: greedy plus one sampled run per seed."""
    import ray

    actor = ray.remote(num_cpus=1)(GenerationReplica).remote(model_dir, cfg)
    try:
        return ray.get(actor.generate.remote(prompt_ids, max_new_tokens, list(sample_seeds)))
    finally:
        ray.kill(actor)


def greedy_generate(model_dir: str, cfg: EngineConfig, prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    return generate_student(model_dir, cfg, prompt_ids, max_new_tokens, [])["greedy"]


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


def score_sampled(tokenizer, prompts: list[dict[str, Any]], sampled: list[list[list[int]]]) -> list[dict[str, Any]]:
    """Per example: the sampled answers (one per seed) and ROUGE-L averaged over seeds (`rouge_l_sampled`).

    Averaging per example first, then bootstrapping over examples, gives an interval over prompts
    (the unit we generalise over), as MiniLLM reports the mean over seeds."""
    rows = []
    for i, p in enumerate(prompts):
        texts = [tokenizer.decode(run[i], skip_special_tokens=True).strip() for run in sampled]
        refs = list(p["references"])
        score = sum(rouge_l(t, refs) for t in texts) / len(texts) if refs and texts else float("nan")
        rows.append({"example_id": p["example_id"], "responses": texts, "rouge_l_sampled": score})
    return rows
