"""The base of every stage config, and the vLLM engine settings several stages share.

Kept apart from tasks/config.py so that a stage package's own config model
(e.g. tasks/onpolicy/config.py) can build on them while PipelineConfig composes it.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # Fields that say where or how a stage runs, not what it produces: changing them reuses finished outputs
    # (tasks.stage_cache.content_fields leaves them out of the content key).
    output_neutral_fields: ClassVar[frozenset[str]] = frozenset()


class EngineConfig(StageConfig):
    """vLLM engine settings shared by the teacher and evaluation stages."""

    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field("float32", description="float32 on CPU (bfloat16 crashes vLLM's CPU attention here).")
    gpu_memory_utilization: float = Field(0.3, gt=0, le=1, description="On CPU: fraction of RAM vLLM reserves.")
    cpu_kvcache_gib: int = Field(1, ge=1, description="VLLM_CPU_KVCACHE_SPACE on CPU.")
    max_model_len: int | None = Field(None, ge=16)
    tensor_parallel_size: int = Field(1, ge=1)
    enforce_eager: bool = Field(True, description="Skip graph capture/compilation: faster start for small models.")
    trust_remote_code: bool = Field(False, description="Only turn on for model repositories you trust.")
    seed: int = 0
    chunked_prefill: bool | None = Field(
        None,
        description="vLLM chunked prefill (splitting a prompt across engine steps). None: off on CPU, vLLM's default (on) "
        "on GPU. vLLM-CPU 0.32 crashes ('CPU Generator does not use offset') when it splits the prompt of a seeded "
        "request, and every teacher request is seeded; off, each step takes whole prompts only (budget "
        "max(max_model_len, 4096) tokens), so true is refused on CPU.",
    )
