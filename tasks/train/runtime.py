"""Where the training loop runs: a Ray Train worker, or this process (benchmarks, comparisons, tests).

The loop talks to this small interface only, so the same code trains under Ray
on a cluster and in one local process.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch


class Runtime:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def prepare_model(self, model, strategy: str = "ddp"):
        return model

    def latest_checkpoint(self) -> Path | None:
        return None

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        pass


class LocalRuntime(Runtime):
    """One process; checkpoints are copied to `checkpoint_root/step-N` if a root is given."""

    def __init__(self, checkpoint_root: Path | None = None, device: str = "cpu"):
        self.device = torch.device(device)
        self.checkpoint_root = Path(checkpoint_root) if checkpoint_root else None

    def latest_checkpoint(self) -> Path | None:
        if self.checkpoint_root is None or not self.checkpoint_root.exists():
            return None
        done = sorted(self.checkpoint_root.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
        return done[-1] if done else None

    def report(self, metrics, checkpoint_dir):
        if self.checkpoint_root is not None and checkpoint_dir is not None:
            target = self.checkpoint_root / f"step-{metrics['step']}"
            tmp = target.with_name(target.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(checkpoint_dir, tmp)
            tmp.rename(target)


class RayRuntime(Runtime):
    """A Ray Train worker: DDP across workers, checkpoints through ray.train.report."""

    def __init__(self):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def all_reduce_sum(self, tensor):
        if self.world == 1:
            return tensor
        import torch.distributed as dist

        out = tensor.clone().to(self.device)
        dist.all_reduce(out)
        return out.cpu() if tensor.device.type == "cpu" else out

    def prepare_model(self, model, strategy: str = "ddp"):
        import ray.train.torch

        if self.world == 1:
            return model
        if strategy == "fsdp":
            from tasks.train.fsdp import shard_model

            return shard_model(model)
        return ray.train.torch.prepare_model(model)

    def latest_checkpoint(self):
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        # Copy out: the checkpoint's directory may be a temporary download.
        import tempfile

        local = Path(tempfile.mkdtemp(prefix="stillhouse-resume-"))
        with checkpoint.as_directory() as d:
            shutil.copytree(d, local, dirs_exist_ok=True)
        return local

    def report(self, metrics, checkpoint_dir):
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
        ray.train.report(metrics, checkpoint=checkpoint)
