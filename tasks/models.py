"""Resolve model references (demo, local folder, hub id) and load them safely."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from storage.errors import UserError


class ModelError(UserError):
    """A model reference cannot be used; the message names it and what to do."""


def resolve_model_dir(ref: str, demo_dir: str | None, revision: str | None = None, field: str = "model") -> str:
    """A local folder for `ref`: the demo model, an existing folder, or a hub snapshot (safetensors only)."""
    if ref == "demo":
        if demo_dir is None:
            raise ModelError(f"{field}: 'demo' needs data.source 'demo'")
        return demo_dir
    path = Path(ref)
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelError(f"{field}: {path} has no config.json; point it at a Hugging Face model folder")
        if not list(path.glob("*.safetensors")):
            raise ModelError(f"{field}: {path} has no .safetensors weights; only safetensors are loaded (convert the checkpoint)")
        return str(path.resolve())
    if path.is_absolute() or ref.startswith("."):
        raise ModelError(f"{field}: {ref} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            ref,
            revision=revision,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"],
        )
    except Exception as exc:
        raise ModelError(f"{field}: {ref!r} is not a local folder and could not be fetched from the hub ({exc})") from exc


def load_tokenizer(model_dir: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def tokenizer_hash(tokenizer) -> str:
    """Identity of a vocabulary: token→id map plus special tokens (not file bytes, which vary by version)."""
    payload = {"vocab": sorted(tokenizer.get_vocab().items()), "special": tokenizer.all_special_tokens}
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]


def load_causal_lm(model_dir: str, trust_remote_code: bool = False, dtype=None):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        model_dir, use_safetensors=True, trust_remote_code=trust_remote_code, dtype=dtype or torch.float32
    )


def save_pretrained_atomic(model, tokenizer, out_dir) -> None:
    """Save weights as safetensors plus the tokenizer under a temporary name, then rename."""
    import shutil

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp-save")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
