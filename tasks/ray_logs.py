"""Forward what Ray workers print (vLLM engines in teacher actors, Ray Train workers) into a run log.

Ray already ships every worker's stdout/stderr to the driver, where it is
printed to the driver's own streams; Prefect's run log never sees it. While
`ray_output_to(log_fn)` is active, each forwarded line also goes to `log_fn`
(e.g. a Prefect run logger), prefixed with the actor or task that wrote it.
Ray's dispatcher is not a public API: if it moves, forwarding is skipped with
one warning and the run goes on.

`driver_echo_to(sink)` is for the CLI's quiet console (flows.console): while it
is active, the batches Ray would print on the driver's own stdout/stderr (its
`log_to_driver` printer, the second copy of every worker line) go to `sink`
instead. `log_to_driver` itself stays on, so the run log keeps the lines.
"""

from __future__ import annotations

import itertools
import logging
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

_ids = itertools.count()
_forwarding = threading.local()
# The name under which ray.init (log_to_driver=True) registers its printer on the dispatcher (ray/_private/worker.py).
RAY_PRINTER = "ray_print_logs"


def is_forwarded() -> bool:
    """True while `ray_output_to` hands a worker line to its log function (in that thread): a logging.Filter can
    tell forwarded worker lines from the flow's own records without parsing them."""
    return getattr(_forwarding, "active", False)


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
            _forwarding.active = True
            for line in format_batch(data):
                log_fn(line)
        except Exception:  # never break Ray's log thread over a run-log hiccup
            pass
        finally:
            _forwarding.active = False

    dispatcher.add_handler(name, handler)
    try:
        yield
    finally:
        dispatcher.remove_handler(name)


@contextmanager
def driver_echo_to(sink: Callable[[dict], None]) -> Iterator[bool]:
    """Send the batches Ray prints on the driver's stdout/stderr to `sink` instead, while active.

    Ray registers its printer when `ray.init` runs, which may be before or after this is entered (the stages start
    Ray lazily): an existing printer is swapped now, a later one when Ray registers it. On exit Ray's printer is put
    back if Ray is still connected. Yields False (nothing changed) when Ray's dispatcher is not found."""
    dispatcher = _dispatcher()
    if dispatcher is None:
        yield False
        return

    def guarded(data: dict) -> None:
        try:
            sink(data)
        except Exception:  # never break Ray's log thread
            pass

    saved: list[Callable] = []  # Ray's printer, once seen
    original_add = dispatcher.add_handler

    def add_handler(name: str, handler: Callable) -> None:
        if name == RAY_PRINTER:
            saved[:] = [handler]
            handler = guarded
        original_add(name, handler)

    with dispatcher._lock:
        for i, (name, handler) in enumerate(dispatcher.handlers):
            if name == RAY_PRINTER:
                saved[:] = [handler]
                dispatcher.handlers[i] = (name, guarded)
    dispatcher.add_handler = add_handler  # instance attribute: ray.init calls dispatcher.add_handler(RAY_PRINTER, ...)
    try:
        yield True
    finally:
        del dispatcher.add_handler
        with dispatcher._lock:
            # ray.shutdown removes the printer by name (ours too); put Ray's back only where ours still stands.
            dispatcher.handlers = [(name, saved[0] if handler is guarded and saved else handler)
                                   for name, handler in dispatcher.handlers]
