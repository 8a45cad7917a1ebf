"""Optional LoRA students (peft): train low-rank adapters, ship merged weights.

Adapters keep optimizer state and gradients small for large students; at the
end they are merged into the base weights, so the checkpoint the pipeline
evaluates and promotes is a plain HF model folder that vLLM and transformers
load without peft.
"""

from __future__ import annotations

from typing import Any


def apply_lora(model, settings: dict[str, Any]):
    """Wrap `model` with LoRA adapters on `settings['target_modules']`; only adapters stay trainable."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=int(settings["rank"]), lora_alpha=float(settings["alpha"]), lora_dropout=float(settings["dropout"]),
                        target_modules=list(settings["target_modules"]), bias="none", task_type="CAUSAL_LM")
    problem = f"train.lora.target_modules {settings['target_modules']} matched no layer of the student; use names of its Linear layers"
    try:
        wrapped = get_peft_model(model, config)
    except ValueError as exc:
        raise ValueError(f"{problem} ({exc})") from exc
    if not any(p.requires_grad for p in wrapped.parameters()):
        raise ValueError(problem)
    return wrapped


def merged(model):
    """The plain transformers model: adapters folded into the base weights (no-op without LoRA)."""
    from peft import PeftModel

    return model.merge_and_unload() if isinstance(model, PeftModel) else model


def trainable_fraction(model) -> float:
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad) / max(total, 1)
