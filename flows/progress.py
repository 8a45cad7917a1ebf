"""CLI progress bars for the long stages, fed by the lines the stages already print.

The teacher replicas print "teacher: <role> shard i/n ..." and the rank-0
trainer prints "train: step s/N loss ... | r tok/s, eta e s"; Ray forwards them
to the driver (tasks.ray_logs). Building the demo assets logs "demo teacher:
step s/N ..." and "demo base student: step s/N ..." (flows.console feeds those
from the run log). Parsing those lines keeps the stages free of any UI code, and
a run on a cluster shows the same bars as a local one.
"""

from __future__ import annotations

import re
import sys
import threading
from typing import TextIO

SHARD = re.compile(r"teacher: (\w+) shard (\d+)/(\d+)")
STEP = re.compile(r"train: step (\d+)/(\d+) loss ([-\d.e+]+)(?:.*?\| (\d+) tok/s)?")
DEMO = re.compile(r"demo (teacher|base student): step (\d+)/(\d+)")


class StageProgress:
    """One tqdm bar per stage ('teacher <role>' in shards, 'train' in steps, 'demo <model>' in steps), updated from
    log lines; `write` prints a line above the bars."""

    def __init__(self, stream: TextIO | None = None, enabled: bool | None = None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.bars: dict[str, object] = {}
        self._lock = threading.RLock()  # fed from Ray's log thread and from the logging call sites

    def _bar(self, name: str, total: int, unit: str):
        from tqdm import tqdm

        bar = self.bars.get(name)
        if bar is None or bar.total != total:
            bar = self.bars[name] = tqdm(total=total, desc=name, unit=unit, file=self.stream, leave=True, dynamic_ncols=True)
        return bar

    def feed(self, line: str) -> None:
        if not self.enabled:
            return
        with self._lock:
            if match := SHARD.search(line):
                role, total = match.group(1), int(match.group(3))
                bar = self._bar(f"teacher {role}", total, "shard")
                bar.update(1)  # shards finish in any order across replicas: count them
            elif match := STEP.search(line):
                step, total = int(match.group(1)), int(match.group(2))
                bar = self._bar("train", total, "step")
                bar.update(step - bar.n)
                postfix = {"loss": float(match.group(3))}
                if match.group(4):
                    postfix["tok/s"] = int(match.group(4))
                bar.set_postfix(postfix, refresh=True)
            elif match := DEMO.search(line):
                step, total = int(match.group(2)), int(match.group(3))
                bar = self._bar(f"demo {match.group(1)}", total, "step")
                bar.update(step - bar.n)

    def write(self, text: str) -> None:
        """Print `text` (one or more lines) above the open bars, or plainly when there are none."""
        with self._lock:
            if self.bars:
                from tqdm import tqdm

                tqdm.write(text, file=self.stream)
            else:
                self.stream.write(text + "\n")
                self.stream.flush()

    def close(self) -> None:
        with self._lock:
            for bar in self.bars.values():
                bar.close()
            self.bars.clear()
