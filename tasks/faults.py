"""Test-only faults, passed explicitly from the flow's parameters to the stages that honour them.

Production runs carry the empty plan. Tests use it to SIGKILL a training worker
at a step, or to slow shards and steps down so a kill lands mid-stage; nothing
reads fault settings from the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints


class FaultPlan(BaseModel):
    """Faults to inject (testing only; leave empty)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kill_train_at_step: int | None = Field(None, ge=1, description="SIGKILL training rank 0 when it starts this step (once).")
    kill_marker: str | None = Field(None, description="File created at the kill, so a restarted worker is not killed again.")
    shard_pause_s: float = Field(0.0, ge=0, description="Sleep after each teacher shard (widens the window for a kill).")
    step_pause_s: float = Field(0.0, ge=0, description="Sleep before each training step (widens the window for a kill).")
    kill_onpolicy_round: int | None = Field(None, ge=0, description="On-policy stage: SIGKILL the stage process in this round (once).")
    kill_onpolicy_phase: str = Field("start", pattern="^(start|rollouts|scoring)$",
                                     description="Where in that round: start (a round boundary), after the rollouts, after scoring.")
    kill_onpolicy_points: tuple[Annotated[str, StringConstraints(pattern=r"^\d+:(start|rollouts|scoring)$")], ...] = Field(
        (), description="On-policy stage: more kill points as 'round:phase' (e.g. '2:rollouts'), each once (its own marker).")

    def kill_round_now(self, round_index: int, phase: str) -> bool:
        """True once per kill point (`kill_onpolicy_round`/`_phase`, or one of `kill_onpolicy_points`), unless its
        marker says it already happened."""
        if self.kill_onpolicy_round == round_index and self.kill_onpolicy_phase == phase:
            return self._first_time()
        if f"{round_index}:{phase}" in self.kill_onpolicy_points:
            return self._first_time(f".{round_index}-{phase}")
        return False

    def kill_now(self, step: int, rank: int) -> bool:
        """True once: on rank 0 at `kill_train_at_step`, unless the marker says it already happened."""
        if self.kill_train_at_step is None or rank != 0 or step + 1 != self.kill_train_at_step:
            return False
        return self._first_time()

    def _first_time(self, suffix: str = "") -> bool:
        """Claim the kill: False when the marker file says it already happened (a restarted process)."""
        if self.kill_marker is None:
            return True
        marker = Path(self.kill_marker + suffix)
        if marker.exists():
            return False
        marker.touch()
        return True


NO_FAULTS = FaultPlan()
