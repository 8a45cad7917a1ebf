"""The way users run it: a real Prefect server and worker (deploy/stack.sh), the deployment from
deploy/prefect.yaml, a run triggered through the REST API with non-default parameters, as the UI does."""

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import httpx

HTTP = httpx.Client(timeout=60)  # the server can answer slowly while the machine is busy training
import pytest

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    data = tmp_path_factory.mktemp("stack")
    env = {**os.environ, "STILLHOUSE_DATA_DIR": str(data), "PREFECT_PORT": str(_free_port()), "RAY_PORT": str(_free_port())}
    env.pop("PREFECT_API_URL", None)
    up = subprocess.run([str(REPO / "deploy" / "stack.sh"), "up"], env=env, capture_output=True, text=True, timeout=300)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        api = f"http://127.0.0.1:{env['PREFECT_PORT']}/api"
        yield api, data, env
    finally:
        subprocess.run([str(REPO / "deploy" / "stack.sh"), "down"], env=env, capture_output=True, timeout=120)


def _deployment_id(api: str) -> str:
    response = HTTP.get(f"{api}/deployments/name/distill/distill")
    response.raise_for_status()
    return response.json()["id"]


def test_form_validation_rejects_bad_parameters_before_any_work(stack):
    api, data, _ = stack
    deployment = HTTP.get(f"{api}/deployments/name/distill/distill").json()
    schema = deployment["parameter_openapi_schema"]
    assert "PipelineConfig" in schema["definitions"] and schema["definitions"]["TrainConfig"]["properties"]["steps"]["minimum"] == 1
    response = HTTP.post(f"{api}/deployments/{deployment['id']}/create_flow_run", json={"parameters": {"config": {"train": {"steps": 0}}}})
    assert response.status_code in (409, 422)
    assert "config.train.steps" in response.text
    assert not (data / "runs").exists()


def test_run_triggered_through_the_api_completes(stack):
    api, data, _ = stack
    params = {"config": {"run_name": "from-api", "data": {"max_train_examples": 48, "max_eval_examples": 24, "demo_teacher_steps": 20},
                         "teacher": {"top_k": 6, "max_new_tokens": 10, "shard_rows": 24},
                         "train": {"steps": 6, "batch_size": 8, "objective": "akl+ce"},
                         "eval": {"max_new_tokens": 10},
                         "promotion": {"gate": {"rules": [{"metric": "rouge_l", "kind": "absolute", "threshold": 0.0}]}}}}
    response = HTTP.post(f"{api}/deployments/{_deployment_id(api)}/create_flow_run", json={"parameters": params})
    response.raise_for_status()
    run_id = response.json()["id"]
    deadline = time.time() + 900
    state = None
    while time.time() < deadline:
        state = HTTP.get(f"{api}/flow_runs/{run_id}").json()["state"]
        if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            break
        time.sleep(5)
    assert state and state["type"] == "COMPLETED", state
    run = json.loads((data / "runs" / "from-api" / "run.json").read_text())
    assert run["decision"]["promoted"] is True
    assert json.loads(Path(run["soft_labels_manifest"]).read_text())["metadata"]["k"] == 6
    config = json.loads((data / "runs" / "from-api" / "config.json").read_text())
    assert config["train"]["objective"] == "akl+ce"
    artifacts = HTTP.post(f"{api}/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run_id]}}}).json()
    assert {a["key"] for a in artifacts} >= {"eval-metrics", "run-report", "run-comparison"}


def test_stack_down_stops_its_own_services_and_nothing_else(stack):
    """`ray stop` would also kill any other Ray cluster on the machine (this pytest process's own one
    included, which then exits silently); `down` must stop only the stack's process groups."""
    _, data, env = stack
    ray = str(REPO / ".venv" / "bin" / "ray")
    bystander_port = str(_free_port())
    bystander_env = {**os.environ, "RAY_AUTH_MODE": "disabled"}  # as deploy/stack.sh runs its head
    bystander = subprocess.Popen([ray, "start", "--head", "--block", "--port", bystander_port, "--node-ip-address", "127.0.0.1",
                                  "--include-dashboard=false", "--disable-usage-stats", "--num-cpus", "0"],
                                 env=bystander_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        address = f"127.0.0.1:{bystander_port}"
        deadline = time.time() + 120
        while subprocess.run([ray, "status", "--address", address], env=bystander_env, capture_output=True).returncode != 0:
            assert time.time() < deadline, "bystander Ray head did not start"
            time.sleep(1)
        stack_groups = {name: int((data / "stack" / f"{name}.pid").read_text()) for name in ("server", "worker", "ray")}
        down = subprocess.run([str(REPO / "deploy" / "stack.sh"), "down"], env=env, capture_output=True, text=True, timeout=180)
        assert down.returncode == 0, down.stderr
        for name, pgid in stack_groups.items():
            assert subprocess.run(["pgrep", "-g", str(pgid), "-r", "R,S,D,T"], capture_output=True).returncode == 1, f"{name} still running"
        assert subprocess.run([ray, "status", "--address", address], env=bystander_env, capture_output=True).returncode == 0
    finally:
        os.killpg(bystander.pid, 15)
        bystander.wait(timeout=60)
