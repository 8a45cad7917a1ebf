"""FSDP2 (`fully_shard`) for students too large for one device's memory with DDP.

Each decoder layer and then the whole model are sharded across the Ray Train
workers' process group (gloo on CPU, NCCL on GPU). Checkpoints stay in the
same format as DDP's (tasks/train/checkpoint.py): the full model and optimizer
states are gathered to CPU (a collective: every rank calls) and written by
rank 0, with optimizer entries keyed by position like torch's own; a resume
gives every rank the full state and each keeps its shard.
"""

from __future__ import annotations

from typing import Any

import torch


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(model):
    from torch.distributed.fsdp import fully_shard

    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError("train.strategy=fsdp needs a decoder whose blocks are model.layers (Llama-style); use ddp")
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def _trainable_names(model) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def gather_full_state(model, optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Full model and optimizer states on CPU on rank 0, ({}, {}) elsewhere (a collective: every rank calls).
    Optimizer state keyed by parameter position, as torch's own state_dict."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model_state = get_model_state_dict(model, options=_options(cpu_offload=True))
    optim = get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))
    if torch.distributed.get_rank() != 0:  # with cpu_offload only rank 0 receives the full states
        return {}, {}
    index = {name: i for i, name in enumerate(_trainable_names(model))}
    optim_state = {
        "state": {index[name]: slots for name, slots in optim["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in optim["param_groups"]],
    }
    return {name: t.detach().clone().contiguous() for name, t in model_state.items()}, optim_state


def load_full_state(model, optimizer, model_state: dict[str, torch.Tensor], optim_state: dict[str, Any]) -> None:
    """Every rank passes the full states; each keeps its shard."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, model_state, options=_options())
    names = _trainable_names(model)
    by_name = {
        "state": {names[int(i)]: slots for i, slots in optim_state["state"].items()},
        "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in optim_state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, optim_state_dict=by_name, options=_options())
