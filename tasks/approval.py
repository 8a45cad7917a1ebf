"""Optional human approval before promotion: the flow run pauses with a typed form in the Prefect UI.

`request_approval` must run inside a flow run (the flow body or one of its tasks). The run goes to
Paused; a person fills the form (approve, approver, comment) and resumes it from the UI, or code calls
`prefect.flow_runs.resume_flow_run(flow_run_id, run_input={...})`. The answer comes back as a dict to
store with the decision (run.json, registry entry). No answer within the timeout means not approved.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from prefect.input import RunInput
from pydantic import Field


class ApprovalInput(RunInput):
    """The form shown in the Prefect UI when the flow pauses for approval."""

    approve: bool = Field(..., description="Promote this student to champion?")
    approver: str = Field(..., min_length=1, description="Who decides (name or handle), recorded in the audit trail.")
    comment: str = Field("", description="Why; recorded with the decision.")


def approval_description(decision: dict[str, Any]) -> str:
    """Markdown shown above the form: what the gate decided and why."""
    rules = decision.get("rules") or []
    lines = [f"### Approve promotion of {decision.get('version') or 'this student'}?", "",
             f"Gate: **{'passed' if decision.get('promoted') else 'failed'}** — {decision.get('summary', '')}", ""]
    if rules:
        lines += ["| rule | value | threshold | result | reason |", "|---|---|---|---|---|"]
        for r in rules:
            lines.append(f"| {r.get('name')} | {_fmt(r.get('value'))} | {_fmt(r.get('threshold'))} | "
                         f"{'pass' if r.get('passed') else ('n/a' if r.get('status') == 'not_evaluable' else 'FAIL')} | {str(r.get('reason', '')).replace('|', '/')} |")
    return "\n".join(lines)


def _fmt(x) -> str:
    return "—" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)


def request_approval(decision: dict[str, Any], timeout_s: int, *, poll_interval_s: int = 10, log_fn=None) -> dict[str, Any]:
    """Pause the current flow run until someone answers the approval form, or `timeout_s` passes.

    Returns {"approved", "approver", "comment", "answered_at", "flow_run_id", "timed_out", "timeout_s"}.
    A timeout returns approved=False with timed_out=True (the run itself goes on, so the student
    is still registered as challenger)."""
    from prefect import get_run_logger
    from prefect.context import FlowRunContext
    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import pause_flow_run

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        raise RuntimeError("request_approval must be called inside a Prefect flow run (the flow pauses for the answer)")
    log = log_fn or get_run_logger().info
    flow_run_id = str(ctx.flow_run.id)
    form = ApprovalInput.with_initial_data(description=approval_description(decision), approve=False)
    log(f"approval: waiting up to {timeout_s}s for an answer on flow run {flow_run_id} (Prefect UI: Resume)")
    record: dict[str, Any] = {"flow_run_id": flow_run_id, "timeout_s": timeout_s, "requested_at": _now()}
    try:
        answer = pause_flow_run(wait_for_input=form, timeout=timeout_s, poll_interval=poll_interval_s)
    except FlowPauseTimeout:
        # Prefect leaves the run Paused, and a Paused run cannot complete ("The flow was completed and never
        # resumed"). Our policy is "no answer = not approved, record it", so move the run back to Running.
        _force_running(ctx.flow_run.id)
        record.update(approved=False, approver=None, comment=f"no answer within {timeout_s}s", answered_at=None, timed_out=True)
        log(f"approval: no answer within {timeout_s}s; not approved")
        return record
    record.update(approved=bool(answer.approve), approver=answer.approver, comment=answer.comment, answered_at=_now(), timed_out=False)
    log(f"approval: {'APPROVED' if answer.approve else 'REJECTED'} by {answer.approver}" + (f": {answer.comment}" if answer.comment else ""))
    return record


def _force_running(flow_run_id) -> None:
    from prefect import get_client
    from prefect.states import Running

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Running(message="approval timed out: not approved"), force=True)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
