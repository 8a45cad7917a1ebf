"""Build a vLLM engine with settings that work on CPU and GPU alike."""

from __future__ import annotations

import os

from tasks.config import EngineConfig


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def build_engine(model_dir: str, cfg: EngineConfig, *, max_logprobs: int = 20, logprobs_mode: str = "raw_logprobs"):
    """A `vllm.LLM` for `model_dir`. Call only under `if __name__ == "__main__"` or in an actor:
    vLLM starts its engine process with spawn."""
    if not on_gpu():
        # On CPU vLLM sizes its KV cache from this variable (GiB), not from gpu_memory_utilization.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.cpu_kvcache_gib))
    from vllm import LLM

    return LLM(
        model=model_dir,
        tokenizer=model_dir,
        dtype=cfg.dtype,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        max_model_len=cfg.max_model_len,
        tensor_parallel_size=cfg.tensor_parallel_size,
        enforce_eager=cfg.enforce_eager,
        trust_remote_code=cfg.trust_remote_code,
        max_logprobs=max_logprobs,
        logprobs_mode=logprobs_mode,
        seed=cfg.seed,
    )


def vllm_version() -> str:
    import vllm

    return vllm.__version__
