"""Human approval: a real (test) Prefect server pauses a flow run for typed input; another thread answers it."""

import threading
import time
import uuid

import pytest
from prefect import flow

from tasks.approval import ApprovalInput, approval_description, request_approval

DECISION = {"promoted": True, "version": "v0007", "summary": "promoted: all 1 rule(s) passed",
            "rules": [{"name": "exact_match>=0.2", "value": 0.41, "threshold": 0.2, "passed": True, "reason": "value 0.41 >= 0.2 (absolute threshold)"}]}


def _paused_run_id(flow_name: str, timeout: float = 60.0):
    """Wait until a run of `flow_name` is Paused; return its id."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                                         flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))))
            if runs:
                return runs[0].id
            time.sleep(0.2)
    raise TimeoutError(f"no paused run of {flow_name}")


def _answer_in_thread(flow_name: str, run_input: dict, errors: list, seen: dict) -> threading.Thread:
    from prefect.flow_runs import resume_flow_run

    def answer():
        try:
            run_id = _paused_run_id(flow_name)
            seen["run_id"] = str(run_id)
            time.sleep(0.5)  # let the form schema be saved after the state change
            resume_flow_run(run_id, run_input=run_input)
        except Exception as exc:  # surfaced in the main thread
            errors.append(exc)

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    return thread


def _approval_flow(name: str, timeout_s: int, in_task: bool = False):
    """A tiny flow asking for approval in its body, or (as gate-and-promote would) inside a task."""
    from prefect import task

    @task(name="gate-and-promote-stand-in")
    def ask_in_task() -> dict:
        return request_approval(DECISION, timeout_s=timeout_s, poll_interval_s=1, log_fn=print)

    @flow(name=name)
    def gate_with_approval() -> dict:
        if in_task:
            return ask_in_task()
        return request_approval(DECISION, timeout_s=timeout_s, poll_interval_s=1, log_fn=print)

    return gate_with_approval


@pytest.mark.timeout(180)
@pytest.mark.parametrize("approve,in_task", [(True, False), (False, False), (True, True)])
def test_pause_waits_for_typed_input_and_records_answer(prefect_server, approve, in_task):
    name = f"approval-test-{uuid.uuid4().hex[:8]}"
    errors, seen = [], {}
    thread = _answer_in_thread(name, {"approve": approve, "approver": "alice", "comment": "looked at report.md"}, errors, seen)
    answer = _approval_flow(name, timeout_s=90, in_task=in_task)()
    thread.join(timeout=30)
    assert not errors, errors
    assert answer["approved"] is approve and answer["timed_out"] is False
    assert answer["approver"] == "alice" and answer["comment"] == "looked at report.md"
    assert answer["flow_run_id"] == seen["run_id"] and answer["answered_at"]


@pytest.mark.timeout(120)
def test_answer_is_stored_on_the_server_and_form_describes_the_decision(prefect_server):
    from prefect import get_client

    name = f"approval-test-{uuid.uuid4().hex[:8]}"
    errors, seen = [], {}
    thread = _answer_in_thread(name, {"approve": True, "approver": "bob"}, errors, seen)
    answer = _approval_flow(name, timeout_s=90)()
    thread.join(timeout=30)
    assert not errors, errors
    assert answer["approved"] is True and answer["comment"] == ""

    with get_client(sync_client=True) as client:
        inputs = client.filter_flow_run_input(flow_run_id=uuid.UUID(seen["run_id"]), key_prefix="paused-", limit=10, exclude_keys=set())
    by_key = {i.key: i.value for i in inputs}
    assert any(k.endswith("-response") and '"bob"' in v for k, v in by_key.items()), by_key
    assert any(k.endswith("-description") and "v0007" in v and "exact_match>=0.2" in v for k, v in by_key.items()), by_key


@pytest.mark.timeout(120)
@pytest.mark.parametrize("in_task", [False, True])
def test_no_answer_within_timeout_is_not_approved_and_the_run_completes(prefect_server, in_task):
    answer_flow = _approval_flow(f"approval-test-{uuid.uuid4().hex[:8]}", timeout_s=2, in_task=in_task)
    state = answer_flow(return_state=True)
    assert state.is_completed(), state  # the run goes on to record "not approved" instead of failing
    answer = state.result()
    assert answer["approved"] is False and answer["timed_out"] is True and answer["approver"] is None


def test_request_approval_outside_a_flow_run_is_an_error():
    with pytest.raises(RuntimeError, match="inside a Prefect flow run"):
        request_approval(DECISION, timeout_s=1)


def test_form_is_typed_and_description_lists_rules():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        ApprovalInput(approve="maybe", approver="x")
    with pytest.raises(ValidationError):
        ApprovalInput(approve=True, approver="")
    text = approval_description(DECISION)
    assert "v0007" in text and "| exact_match>=0.2 | 0.41 | 0.2 | pass |" in text
