"""Expansion settings (no `tasks.config` import, so `tasks/config.py` can compose it)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_HEADER = "Write one new instruction in the style of the examples below. Reply with the instruction only, on one line."


class ExpandConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    num_prompts: int = Field(100, ge=1, description="New prompts to write (fewer if max_rounds runs out; the manifest says).")
    shots: int = Field(3, ge=1, description="Seed prompts shown per request (sampled without replacement).")
    samples_per_request: int = Field(2, ge=1, description="Completions per few-shot request (vLLM n).")
    requests_per_round: int = Field(32, ge=1, description="Few-shot requests sent to the engine at once.")
    max_rounds: int = Field(20, ge=1, description="Give up after this many rounds (duplicates and empty outputs do not count toward num_prompts).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (diversity).")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling (diversity).")
    max_new_tokens: int = Field(64, ge=1, description="Length cap of one written instruction.")
    seed: int = Field(0, description="Base seed: seed selection and each request's sampling seed derive from it.")
    header: str = Field(DEFAULT_HEADER, description="Instruction to the teacher above the examples.")
    example_prefix: str = Field("Instruction: ", description="Put before each example and at the end, where the teacher continues.")
    use_chat_template: bool = Field(False, description="Wrap the few-shot request in the teacher tokenizer's chat template (instruct teachers).")

    @field_validator("example_prefix")
    @classmethod
    def _nonempty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("example_prefix must contain visible text (it marks where the teacher writes)")
        return value
