"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint holds model weights, optimizer moments, scheduler state, the
torch RNG states and the step (plus the data position the loop records).
Batch selection is a pure function of (seed, step, rank), so no sampler state
is needed: a resumed run continues where the interrupted one stopped and ends
with the same weights (on the same hardware).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

STATE_FILE = "trainer_state.json"


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for param_id, slots in state["state"].items():
        for name, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{param_id}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{param_id}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        param_id, name = key.split(".", 1)
        state.setdefault(int(param_id), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(directory: Path, *, model, optimizer, scheduler, step: int, extra: dict[str, Any],
                    full_state: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None) -> Path:
    """`full_state`: (model state, optimizer state) already gathered from a sharded model (tasks.train.fsdp)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if full_state is None:
        core = model.module if hasattr(model, "module") else model
        save_model(core, str(directory / "model.safetensors"))  # handles tied embeddings
        opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    else:
        save_file(full_state[0], directory / "model.safetensors")
        opt_tensors, opt_meta = _flatten_optimizer(full_state[1])
    save_file(opt_tensors, directory / "optimizer.safetensors")
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, directory / "rng.safetensors")
    state = {"step": step, "optimizer": opt_meta, "scheduler": sched, **extra}
    (directory / STATE_FILE).write_text(json.dumps(state))
    return directory


def load_checkpoint(directory: Path, *, model, optimizer, scheduler) -> dict[str, Any]:
    directory = Path(directory)
    state = json.loads((directory / STATE_FILE).read_text())
    from tasks.train.fsdp import is_sharded, load_full_state

    if is_sharded(model):  # every rank reads the full state and keeps its shard
        saved = load_file(directory / "model.safetensors")
        expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        if {name: tuple(t.shape) for name, t in saved.items()} != expected:
            raise ValueError(f"{directory}: checkpoint does not fit this student (other parameter names or shapes); "
                             "use a fresh run name or the original student config")
        load_full_state(model, optimizer, saved, _unflatten_optimizer(load_file(directory / "optimizer.safetensors"), state["optimizer"]))
        _restore_schedule_and_rng(directory, scheduler, state)
        return state
    core = model.module if hasattr(model, "module") else model
    try:
        missing, unexpected = load_model(core, str(directory / "model.safetensors"), strict=False)
    except RuntimeError as exc:
        raise ValueError(f"{directory}: checkpoint does not fit this student ({str(exc).splitlines()[0]}); "
                         "use a fresh run name or the original student config") from exc
    if missing or unexpected:
        raise ValueError(f"{directory}: checkpoint does not fit this student (missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}); use a fresh run name or the original student config")
    optimizer.load_state_dict(_unflatten_optimizer(load_file(directory / "optimizer.safetensors"), state["optimizer"]))
    _restore_schedule_and_rng(directory, scheduler, state)
    return state


def _restore_schedule_and_rng(directory: Path, scheduler, state: dict[str, Any]) -> None:
    scheduler.load_state_dict({**scheduler.state_dict(), **state["scheduler"]})
    if (directory / "rng.safetensors").exists():
        rng = load_file(directory / "rng.safetensors")
        torch.set_rng_state(rng["cpu"])
        cuda = [rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng]
        if cuda and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
