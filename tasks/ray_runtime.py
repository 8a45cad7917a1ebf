"""Start or join Ray once per process; the same code runs locally and on a cluster.

The private local Ray listens on 127.0.0.1 only and requires a token (Ray 2.60):

* Binding. Ray has no bind-address option: its gRPC servers (GCS, raylet node and object managers,
  every worker's core-worker server) listen on all interfaces unless the node's IP is a loopback address,
  and the runtime-env agent, the autoscaler's metrics server and the client server listen on the node IP.
  `ray.init(_node_ip_address="127.0.0.1")` does not help: `ray.init` (and `ray start --node-ip-address`)
  replace a loopback address with the host's routable one (`services.resolve_ip_for_localhost`) unless
  `ray_constants.ENABLE_RAY_CLUSTER` is false, which `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` sets: "single
  node", the node IP stays 127.0.0.1 and every listener above binds to it (tests/test_listeners.py).
  A driver joining such a head needs the same switch, or Ray dials the routable IP instead of 127.0.0.1.
* Authentication. `RAY_AUTH_MODE=token`: every gRPC call and dashboard request must carry the cluster's
  token, read from `RAY_AUTH_TOKEN`, the file `RAY_AUTH_TOKEN_PATH`, or `~/.ray/auth_token` (created here
  with mode 0600 when none exists; Ray's own writer leaves it readable by every local user).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import secrets
import stat
from pathlib import Path

LOOPBACK = "127.0.0.1"
# Ray 2.60's switch for "this machine is not part of a multi-node cluster": the node IP stays loopback.
SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

log = logging.getLogger(__name__)


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join `address` (or RAY_ADDRESS) if given, else start a private local Ray on 127.0.0.1 with token auth."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ACCEPT_AUTH_TOKEN_WARNING", "1")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # The cluster's auth mode and token come from the environment (deploy/stack.sh, deploy/CLUSTER.md).
        # A head on 127.0.0.1 (make stack) is only reached as 127.0.0.1: Ray would otherwise dial the host's
        # routable IP instead, where nothing listens.
        with _node_ip_on_loopback() if is_loopback_address(address) else contextlib.nullcontext():
            ray.init(address=address, log_to_driver=True)
        return
    _token_auth_on()
    ensure_local_token()
    with _node_ip_on_loopback():
        # address="local": always a private cluster, never one that happens to run on this machine.
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=True)


def is_loopback_address(address: str) -> bool:
    """True for a Ray address on this machine's loopback: 127.0.0.1:6380, localhost:6380, ray://[::1]:10001."""
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _token_auth_on() -> None:
    """RAY_AUTH_MODE=token for this process and its children (Ray's C++ config reads it once: refresh it)."""
    from ray._raylet import Config

    os.environ["RAY_AUTH_MODE"] = "token"
    Config.initialize("")


def ensure_local_token() -> None:
    """Make sure a token exists where Ray looks for one; create ~/.ray/auth_token (0600) if none does."""
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    path = Path.home() / ".ray" / "auth_token"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("%s is readable by other users, who can then use this machine's Ray clusters; "
                        "run `chmod 600 %s`", path, path)
        return
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes: 256 random bits


@contextlib.contextmanager
def _node_ip_on_loopback():
    """While Ray starts: keep the node IP at 127.0.0.1 in this process and in the processes Ray spawns."""
    from ray._private import ray_constants

    saved_env, saved_flag = os.environ.get(SINGLE_NODE_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[SINGLE_NODE_ENV] = "0"  # the GCS, raylet and agents inherit it; workers inherit the raylet's
    ray_constants.ENABLE_RAY_CLUSTER = False  # read at import: this process may have imported ray already
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(SINGLE_NODE_ENV, None)
        else:
            os.environ[SINGLE_NODE_ENV] = saved_env


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 0))


def cluster_resources() -> dict[str, float]:
    import ray

    return {name: float(amount) for name, amount in ray.cluster_resources().items()}
