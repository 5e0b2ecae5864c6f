#!/usr/bin/env bash
# A real multi-node Ray cluster on one machine, with an MLflow server beside it.
#
#   cluster/local.sh start [--workers N] [options]   head + N worker nodes + mlflow server
#   cluster/local.sh status                          addresses, and `ray status`
#   cluster/local.sh stop                            ends what `start` began, and only that
#
# Every node is its own `ray start` process tree (its own raylet, object store and resources),
# joined to the head over TCP, as on a real cluster. The head advertises 0 CPUs (--head-cpus),
# like the head of a cloud cluster: the job driver, the Ray Train controller and the Tune driver
# need no CPU, so every training worker runs on a worker node, and a Train run with N workers on
# N one-CPU worker nodes puts one worker on each node.
#
# Everything lives in the state directory (default: .cluster/ in the repository, override with
# --state-dir or DISTRIB_RDA_CLUSTER_DIR): the auth token, the MLflow database and artifacts,
# the jobs' checkpoints (STATE/results), the logs of this script, the process groups it
# started, and a link (STATE/ray) to the nodes' Ray temp dirs, which live under a short private
# path in /tmp (unix socket paths are short). Every node runs with MLFLOW_TRACKING_URI (the
# server) and DISTRIB_RDA_STORAGE (STATE/results) in its environment, and so does every job's
# driver: a `distrib-rda` job submitted without --tracking-uri or --storage records there, not
# in Ray's temporary copy of its working directory, and its run outlives the cluster.
# Ray token authentication stays on: `start` writes a random token to STATE/auth_token (mode
# 600), and every node and every client you point at the cluster use it through
# RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH (source STATE/env.sh). ~/.ray/auth_token is
# neither read nor written.
#
# `stop` never runs `ray stop` (which kills every Ray process of the user on the machine): it
# signals the process groups recorded by `start` and any process carrying this state dir's
# marker in its environment (job drivers start their own session), waits, then SIGKILLs what is
# left, and fails if anything survived. Linux only (it reads /proc).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: cluster/local.sh start [--workers N] [--cpus-per-worker C] [--gpus-per-worker G]
                              [--head-cpus C] [--object-store-memory BYTES]
                              [--port P] [--dashboard-port P] [--mlflow-port P] [--state-dir DIR]
       cluster/local.sh status [--state-dir DIR]
       cluster/local.sh stop [--state-dir DIR]

  --workers N              worker nodes besides the head (default 2)
  --cpus-per-worker C      CPUs each worker node advertises (default 1)
  --gpus-per-worker G      GPUs each worker node advertises (default 0)
  --head-cpus C            CPUs the head advertises (default 0: work goes to the workers)
  --object-store-memory B  object store bytes per node (default 536870912 = 512 MiB)
  --port P                 GCS port of the head (default: a free port)
  --dashboard-port P       dashboard and job API port, bound to 127.0.0.1 (default 8265, or a
                           free port if 8265 is taken)
  --mlflow-port P          MLflow server port, bound to 127.0.0.1 (default 5000, or a free port)
  --state-dir DIR          where everything is kept (default: .cluster/ in the repository,
                           or $DISTRIB_RDA_CLUSTER_DIR)
EOF
}

die() {
  echo "cluster/local.sh: error: $*" >&2
  exit 2
}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${DISTRIB_RDA_CLUSTER_DIR:-$REPO/.cluster}
WORKERS=2
CPUS_PER_WORKER=1
GPUS_PER_WORKER=0
HEAD_CPUS=0
OBJECT_STORE_MEMORY=$((512 * 1024 * 1024))
GCS_PORT=""
DASHBOARD_PORT=""
MLFLOW_PORT=""
STOP_GRACE_SECONDS=${STOP_GRACE_SECONDS:-10}  # per step of `stop`

[[ $# -ge 1 ]] || { usage >&2; exit 2; }
COMMAND=$1
shift
case $COMMAND in
  start | stop | status) ;;
  -h | --help | help) usage; exit 0 ;;
  *) usage >&2; die "unknown command '$COMMAND' (allowed: start, status, stop)" ;;
