"""The way users run it: a real Prefect server and worker (deploy/stack.sh), the deployment from
deploy/prefect.yaml, a run triggered through the REST API with non-default parameters, as the UI does."""

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

HTTP = httpx.Client(timeout=60)  # the server can answer slowly while the machine is busy training

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]  # the module fixture builds demo assets and runs whole flows

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    data = tmp_path_factory.mktemp("stack")
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "RAY_ADDRESS") and not k.startswith("RAY_AUTH")}
    env.update({"STILLHOUSE_DATA_DIR": str(data), "PREFECT_PORT": str(_free_port()), "RAY_PORT": str(_free_port()),
                "RAY_CLIENT_PORT": str(_free_port())})
    up = subprocess.run([str(REPO / "deploy" / "stack.sh"), "up"], env=env, capture_output=True, text=True, timeout=300)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        api = f"http://127.0.0.1:{env['PREFECT_PORT']}/api"
        yield api, data, env, up
    finally:
        subprocess.run([str(REPO / "deploy" / "stack.sh"), "down"], env=env, capture_output=True, timeout=120)


def _wait_state(api: str, run_id: str, types: tuple[str, ...], timeout: float = 900) -> dict:
    deadline = time.time() + timeout
    state = None
    while time.time() < deadline:
        state = HTTP.get(f"{api}/flow_runs/{run_id}").json()["state"]
        if state["type"] in types:
            return state
        time.sleep(2)
    raise AssertionError(f"flow run {run_id} did not reach {types} in {timeout}s; last state {state}")


