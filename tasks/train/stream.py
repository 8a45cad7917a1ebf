"""Stream one worker's share of the soft labels as batches, holding one shard (plus the next, prefetched) in memory.

The order is a pure function of (seed, epoch, rank) and the manifest's row
counts, so the data position of any step is known without reading data: a run
resumed at step s opens the shard that step s falls in, skips the batches
before it, and sees exactly the batches an uninterrupted run would.

Epoch e on a rank: its shards in an order shuffled by (seed, e, rank); in each
shard the rows shuffled by (seed, e, shard), then cut into batches. Optional
length bucketing sorts the shuffled rows by length first (less padding) and
shuffles the batch order; it is off by default because such batches are not
random samples (see TrainConfig.length_bucketing).

A rank with as many shards as ranks or more owns whole shards
(disjoint across ranks); with fewer shards than ranks every rank reads every
shard and keeps rows rank::world.
"""

from __future__ import annotations

import random
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

Record = dict[str, Any]


@dataclass(frozen=True)
class Position:
    """Where a step's batch comes from: epoch, shard index in the manifest, batch index within that shard."""

    epoch: int
    shard: int
    batch: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def worker_shards(num_shards: int, rank: int, world: int) -> list[int] | None:
    """Disjoint shard indices for a rank; None means 'all shards, split by row' (fewer shards than ranks)."""
    if num_shards >= world:
        return list(range(rank, num_shards, world))
    return None


def sequence_length(record: Record) -> int:
    return len(record["prompt_ids"]) + len(record["response_ids"])


class ShardStream:
    """Batches of `batch_size` records for one rank, endlessly (epoch after epoch).

    `shard_rows[i]` is the manifest's row count of shard i; `read_shard(i)`
    returns that shard's decoded records (called lazily, at most one shard ahead).
    """

    def __init__(self, shard_rows: list[int], read_shard: Callable[[int], list[Record]], *, rank: int, world: int,
                 batch_size: int, seed: int, bucket_by_length: bool = False):
        self.read_shard, self.rank, self.world = read_shard, rank, world
        self.batch_size, self.seed, self.bucket_by_length = batch_size, seed, bucket_by_length
        owned = worker_shards(len(shard_rows), rank, world)
        self.split_rows = owned is None
        self.shards = list(range(len(shard_rows))) if owned is None else owned
        self.rows = {i: self._own_rows(shard_rows[i]) for i in self.shards}
        self.batches = {i: -(-self.rows[i] // batch_size) for i in self.shards}
        self.steps_per_epoch = sum(self.batches.values())
        if self.steps_per_epoch == 0:
            raise ValueError(f"worker {rank}: no soft-label rows assigned; use fewer workers than rows")

    def _own_rows(self, rows: int) -> int:
        return len(range(self.rank, rows, self.world)) if self.split_rows else rows

    def shard_order(self, epoch: int) -> list[int]:
        order = list(self.shards)
        random.Random(f"shards:{self.seed}:{epoch}:{self.rank}").shuffle(order)
        return [s for s in order if self.batches[s] > 0]

    def position(self, step: int) -> Position:
        """The data position of optimizer step `step` (0-based) on this rank."""
        epoch, offset = divmod(step, self.steps_per_epoch)
        for shard in self.shard_order(epoch):
            if offset < self.batches[shard]:
                return Position(epoch, shard, offset)
            offset -= self.batches[shard]
        raise AssertionError("unreachable: offset beyond the epoch")

    def shard_batches(self, epoch: int, shard: int, records: list[Record]) -> list[list[Record]]:
        """The batches of one shard in one epoch, in order."""
        if self.split_rows:
            records = records[self.rank :: self.world]
        if len(records) != self.rows[shard]:
            raise ValueError(f"shard {shard}: {len(records)} rows read, the manifest says {self.rows[shard]}; "
                             "the labels changed under the run - rerun the teacher stage")
        rng = random.Random(f"rows:{self.seed}:{epoch}:{shard}")
        rows = list(records)
        rng.shuffle(rows)
        if self.bucket_by_length:
            rows.sort(key=sequence_length)  # stable: ties keep the shuffled order
        batches = [rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
        if self.bucket_by_length:
            rng.shuffle(batches)
        return batches

    def iter_from(self, step: int) -> Iterator[tuple[Position, list[Record]]]:
        """(position, batch) for steps `step`, `step`+1, ... - reading each shard once per epoch, one ahead."""
        start = self.position(step)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-prefetch") as pool:
            pending: Future | None = None
            epoch, skip = start.epoch, start.batch
            order = self.shard_order(epoch)
            index = order.index(start.shard)
            while True:
                shard = order[index]
                records = pending.result() if pending is not None else self.read_shard(shard)
                # Prefetch the next shard (possibly the next epoch's first) while this one trains.
                next_epoch, next_index = (epoch, index + 1) if index + 1 < len(order) else (epoch + 1, 0)
                next_order = order if next_epoch == epoch else self.shard_order(next_epoch)
                pending = pool.submit(self.read_shard, next_order[next_index])
                for b, batch in enumerate(self.shard_batches(epoch, shard, records)):
                    if b >= skip:
                        yield Position(epoch, shard, b), batch
                del records
                skip, epoch, index, order = 0, next_epoch, next_index, next_order
