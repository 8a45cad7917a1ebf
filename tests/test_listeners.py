"""Nothing of ours listens beyond this machine, and Ray wants its token (issue 20, item 1).

Both Rays - the flow's private one (`tasks.ray_runtime.ensure_ray`) and the head of `make stack`
(`deploy/stack.sh`, with its Prefect server and worker) - are started for real; every listening TCP socket
of their process trees (psutil) must be on 127.0.0.1 / ::1 (an IPv6 socket on ::ffff:127.0.0.1 is the same
loopback). A GCS client without the token is refused; a driver with the environment the stack's worker gives
its flow runs joins. The stack's checks run on the stack that tests/test_prefect_server.py starts for its flow
runs (`check_stack_listeners`, here so both Rays' rules sit together): one stack start fewer in the suite.
"""

import ipaddress
import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]

# Run in a fresh interpreter: a GCS client with the auth settings of its environment.
GCS_PROBE = textwrap.dedent(
    """
    import sys
    from ray._raylet import GcsClient
    from ray.exceptions import AuthenticationError
    try:
        GcsClient(address=sys.argv[1])  # fetches the cluster id from the GCS: an authenticated call
    except AuthenticationError as e:
        print("REFUSED", str(e).splitlines()[0][:200])
    else:
        print("ACCEPTED")
    """
)

LOCAL_RAY = textwrap.dedent(
    """
    import json, os, subprocess, sys, time
    import psutil, ray
    from tasks.ray_runtime import ensure_ray

    if __name__ == "__main__":
        for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
            os.environ.pop(name, None)
        ensure_ray(num_cpus=1)

        @ray.remote
        class Probe:  # an actor and a task: workers' own gRPC servers listen too
            def pid(self):
                return os.getpid()

        actor = Probe.remote()
        ray.get([actor.pid.remote(), ray.remote(lambda: 1).remote()])
        time.sleep(5)  # agents and metrics servers come up after the first task
        me = psutil.Process()
        listeners = []
        for proc in [me] + me.children(recursive=True):
            try:
                listeners += [[proc.pid, proc.name(), c.laddr.ip, c.laddr.port] for c in proc.net_connections(kind="inet")
                              if c.status == psutil.CONN_LISTEN]
            except psutil.NoSuchProcess:
                pass
        gcs = ray.get_runtime_context().gcs_address
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        no_token = subprocess.run([sys.executable, "-c", sys.argv[1], gcs], env={**env, "RAY_AUTH_MODE": "disabled"},
                                  capture_output=True, text=True, timeout=120).stdout
        print("RESULT " + json.dumps({"listeners": listeners, "gcs": gcs, "no_token": no_token}))
        ray.shutdown()
    """
)


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def _listeners(procs) -> list[tuple[int, str, str, int]]:
    found = set()
    for proc in procs:
        try:
            found |= {(proc.pid, proc.name(), c.laddr.ip, c.laddr.port) for c in proc.net_connections(kind="inet")
                      if c.status == psutil.CONN_LISTEN}
        except psutil.NoSuchProcess:
            pass
    return sorted(found)


def _tree(pgid: int) -> list[psutil.Process]:
    """The process group's members and every descendant of its leader (Ray's children may start sessions)."""
    procs = {p.pid: p for p in psutil.process_iter() if _pgid(p.pid) == pgid}
    try:
        procs.update({p.pid: p for p in psutil.Process(pgid).children(recursive=True)})
    except psutil.NoSuchProcess:
        pass
    return list(procs.values())


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def test_flow_local_ray_listens_on_loopback_only_and_refuses_clients_without_token(tmp_path):
    (tmp_path / "local_ray.py").write_text(LOCAL_RAY)
    proc = subprocess.run([sys.executable, str(tmp_path / "local_ray.py"), GCS_PROBE], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[len("RESULT "):])
    listeners = result["listeners"]
    names = {name for _, name, _, _ in listeners}
    assert {"gcs_server", "raylet"} <= names, f"expected the GCS and raylet among the listeners: {listeners}"
    exposed = [entry for entry in listeners if not _is_loopback(entry[2])]
    assert not exposed, f"listening beyond loopback: {exposed}"
    assert result["gcs"].startswith("127.0.0.1:"), result["gcs"]
    assert result["no_token"].startswith("REFUSED"), result["no_token"]


