#!/usr/bin/env bash
# A real multi-node Ray cluster on one machine, for development and tests: a head node and N worker nodes, each
# its own `ray start --block` process group with its own resources, ports and temp dir. Token auth stays on.
#
#   cluster/local.sh up [--workers N] [--head-cpus C] [--worker-cpus C] [--port P] [--private DIR]
#   cluster/local.sh status | down
#   cluster/local.sh stop-node K | start-node K      # kill -9 every process of worker node K / bring it back
#   source "$(cluster/local.sh env)"                 # RAY_ADDRESS, RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH, dashboard
#
# --private DIR: nodes that share no disk there, as on a cloud cluster whose nodes have only their own disks: each
# node runs in its own mount namespace with an empty tmpfs mounted over DIR (needs root or user namespaces), and keeps
# its node-local cache (SHORTENED_CACHE_DIR) inside it. Files one node writes under DIR no other node sees; what must
# move between nodes has to go through an object store (s3://...).
#
# State (pids, logs, token, temp dirs) lives in $SHORTENED_CLUSTER_DIR (default /tmp/shortened-cluster-PORT; kept
# short because Ray's unix socket paths are limited to ~107 characters). `down` stops only this cluster's processes,
# never other Ray instances on the machine.
set -euo pipefail

PORT=${SHORTENED_CLUSTER_PORT:-6390}
WORKERS=2
HEAD_CPUS=1
WORKER_CPUS=2
OBJECT_STORE_BYTES=${SHORTENED_CLUSTER_OBJECT_STORE:-300000000}  # per node; they all share this machine's /dev/shm
# the project's venv first (make venv), else whatever `ray` is on PATH; RAY=... overrides both
VENV_RAY="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/ray"
if [ -z "${RAY:-}" ]; then if [ -x "$VENV_RAY" ]; then RAY=$VENV_RAY; else RAY=$(command -v ray || true); fi; fi
[ -x "${RAY:-}" ] || { echo "local.sh: no ray executable (run make venv, or set RAY=/path/to/ray)" >&2; exit 2; }

cmd=${1:-}; shift || true
while [ $# -gt 0 ]; do
  case "$1" in
    --workers) WORKERS=$2; shift 2 ;;
    --head-cpus) HEAD_CPUS=$2; shift 2 ;;
    --worker-cpus) WORKER_CPUS=$2; shift 2 ;;
    --port) PORT=$2; shift 2 ;;
    --private) PRIVATE=$2; shift 2 ;;
    [0-9]*) NODE=$1; shift ;;
    *) echo "local.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