esac

need_int() {  # need_int FLAG VALUE MIN
  [[ $2 =~ ^[0-9]+$ ]] && ((10#$2 >= $3)) || die "$1 must be an integer >= $3, got '$2'"
}

while [[ $# -gt 0 ]]; do
  flag=$1
  [[ $flag == -h || $flag == --help ]] && { usage; exit 0; }
  [[ $# -ge 2 ]] || die "$flag needs a value"
  value=$2
  shift 2
  if [[ $COMMAND != start && $flag != --state-dir ]]; then
    die "'$COMMAND' takes only --state-dir, got $flag"
  fi
  case $flag in
    --workers) need_int "$flag" "$value" 1; WORKERS=$((10#$value)) ;;
    --cpus-per-worker) need_int "$flag" "$value" 1; CPUS_PER_WORKER=$((10#$value)) ;;
    --gpus-per-worker) need_int "$flag" "$value" 0; GPUS_PER_WORKER=$((10#$value)) ;;
    --head-cpus) need_int "$flag" "$value" 0; HEAD_CPUS=$((10#$value)) ;;
    --object-store-memory) need_int "$flag" "$value" 78643200; OBJECT_STORE_MEMORY=$value ;;
    --port) need_int "$flag" "$value" 1024; GCS_PORT=$value ;;
    --dashboard-port) need_int "$flag" "$value" 1024; DASHBOARD_PORT=$value ;;
    --mlflow-port) need_int "$flag" "$value" 1024; MLFLOW_PORT=$value ;;
    --state-dir) STATE=$value ;;
    *) die "unknown option '$flag' (see cluster/local.sh --help)" ;;
  esac
done

[[ -d /proc/self ]] || die "this script needs Linux (/proc)"
[[ -d $STATE ]] || mkdir -m 700 -p "$STATE"  # token, database, logs: private
STATE=$(cd "$STATE" && pwd)
LOGS=$STATE/logs
PIDS=$STATE/pids
# Ray's temp dirs, one per node as on separate machines (sessions, Ray's logs, unix sockets).
# A socket path over 107 bytes cannot be bound, and Ray adds about 70 to the temp dir, so they
# live under a short private directory in /tmp, named after this user and state dir; STATE/ray
# links to it.
RAY_TMP=/tmp/rda-$(id -u)-$(printf '%s' "$STATE" | cksum | cut -d' ' -f1)

# The project's virtual environment, or whatever is on PATH.
if [[ -x $REPO/.venv/bin/ray ]]; then
  export PATH=$REPO/.venv/bin:$PATH
fi
command -v ray >/dev/null || die "ray is not on PATH; run ./scripts/setup.sh first"
command -v mlflow >/dev/null || die "mlflow is not on PATH; run ./scripts/setup.sh first"
PY=$(dirname "$(command -v ray)")/python
[[ -x $PY ]] || PY=python3
if [[ $COMMAND == start ]] &&
  ! "$PY" -c "import ray.dashboard.modules.job.job_head" 2>/dev/null; then
  die "Ray's job API needs ray[default] (aiohttp_cors, grpcio, ...): pip install 'ray[default]==$(
    "$PY" -c 'import ray; print(ray.__version__)')'"
fi

# Every process started here, and every process they start, carries this marker in its
# environment, so `stop` finds job drivers and workers that left the recorded process groups.
# This shell and its callers do not carry it (and `stop` spares them anyway).
MARKER="DISTRIB_RDA_LOCAL_CLUSTER=$STATE"
unset DISTRIB_RDA_LOCAL_CLUSTER
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=$STATE/auth_token
unset RAY_AUTH_TOKEN RAY_ADDRESS RAY_API_SERVER_ADDRESS MLFLOW_TRACKING_URI DISTRIB_RDA_STORAGE

# --- process bookkeeping -------------------------------------------------------------------

marked_pids() {  # processes whose environment holds MARKER
  grep -lszxF -- "$MARKER" /proc/[0-9]*/environ 2>/dev/null |
    sed 's#^/proc/\([0-9]*\)/environ$#\1#' || true
}

group_pids() {  # live processes in process group $1
  ps -eo pid=,pgid= | awk -v g="$1" '$2 == g { print $1 }'
}

recorded_groups() {
  [[ -f $PIDS ]] && awk '{ print $2 }' "$PIDS" || true
}

ancestors() {  # this shell and the processes above it, which `stop` never signals
  local pid=$$
  while ((pid > 1)); do
    echo "$pid"
    pid=$(ps -o ppid= -p "$pid" 2>/dev/null | tr -d ' ') || break
    [[ -n $pid ]] || break
  done
}
SPARED=" $(ancestors | tr '\n' ' ') "

alive_pids() {  # every live process this script is responsible for
  local g
  {
    for g in $(recorded_groups); do group_pids "$g"; done
    marked_pids
  } | sort -un | while read -r pid; do
    [[ $SPARED == *" $pid "* || $pid == "$BASHPID" ]] && continue
    # Zombies are already dead; their parent reaps them.
    if [[ $(ps -o stat= -p "$pid" 2>/dev/null) =~ ^[^Z] ]]; then echo "$pid"; fi
  done
}

alive_in() {  # the pids among $@ that are still running
  local pid
  for pid in "$@"; do
    if [[ $(ps -o stat= -p "$pid" 2>/dev/null) =~ ^[^Z] ]]; then echo "$pid"; fi
  done
}

by_role() {  # by_role raylet|gcs_server|other: the live processes of that kind
  local pid comm
  for pid in $(alive_pids); do
    comm=$(ps -o comm= -p "$pid" 2>/dev/null) || continue
    case $1:$comm in
      raylet:raylet | gcs_server:gcs_server) echo "$pid" ;;
      other:raylet | other:gcs_server) ;;
      other:*) echo "$pid" ;;
    esac
  done
}

