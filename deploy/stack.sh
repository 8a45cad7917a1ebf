#!/usr/bin/env bash
# Local stack: Prefect server (UI on 127.0.0.1:4200), a process worker, a Ray head; all listen on
# 127.0.0.1 only, and Ray requires its token ($STILLHOUSE_DATA_DIR/stack/ray_auth_token).
#   deploy/stack.sh up     start everything and deploy deploy/prefect.yaml
#   deploy/stack.sh down   stop everything
# Database: SQLite under $STILLHOUSE_DATA_DIR/stack by default; for PostgreSQL set
#   PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://user:pass@host:5432/prefect
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
BIN=$REPO/.venv/bin
DATA=${STILLHOUSE_DATA_DIR:-$REPO/stillhouse-data}
STACK=$DATA/stack
PORT=${PREFECT_PORT:-4200}
RAY_PORT=${RAY_PORT:-6380}
mkdir -p "$STACK"
export PREFECT_HOME=$STACK/prefect
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_API_URL=http://127.0.0.1:$PORT/api
export PREFECT_RESULTS_PERSIST_BY_DEFAULT=true
export PREFECT_RESULTS_LOCAL_STORAGE_PATH=$DATA/prefect-results
export STILLHOUSE_DATA_DIR=$DATA
RAY_CLIENT_PORT=${RAY_CLIENT_PORT:-10001}
export RAY_ACCEPT_AUTH_TOKEN_WARNING=1
# Ray token authentication: the head, `ray status` below, the worker and every flow run it starts (they
# inherit this environment) read the token from this file (mode 0600, created once, never printed).
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=$STACK/ray_auth_token

up() {
  # setsid: each service leads its own process group, so `down` stops its children too.
  setsid "$BIN/prefect" server start --host 127.0.0.1 --port "$PORT" > "$STACK/server.log" 2>&1 &
  echo $! > "$STACK/server.pid"
  for _ in $(seq 1 180); do
    curl -fs "$PREFECT_API_URL/health" > /dev/null 2>&1 && break
    sleep 1
  done
  curl -fs "$PREFECT_API_URL/health" > /dev/null || { echo "Prefect server did not start; see $STACK/server.log" >&2; exit 1; }
  (umask 077; [ -s "$RAY_AUTH_TOKEN_PATH" ] || "$BIN/python" -c 'import secrets; print(secrets.token_hex(32), end="")' > "$RAY_AUTH_TOKEN_PATH")
  # --block keeps `ray start` in the foreground as the head's supervisor: stopping its
  # process group stops this head only (`ray stop` would kill every Ray cluster on the machine).
  # Every Ray listener on 127.0.0.1: `--node-ip-address 127.0.0.1` alone is replaced by the host's
  # routable IP and the gRPC servers then bind all interfaces; RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
  # (single-node mode) keeps the node IP at 127.0.0.1 (see tasks/ray_runtime.py, deploy/CLUSTER.md).
  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 setsid "$BIN/ray" start --head --block --node-ip-address 127.0.0.1 \
    --port "$RAY_PORT" --ray-client-server-port "$RAY_CLIENT_PORT" \
    --include-dashboard=false --disable-usage-stats > "$STACK/ray.log" 2>&1 &
  echo $! > "$STACK/ray.pid"
  for _ in $(seq 1 120); do
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 "$BIN/ray" status --address "127.0.0.1:$RAY_PORT" > /dev/null 2>&1 && break
    sleep 1
  done
  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 "$BIN/ray" status --address "127.0.0.1:$RAY_PORT" > /dev/null 2>&1 \
    || { echo "Ray head did not start; see $STACK/ray.log" >&2; exit 1; }
  export RAY_ADDRESS=127.0.0.1:$RAY_PORT
  "$BIN/prefect" work-pool create stillhouse-process --type process > /dev/null 2>&1 || true
  STILLHOUSE_REPO=$REPO "$BIN/prefect" --no-prompt deploy --all --prefect-file deploy/prefect.yaml > "$STACK/deploy.log" 2>&1 \
    || { echo "deploy failed; see $STACK/deploy.log" >&2; exit 1; }
  setsid "$BIN/prefect" worker start --pool stillhouse-process > "$STACK/worker.log" 2>&1 &
  echo $! > "$STACK/worker.pid"
  echo "Prefect UI:  http://127.0.0.1:$PORT   (runs: Deployments → distill/distill → Run → Custom run)"
  echo "Ray head:    $RAY_ADDRESS   (token auth; token file: $RAY_AUTH_TOKEN_PATH)"
  echo "Logs:        $STACK/*.log"
}

down() {
  # Stop each service's whole process group: TERM, then KILL after 20 s; nothing else is touched.
  for name in worker server ray; do
    pidfile=$STACK/$name.pid
    [ -f "$pidfile" ] || continue
    pgid=$(cat "$pidfile")
    kill -TERM -- "-$pgid" 2> /dev/null || true
    wait_gone "$pgid" 20 || { kill -KILL -- "-$pgid" 2> /dev/null || true; wait_gone "$pgid" 10 || true; }
    rm -f "$pidfile"
  done
  echo "stack stopped"
}

# wait_gone PGID SECONDS: true once no live (non-zombie) process is left in the group.
wait_gone() {
  for _ in $(seq 1 "$2"); do
    pgrep -g "$1" -r R,S,D,T > /dev/null || return 0
    sleep 1
  done
  ! pgrep -g "$1" -r R,S,D,T > /dev/null
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