def check_stack_listeners(data: Path, env: dict[str, str], up: subprocess.CompletedProcess) -> None:
    """`make stack` (deploy/stack.sh up, its output in ``up``, run with ``env``): Prefect, the GCS and Ray's client
    server listen on their ports and on loopback only, the Ray token is private and never logged, the worker hands
    flow runs its path, and a flow run's driver joins while clients without the token (or with a wrong one) are refused."""
    ports = {name: int(env[name]) for name in ("PREFECT_PORT", "RAY_PORT", "RAY_CLIENT_PORT")}
    env = {k: v for k, v in env.items() if k != "RAY_ADDRESS" and not k.startswith("RAY_AUTH")}  # clients of their own
    stack = data / "stack"
    groups = {name: int((stack / f"{name}.pid").read_text()) for name in ("server", "worker", "ray")}
    listeners = {name: _listeners(_tree(pgid)) for name, pgid in groups.items()}
    ports_open = {port for entries in listeners.values() for *_, port in entries}
    assert set(ports.values()) <= ports_open, f"Prefect, GCS or client server not listening: {listeners}"
    assert {name for _, name, _, _ in listeners["ray"]} >= {"gcs_server", "raylet"}
    exposed = {name: [e for e in entries if not _is_loopback(e[2])] for name, entries in listeners.items()}
    assert not any(exposed.values()), f"listening beyond loopback: {exposed}"

    # The token: a private file, never in the logs; the worker hands its path (not the token) to flow runs.
    token_file = stack / "ray_auth_token"
    token = token_file.read_text()
    assert len(token) == 64 and stat.S_IMODE(token_file.stat().st_mode) == 0o600
    for text in [up.stdout, up.stderr] + [p.read_text(errors="replace") for p in stack.glob("*.log")]:
        assert token not in text, "the Ray token was written to a log"
    worker_env = psutil.Process(groups["worker"]).environ()
    assert worker_env.get("RAY_AUTH_MODE") == "token" and worker_env.get("RAY_AUTH_TOKEN_PATH") == str(token_file)
    assert "RAY_AUTH_TOKEN" not in worker_env

    # What a flow run does with the worker's environment: ensure_ray joins the head and runs a task.
    join = subprocess.run(
        [sys.executable, "-c", "import ray; from tasks.ray_runtime import ensure_ray; ensure_ray(); "
         "print('JOINED', ray.get(ray.remote(lambda: 41 + 1).remote(), timeout=120), "
         "ray.get_runtime_context().gcs_address)"],
        cwd=REPO, env={**worker_env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert f"JOINED 42 127.0.0.1:{ports['RAY_PORT']}" in join.stdout, (join.stdout + join.stderr)[-4000:]

    with_token = subprocess.run([sys.executable, "-c", GCS_PROBE, f"127.0.0.1:{ports['RAY_PORT']}"], env=worker_env,
                                capture_output=True, text=True, timeout=120)
    assert with_token.stdout.startswith("ACCEPTED"), with_token.stdout + with_token.stderr[-2000:]  # the probe can pass
    no_token = subprocess.run([sys.executable, "-c", GCS_PROBE, f"127.0.0.1:{ports['RAY_PORT']}"],
                              env={**env, "RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True, timeout=120)
    assert no_token.stdout.startswith("REFUSED"), no_token.stdout + no_token.stderr[-2000:]
    wrong = subprocess.run([sys.executable, "-c", GCS_PROBE, f"127.0.0.1:{ports['RAY_PORT']}"],
                           env={**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64},
                           capture_output=True, text=True, timeout=120)
    assert wrong.stdout.startswith("REFUSED"), wrong.stdout + wrong.stderr[-2000:]