do_stop() {
  local role pids deadline left g
  if [[ -z $(alive_pids) ]]; then
    rm -f "$PIDS" "$STATE/env.sh" "$STATE/addresses"
    echo "No local cluster running from $STATE."
    return 0
  fi
  echo "Stopping the local cluster in $STATE"
  # The order of `ray stop`: raylets, then everything else, then the GCS. A GCS terminated
  # while its raylets live lingers for a long time.
  for role in raylet other gcs_server; do
    read -r -a pids <<<"$(by_role "$role" | tr '\n' ' ')"
    ((${#pids[@]})) || continue
    kill -TERM "${pids[@]}" 2>/dev/null || true
    deadline=$((SECONDS + STOP_GRACE_SECONDS))
    while [[ -n $(alive_in "${pids[@]}") ]] && ((SECONDS < deadline)); do sleep 0.2; done
    left=$(alive_in "${pids[@]}")
    [[ -z $left ]] || kill -KILL $left 2>/dev/null || true
  done
  # Whatever is left (a process that started meanwhile, or that ignored SIGTERM).
  deadline=$((SECONDS + 5))
  while left=$(alive_pids) && [[ -n $left ]] && ((SECONDS < deadline)); do
    for g in $(recorded_groups); do kill -KILL -- "-$g" 2>/dev/null || true; done
    kill -KILL $left 2>/dev/null || true
    sleep 0.5
  done
  if [[ -n $left ]]; then
    echo "cluster/local.sh: error: processes still alive after SIGKILL: $(echo $left)" >&2
    return 1
  fi
  rm -f "$PIDS" "$STATE/env.sh" "$STATE/addresses"
  echo "Stopped: no process of this cluster is left."
}

# launch ROLE LOG CMD...: run CMD in a new session (its own process group) and record the group.
# `setsid` execs CMD in place when the caller is not a group leader, as a background job is
# not, so $! is both the pid and the process group id.
launch() {
  local role=$1 log=$2
  shift 2
  env "$MARKER" setsid "$@" >"$log" 2>&1 </dev/null &
  LAUNCHED=$!
  echo "$role $LAUNCHED" >>"$PIDS"
}

fail_start() {
  echo "cluster/local.sh: error: $*" >&2
  echo "  logs: $LOGS, and Ray's in $STATE/ray/<node>/session_latest/logs" >&2
  do_stop >&2 || true
  exit 1
}

free_ports() {  # free_ports N: N distinct free TCP ports
  "$PY" - "$1" <<'EOF'
import socket, sys
sockets = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in sockets:
    s.bind(("", 0))
print(" ".join(str(s.getsockname()[1]) for s in sockets))
for s in sockets:
    s.close()
EOF
}

port_free() {
  "$PY" - "$1" <<'EOF'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no conflict
try:
    s.bind(("", int(sys.argv[1])))
except OSError:
    sys.exit(1)
EOF
}

wait_http() {  # wait_http URL SECONDS PID: until URL answers, or PID dies, or time is up
  local deadline=$((SECONDS + $2))
  while ((SECONDS < deadline)); do
    kill -0 "$3" 2>/dev/null || return 1
    "$PY" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" "$1" \
      2>/dev/null && return 0
    sleep 0.5
  done
  return 1
}

write_env() {
  cat >"$STATE/env.sh" <<EOF
# Source this file to talk to the local cluster started from $STATE.
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=$STATE/auth_token
export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT
export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT
export DISTRIB_RDA_STORAGE=$STATE/results
EOF
  cat >"$STATE/addresses" <<EOF
gcs=$GCS_ADDRESS
dashboard=http://127.0.0.1:$DASHBOARD_PORT
mlflow=http://127.0.0.1:$MLFLOW_PORT
storage=$STATE/results
EOF
}

print_summary() {
  cat <<EOF

Local Ray cluster: a head ($HEAD_CPUS CPUs) and $WORKERS worker nodes ($CPUS_PER_WORKER CPUs, \
$GPUS_PER_WORKER GPUs each)
  Ray address (--address, RAY_ADDRESS):   $GCS_ADDRESS
  Dashboard and job API (127.0.0.1 only): http://127.0.0.1:$DASHBOARD_PORT
  MLflow tracking URI (127.0.0.1 only):   http://127.0.0.1:$MLFLOW_PORT
  Checkpoints (DISTRIB_RDA_STORAGE):      $STATE/results
  State, logs, token:                     $STATE

Token authentication is on. In each shell that talks to this cluster:
  source $STATE/env.sh
which sets
  export RAY_AUTH_MODE=token
  export RAY_AUTH_TOKEN_PATH=$STATE/auth_token
  export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT   # for ray job ...
  export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT
  export DISTRIB_RDA_STORAGE=$STATE/results

Submit a job (from the repository root, with .venv/bin on PATH). Every node and job has the
variables above, so the job records in the MLflow server and in $STATE/results:
  ray job submit --working-dir . -- distrib-rda train --workers $WORKERS --epochs 1 --subset 2000 --json

Stop everything this script started:
  cluster/local.sh stop
EOF
}

# --- commands ------------------------------------------------------------------------------

do_status() {
  if [[ -z $(alive_pids) || ! -f $STATE/addresses ]]; then
    echo "No local cluster running from $STATE."
    return 1
  fi
  cat "$STATE/addresses"
  ray status --address "$(sed -n 's/^gcs=//p' "$STATE/addresses")"
}

do_start() {
  if [[ -n $(alive_pids) ]]; then
    die "a local cluster from $STATE is already running; run 'cluster/local.sh stop' first"
  fi
  rm -f "$PIDS"
  mkdir -p "$LOGS"
  # Private to this user: it holds the sockets of the cluster.
  rm -rf "$RAY_TMP"
  mkdir -m 700 "$RAY_TMP" || die "cannot create $RAY_TMP"
  ln -sfn "$RAY_TMP" "$STATE/ray"
  # The state dir holds a token, a database and sockets: keep it out of git and out of the
  # working dir that `ray job submit --working-dir .` uploads.
  echo '*' >"$STATE/.gitignore"
  (
    umask 077
    [[ -s $STATE/auth_token ]] || "$PY" -c "import secrets; print(secrets.token_hex(32), end='')" \
      >"$STATE/auth_token"
  )
  chmod 600 "$STATE/auth_token"

  local ports
  read -r -a ports <<<"$(free_ports $((WORKERS + 6)))"
  [[ -n $GCS_PORT ]] || GCS_PORT=${ports[0]}
  if [[ -z $DASHBOARD_PORT ]]; then
    if port_free 8265; then DASHBOARD_PORT=8265; else DASHBOARD_PORT=${ports[1]}; fi
  fi
  if [[ -z $MLFLOW_PORT ]]; then
    if port_free 5000; then MLFLOW_PORT=5000; else MLFLOW_PORT=${ports[2]}; fi
  fi
  local client_port=${ports[3]} head_agent_port=${ports[4]}

  local common=(
    --object-store-memory="$OBJECT_STORE_MEMORY"
    --min-worker-port=0 --max-worker-port=0 --disable-usage-stats
  )
  echo "Starting the MLflow server (logs: $LOGS/mlflow.log)"
  mkdir -p "$STATE/mlartifacts"
  # No MLflow job runner (GenAI jobs): it would add a pool of busy consumer processes.
  launch mlflow "$LOGS/mlflow.log" env MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
    mlflow server --host 127.0.0.1 --port "$MLFLOW_PORT" \
    --backend-store-uri "sqlite:///$STATE/mlflow.db" --artifacts-destination "$STATE/mlartifacts" \
    --workers 1
  local mlflow_pid=$LAUNCHED

  # Every node, and so every job driver and Train controller, records in the server and in
  # STATE/results unless a command says otherwise.
  mkdir -p "$STATE/results"
  export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT DISTRIB_RDA_STORAGE=$STATE/results
  echo "Starting the head node (logs: $LOGS/head.log)"
  launch head "$LOGS/head.log" ray start --head --port="$GCS_PORT" \
    --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
    --ray-client-server-port="$client_port" --dashboard-agent-listen-port="$head_agent_port" \
    --num-cpus="$HEAD_CPUS" --num-gpus=0 --temp-dir="$RAY_TMP/head" "${common[@]}"
  wait "$LAUNCHED" || fail_start "the head node did not start"
  GCS_ADDRESS=$(cat "$RAY_TMP/head/ray_current_cluster" 2>/dev/null) ||
    fail_start "the head node did not write $RAY_TMP/head/ray_current_cluster"

  # All at once: each node has a temp dir (and socket names) of its own.
  local i starters=()
  for ((i = 1; i <= WORKERS; i++)); do
    echo "Starting worker node $i (logs: $LOGS/worker-$i.log)"
    launch "worker-$i" "$LOGS/worker-$i.log" ray start --address="$GCS_ADDRESS" \
      --num-cpus="$CPUS_PER_WORKER" --num-gpus="$GPUS_PER_WORKER" \
      --dashboard-agent-listen-port="${ports[$((5 + i))]}" --temp-dir="$RAY_TMP/worker-$i" \
      "${common[@]}"
    starters+=("$LAUNCHED")
  done
  for ((i = 1; i <= WORKERS; i++)); do
    wait "${starters[$((i - 1))]}" || fail_start "worker node $i did not start"
  done

  wait_http "http://127.0.0.1:$MLFLOW_PORT/health" 120 "$mlflow_pid" ||
    fail_start "the MLflow server did not answer on 127.0.0.1:$MLFLOW_PORT"

  # The cluster is up when every node is alive in the GCS, seen by a client using the token.
  "$PY" - "$GCS_ADDRESS" "$((WORKERS + 1))" <<'EOF' || fail_start "not every node joined"
import sys, time
import ray
address, expected = sys.argv[1], int(sys.argv[2])
ray.init(address=address, logging_level="ERROR", log_to_driver=False)
deadline = time.monotonic() + 60
while (alive := sum(node["Alive"] for node in ray.nodes())) < expected:
    if time.monotonic() > deadline:
        sys.exit(f"{alive} of {expected} nodes alive after 60 s")
    time.sleep(0.5)
ray.shutdown()
EOF
  write_env
  print_summary
}

case $COMMAND in
  start) do_start ;;
  status) do_status ;;
  stop) do_stop ;;
esac