DIR=${SHORTENED_CLUSTER_DIR:-/tmp/shortened-cluster-$PORT}
DASHBOARD_PORT=$((PORT + 1875))   # 6390 -> 8265, Ray's default; other ports move with --port
# Ray's socket paths (DIR/nodeK/t/session_<date>_<time>_<pid>/sockets/<name>) must stay under 107 bytes
[ ${#DIR} -le 40 ] || { echo "local.sh: SHORTENED_CLUSTER_DIR $DIR is too long (${#DIR} > 40 characters): Ray's unix \
socket paths under it would exceed 107 bytes" >&2; exit 2; }

die() { echo "local.sh: $*" >&2; exit 1; }
# every process of node K: its `ray start` and all descendants (Ray workers setsid themselves, so the process
# group alone misses them)
node_pids() {
  local root frontier next
  root=$(cat "$1/pid" 2>/dev/null) || return 0
  frontier=$root; echo "$root"
  while [ -n "$frontier" ]; do
    next=$(ps -eo pid=,ppid= | awk -v p=" $frontier " 'index(p, " " $2 " ") {print $1}' | tr '\n' ' ')
    [ -n "${next// /}" ] && echo "$next"
    frontier=$(echo "$next" | xargs)
  done
}
kill_node() {  # kill_node DIR SIGNAL
  local pids; pids=$(node_pids "$1" | xargs)
  [ -n "$pids" ] && kill "-$2" $pids 2>/dev/null || true
}
alive() { [ -f "$1/pid" ] && kill -0 "$(cat "$1/pid")" 2>/dev/null; }

# Each node gets its own block of ports: node K (head = 0) uses BASE+K*100 .. BASE+K*100+99.
start_node() {  # start_node K CPUS [--head]
  local k=$1 cpus=$2 head=${3:-} nd="$DIR/node$1" base=$((30000 + (PORT % 10) * 2000 + $1 * 100))
  mkdir -p "$nd/t"
  alive "$nd" && die "node $k is already running (pid $(cat "$nd/pid"))"
  local args=(--block --disable-usage-stats --num-cpus "$cpus" --num-gpus 0 --temp-dir "$nd/t"
              --object-store-memory "$OBJECT_STORE_BYTES"
              --node-manager-port $((base)) --object-manager-port $((base + 1))
              --metrics-export-port $((base + 2)) --dashboard-agent-listen-port $((base + 3))
              --dashboard-agent-grpc-port $((base + 4)) --runtime-env-agent-port $((base + 5))
              --min-worker-port $((base + 10)) --max-worker-port $((base + 99))
              --resources "{\"node:local$k\": 1}")
  if [ -n "$head" ]; then
    args+=(--head --port "$PORT" --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT"
           --ray-client-server-port $((base + 6)) --include-dashboard true)
  else
    args+=(--address "127.0.0.1:$PORT")
  fi
  # PATH: a job's entrypoint `python` is the one Ray runs with. RAY_ADDRESS: Ray's own helpers that look the
  # cluster up (e.g. Ray Train's placement-group cleaner) must find this one, not another Ray on the machine.
  # setsid: the node's own session, so signals to the caller (Ctrl-C in a test) do not reach it
  local wrap=() cache=${SHORTENED_CACHE_DIR:-}
  if [ -n "${PRIVATE:-}" ]; then  # this node's own empty DIR (and cache in it): no disk shared with the others
    mkdir -p "$PRIVATE"
    wrap=(unshare -m sh -c 'mount -t tmpfs -o mode=1777 none "$0" && mkdir -p "$0/cache" && exec "$@"' "$PRIVATE")
    cache=$PRIVATE/cache
  fi
  PATH="$(dirname "$RAY"):$PATH" RAY_ADDRESS="127.0.0.1:$PORT" RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$DIR/auth_token" \
    SHORTENED_CACHE_DIR="$cache" \
    setsid "${wrap[@]}" "$RAY" start "${args[@]}" >"$nd/log" 2>&1 < /dev/null &
  echo $! >"$nd/pid"
}

wait_nodes() {  # wait until N alive nodes are registered (bounded)
  local want=$1 i
  for i in $(seq 1 120); do
    if [ "$(alive_nodes)" -ge "$want" ]; then return 0; fi
    for nd in "$DIR"/node*; do alive "$nd" || die "$(basename "$nd") exited: see $nd/log"; done
    sleep 1
  done
  die "only $(alive_nodes) of $want nodes joined within 120 s (logs in $DIR/node*/log)"
}

alive_nodes() {
  env RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$DIR/auth_token" "$(dirname "$RAY")/python" - "$PORT" <<'EOF' 2>/dev/null || echo 0
import sys
from ray._private.state import GlobalState
from ray._raylet import GcsClientOptions
s = GlobalState()
s._initialize_global_state(GcsClientOptions.create(f"127.0.0.1:{sys.argv[1]}", None, allow_cluster_id_nil=True,
                                                   fetch_cluster_id_if_nil=False))
print(sum(n["Alive"] for n in s.node_table()))
EOF
}

write_env() {
  cat >"$DIR/env" <<EOF
export RAY_ADDRESS=127.0.0.1:$PORT
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=$DIR/auth_token
export SHORTENED_DASHBOARD=http://127.0.0.1:$DASHBOARD_PORT
EOF
}

case "$cmd" in
  up)
    mkdir -p "$DIR"
    [ -s "$DIR/auth_token" ] || (umask 077; "$(dirname "$RAY")/python" -c \
      "import secrets; print(secrets.token_hex(32), end='')" >"$DIR/auth_token")
    write_env
    echo "$WORKERS $WORKER_CPUS ${PRIVATE:-}" >"$DIR/layout"
    start_node 0 "$HEAD_CPUS" --head
    wait_nodes 1
    for k in $(seq 1 "$WORKERS"); do start_node "$k" "$WORKER_CPUS"; done
    wait_nodes $((WORKERS + 1))
    echo "cluster up: head + $WORKERS worker node(s) at 127.0.0.1:$PORT, dashboard http://127.0.0.1:$DASHBOARD_PORT"
    echo "use it:     source $DIR/env" ;;
  env) echo "$DIR/env" ;;
  status)
    for nd in "$DIR"/node*; do
      [ -d "$nd" ] || continue
      if alive "$nd"; then echo "$(basename "$nd"): up (pgid $(cat "$nd/pid"))"; else echo "$(basename "$nd"): down"; fi
    done
    echo "alive nodes registered: $(alive_nodes)" ;;
  stop-node)
    [ -n "${NODE:-}" ] && [ "$NODE" -ge 1 ] || die "stop-node needs a worker node number (1..N)"
    nd="$DIR/node$NODE"; alive "$nd" || die "node $NODE is not running"
    before=$(alive_nodes)
    kill_node "$nd" 9
    for i in $(seq 1 120); do [ "$(alive_nodes)" -lt "$before" ] && break; sleep 0.5; done
    echo "node $NODE killed; the cluster now has $(alive_nodes) alive node(s)" ;;
  start-node)
    [ -n "${NODE:-}" ] && [ "$NODE" -ge 1 ] || die "start-node needs a worker node number (1..N)"
    read -r _ cpus priv <"$DIR/layout"
    PRIVATE=${priv:-}
    start_node "$NODE" "$cpus"
    wait_nodes $(( $(alive_nodes) + 1 ))
    echo "node $NODE started" ;;
  down)
    [ -d "$DIR" ] || { echo "no cluster state in $DIR"; exit 0; }
    pids=$(for nd in "$DIR"/node*; do node_pids "$nd"; done | xargs)  # before the roots exit and orphan them
    for nd in $(ls -d "$DIR"/node* 2>/dev/null | sort -r); do   # workers first, then the head
      alive "$nd" && kill -TERM "$(cat "$nd/pid")" 2>/dev/null || true  # `ray start --block` stops its node
    done
    for i in $(seq 1 20); do
      any=0; for nd in "$DIR"/node*; do alive "$nd" && any=1; done
      [ $any = 0 ] && break; sleep 0.5
    done
    [ -n "$pids" ] && kill -9 $pids 2>/dev/null || true
    rm -rf "$DIR"/node*
    echo "cluster down" ;;
  *) sed -n 2,12p "$0" | sed 's/^# \{0,1\}//'; [ -z "$cmd" ] || exit 2 ;;
esac