def _run_logs(api: str, run_id: str) -> list[str]:
    messages, offset = [], 0
    while True:
        page = HTTP.post(f"{api}/logs/filter", json={"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200, "offset": offset}).json()
        messages += [entry["message"] for entry in page]
        if len(page) < 200:
            return messages
        offset += 200


def _flow_run_processes(run_id: str) -> list[int]:
    """The flow-run process the worker started for this run, and its children (they inherit its environment)."""
    marker = f"PREFECT__FLOW_RUN_ID={run_id}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker in (proc / "environ").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def _sigkill_flow_run(api: str, run_id: str) -> None:
    pids = _flow_run_processes(run_id)
    assert pids, "no process carries this flow run's id"
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    state = _wait_state(api, run_id, ("CRASHED", "FAILED", "COMPLETED"), timeout=180)
    assert state["type"] in ("CRASHED", "FAILED"), f"killed too late: {state}"


def _retry_like_the_ui(api: str, run_id: str) -> None:
    """What the UI's Retry button sends (prefect-ui RetryFlowRunDialog)."""
    response = HTTP.post(f"{api}/flow_runs/{run_id}/set_state",
                         json={"state": {"type": "SCHEDULED", "name": "AwaitingRetry", "message": "Retry from the UI"}, "force": True})
    response.raise_for_status()


def _retry_until_it_runs(api: str, run_id: str, attempts: int = 3) -> None:
    """Retry as the UI does until the run is running again. After a SIGKILL both the process runner and, a moment
    later, the worker may report the crash; a Retry sent between the two reports is undone by the second (seen
    once in a full suite run here), so a run that falls back to CRASHED before it ran is retried again."""
    for _ in range(attempts):
        _retry_like_the_ui(api, run_id)
        state = _wait_state(api, run_id, ("RUNNING", "COMPLETED", "CRASHED", "FAILED"), timeout=300)
        if state["type"] != "CRASHED":
            return
        time.sleep(2)
    raise AssertionError(f"flow run {run_id} did not start again after {attempts} retries: {state}")


def _poll(predicate, what: str, timeout: float = 600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _deployment_id(api: str) -> str:
    response = HTTP.get(f"{api}/deployments/name/distill/distill")
    response.raise_for_status()
    return response.json()["id"]


def test_stack_listens_on_loopback_only_with_token_auth_and_flow_runs_join(stack):
    """Checked first, on this module's stack before its flow runs (tests/test_listeners.py holds the checks)."""
    from tests.test_listeners import check_stack_listeners

    _, data, env, up = stack
    check_stack_listeners(data, env, up)


def test_form_validation_rejects_bad_parameters_before_any_work(stack):
    api, data, _, _ = stack
    deployment = HTTP.get(f"{api}/deployments/name/distill/distill").json()
    schema = deployment["parameter_openapi_schema"]
    assert "PipelineConfig" in schema["definitions"] and schema["definitions"]["TrainConfig"]["properties"]["steps"]["minimum"] == 1
    response = HTTP.post(f"{api}/deployments/{deployment['id']}/create_flow_run", json={"parameters": {"config": {"train": {"steps": 0}}}})
    assert response.status_code in (409, 422)
    assert "config.train.steps" in response.text
    assert not (data / "runs").exists()


def test_api_run_killed_during_capture_and_training_then_ui_retry_resumes_and_completes(stack):
    """A run triggered through the REST API with non-default parameters (as the UI's form does). Kill the flow-run
    process mid-capture, Retry as the UI does, kill it again mid-training, Retry again: finished shards and
    checkpoints are reused, no label row is lost or duplicated, and the run completes with its artifacts, run.json
    and the workers' output in its run log."""
    api, data, _, _ = stack
    params = {"config": {"run_name": "killed", "data": {"max_train_examples": 48, "max_eval_examples": 16, "demo_teacher_steps": 20, "demo_base_steps": 20},
                         "teacher": {"top_k": 5, "max_new_tokens": 10, "shard_rows": 8},
                         "train": {"steps": 8, "batch_size": 8, "checkpoint_every": 2, "objective": "akl+ce"},
                         "eval": {"max_new_tokens": 10},
                         "promotion": {"gate": {"rules": [{"metric": "rouge_l", "kind": "absolute", "threshold": 0.0}]}}}}
    # The flow's explicit fault seam (tasks.faults.FaultPlan), for this run only: pause after each shard and each
    # step so the kills land mid-stage.
    params["faults"] = {"shard_pause_s": 3, "step_pause_s": 2}
    before = set((data / "cache" / "labels").glob("*"))
    trained_before = set((data / "cache" / "train").glob("*"))
    response = HTTP.post(f"{api}/deployments/{_deployment_id(api)}/create_flow_run", json={"parameters": params})
    response.raise_for_status()
    run_id = response.json()["id"]

    # 1. Killed while the teacher writes its training shards (6 of 8 rows each).
    def two_train_shards():
        new = [d for d in (data / "cache" / "labels").glob("*") if d not in before]
        shards = sorted(new[0].glob("train/shard-*.parquet")) if new else []
        return (new[0], shards) if len(shards) >= 2 else None

    labels_dir, _ = _poll(two_train_shards, "two finished training shards")
    _sigkill_flow_run(api, run_id)
    assert not (labels_dir / "train" / "manifest.json").exists(), "killed too late: the capture had finished"
    finished = {p.name: p.stat().st_mtime_ns for p in (labels_dir / "train").glob("shard-*.parquet")}
    _retry_until_it_runs(api, run_id)

    # 2. Killed again after the trainer saved a checkpoint.
    def train_log_at_step_three():
        logs = [d / "train_log.jsonl" for d in (data / "cache" / "train").glob("*") if d not in trained_before]
        steps = [json.loads(line)["step"] for line in logs[0].read_text().splitlines()] if logs and logs[0].exists() else []
        return logs[0] if steps and max(steps) >= 3 else None

    train_log = _poll(train_log_at_step_three, "training past its first checkpoint")
    _sigkill_flow_run(api, run_id)
    assert not (train_log.parent / "student").exists(), "killed too late: training had finished"
    _retry_until_it_runs(api, run_id)

    state = _wait_state(api, run_id, ("COMPLETED", "FAILED", "CRASHED"))
    assert state["type"] == "COMPLETED", state
    logs = "\n".join(_run_logs(api, run_id))

    # Capture: shards finished before the kill were reused as they were; the manifest covers every prompt once.
    for name, mtime in finished.items():
        assert (labels_dir / "train" / name).stat().st_mtime_ns == mtime, f"{name} was rewritten"
    assert f"teacher: train shard {len(finished)}/6 already complete, skipped" in logs
    from storage import soft_labels

    manifest = soft_labels.load_manifest(labels_dir / "train" / "manifest.json")
    assert [shard["rows"] for shard in manifest["shards"]] == [8] * 6
    rows = list(soft_labels.read(labels_dir / "train" / "manifest.json"))
    assert len(rows) == 48 and len({r["sample_id"] for r in rows}) == 48
    assert len({r["example_id"] for r in rows}) == 48

    # Training: resumed from its checkpoint, not from step 1, and finished all steps.
    assert "train: resumed from checkpoint at step" in logs
    steps = [json.loads(line)["step"] for line in train_log.read_text().splitlines()]
    assert steps[-1] == 8 and len(steps) < 8 + 8
    run = json.loads((data / "runs" / "killed" / "run.json").read_text())
    assert run["soft_labels_manifest"] == str(labels_dir / "train" / "manifest.json")

    # The form's parameters reached the stages; the outputs and reports exist; the workers' output is in the run log.
    assert manifest["metadata"]["k"] == 5 and run["decision"]["promoted"] is True
    assert json.loads((data / "runs" / "killed" / "config.json").read_text())["train"]["objective"] == "akl+ce"
    artifacts = HTTP.post(f"{api}/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run_id]}}}).json()
    assert {a["key"] for a in artifacts} >= {"eval-metrics", "run-report", "run-comparison"}
    assert "[TeacherReplica" in logs and "teacher: train shard 1/6" in logs, "teacher actor output missing from the run log"
    assert "train: step 8/8" in logs, "trainer output missing from the run log"


def test_api_onpolicy_run_killed_between_and_during_rounds_then_ui_retry_resumes_at_the_round(stack):
    """An on-policy (MiniLLM) run through the API: the flow-run process is SIGKILLed at the start of round 2 (round 1
    finished) and, after a Retry as the UI does, again in round 3 after its rollouts were written. Each Retry resumes
    at the round where it stopped: finished rounds are skipped, round 3's rollouts (same policy version and weights)
    are reused, every round trained on rollouts of its own policy version, and the gate runs on the final student.
    The labels and demo assets are the previous test's (same settings), so only the rounds and evaluation run."""
    api, data, _, _ = stack
    params = {"config": {"run_name": "killed-onpolicy",
                         "data": {"max_train_examples": 48, "max_eval_examples": 16, "demo_teacher_steps": 20, "demo_base_steps": 20},
                         "teacher": {"top_k": 5, "max_new_tokens": 10, "shard_rows": 8},
                         "onpolicy": {"method": "minillm", "rounds": 3, "prompts_per_round": 4, "max_new_tokens": 6,
                                      "inner_epochs": 1, "batch_size": 4, "lm_batch_size": 4, "top_k": 5},
                         "eval": {"max_new_tokens": 10},
                         "promotion": {"gate": {"rules": [{"metric": "rouge_l", "kind": "absolute", "threshold": 0.0}]}}},
              # The flow's fault seam: the stage process SIGKILLs itself at these points, once each (marker files).
              "faults": {"kill_onpolicy_points": ["1:start", "2:rollouts"], "kill_marker": str(data / "onpolicy-kill")}}
    response = HTTP.post(f"{api}/deployments/{_deployment_id(api)}/create_flow_run", json={"parameters": params})
    response.raise_for_status()
    run_id = response.json()["id"]

    for point in ("1-start", "2-rollouts"):
        state = _wait_state(api, run_id, ("CRASHED", "FAILED", "COMPLETED"))
        assert state["type"] in ("CRASHED", "FAILED"), f"not killed at {point}: {state}"
        assert (data / f"onpolicy-kill.{point}").exists(), f"died elsewhere than at {point}: {state}"
        _retry_until_it_runs(api, run_id)
    state = _wait_state(api, run_id, ("COMPLETED", "FAILED", "CRASHED"))
    assert state["type"] == "COMPLETED", state

    logs = "\n".join(_run_logs(api, run_id))
    (folder,) = [p.parent for p in (data / "cache" / "onpolicy").glob("*/rounds.jsonl")]
    rounds = [json.loads(line) for line in (folder / "rounds.jsonl").read_text().splitlines()]
    assert [r["policy_version"] for r in rounds] == [0, 1, 2], "one record per round, each round once"
    assert all(r["rollouts"] == 4 and r["reverse_kl"] >= 0 and abs(r["logprob_mismatch_max"]) < 1e-3 for r in rounds)
    # MiniLLM's teacher-mixed sampling (exact, lockstep), recorded in the stage's metadata; mixing shows in the weights.
    meta = json.loads((folder / "onpolicy_meta.json").read_text())
    assert meta["sampler"] == "teacher_mixed_hf" and meta["alpha"] == 0.2
    assert any(r["importance_weight_min"] < 1.0 or r["importance_weight_mean"] != 1.0 for r in rounds)
    # After the first kill round 1 was skipped; after the second, rounds 1-2 were, and round 3 reused its rollouts.
    assert logs.count("onpolicy: round 1/3 already complete") == 2 and logs.count("onpolicy: round 2/3 already complete") == 1
    assert "onpolicy: round 3/3 policy v2" in logs and "(rollouts reused)" in logs
    from tasks.onpolicy.rounds import load_round_records

    for r in range(3):
        assert {row["policy_version"] for row in load_round_records(folder / f"round-{r}", r)} == {r}
    run = json.loads((data / "runs" / "killed-onpolicy" / "run.json").read_text())
    assert run["status"] == "completed" and run["student_checkpoint"] == str(folder / "student")
    artifacts = HTTP.post(f"{api}/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run_id]}}}).json()
    assert {a["key"] for a in artifacts} >= {"onpolicy-rounds", "eval-metrics", "run-report"}


def test_stack_down_stops_its_own_services_and_nothing_else(stack, ray_local):
    """`ray stop` would also kill any other Ray cluster on the machine - this pytest process's own one included, which
    then exits silently (a red CI once); `down` must stop only the stack's process groups."""
    import ray

    _, data, env, _ = stack
    stack_groups = {name: int((data / "stack" / f"{name}.pid").read_text()) for name in ("server", "worker", "ray")}
    down = subprocess.run([str(REPO / "deploy" / "stack.sh"), "down"], env=env, capture_output=True, text=True, timeout=180)
    assert down.returncode == 0, down.stderr
    for name, pgid in stack_groups.items():
        assert subprocess.run(["pgrep", "-g", str(pgid), "-r", "R,S,D,T"], capture_output=True).returncode == 1, f"{name} still running"
    assert ray.get(ray.remote(lambda: "alive").remote(), timeout=60) == "alive", "the test session's own Ray cluster was stopped"
