"""Forward what Ray workers print (vLLM engines in teacher actors, Ray Train workers) into a run log.

Ray already ships every worker's stdout/stderr to the driver, where it is
printed to the driver's own streams; Prefect's run log never sees it. While
`ray_output_to(log_fn)` is active, each forwarded line also goes to `log_fn`
(e.g. a Prefect run logger), prefixed with the actor or task that wrote it.
Ray's dispatcher is not a public API: if it moves, forwarding is skipped with
one warning and the run goes on.
"""

from __future__ import annotations

import itertools
import logging
from contextlib import contextmanager
from typing import Callable, Iterator

_ids = itertools.count()


def _dispatcher():
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher
    except ImportError:
        return None
    return global_worker_stdstream_dispatcher


def format_batch(data: dict) -> list[str]:
    """One run-log line per worker line: '[<actor or task> pid=N] line'."""
    who = data.get("actor_name") or data.get("task_name") or "ray worker"
    return [f"[{who} pid={data.get('pid')}] {line}" for line in data.get("lines", []) if line.strip()]


class RunLogFilter:
    """Which worker batches reach the run log.

    Dropped: the autoscaler's periodic status dumps (Ray ships them to the
    driver; dozens of lines every few seconds, none about the run) unless a line
    warns or errs; and a batch repeating the previous batch of the same process
    word for word (Ray Train workers' prints reach the driver twice).
    """

    def __init__(self):
        self.last: dict[object, tuple[str, ...]] = {}

    def keep(self, data: dict) -> bool:
        lines = tuple(data.get("lines", []))
        if data.get("pid") == "autoscaler":
            return any(word in line for line in lines for word in ("WARN", "ERROR", "Error", "failed"))
        key = data.get("pid")
        if self.last.get(key) == lines:
            return False
        self.last[key] = lines
        return True


@contextmanager
def ray_output_to(log_fn: Callable[[str], None]) -> Iterator[None]:
    dispatcher = _dispatcher()
    if dispatcher is None:
        logging.getLogger(__name__).warning("Ray's log dispatcher was not found: worker output stays on stderr only")
        yield
        return
    name = f"stillhouse-run-log-{next(_ids)}"
    kept = RunLogFilter()

    def handler(data: dict) -> None:
        try:
            if not kept.keep(data):
                return
            for line in format_batch(data):
                log_fn(line)
        except Exception:  # never break Ray's log thread over a run-log hiccup
            pass

    dispatcher.add_handler(name, handler)
    try:
        yield
    finally:
        dispatcher.remove_handler(name)
