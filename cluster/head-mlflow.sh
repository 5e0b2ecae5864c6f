#!/usr/bin/env bash
# Starts (or restarts) the MLflow tracking server on the head node of a cloud Ray cluster.
# cluster/aws.yaml and cluster/gcp.yaml run it after `ray start --head`.
#
#   cluster/head-mlflow.sh [--dir DIR] [--port PORT] [--artifacts-destination URI]
#
# Every node of the cluster must reach the server: a Tune trial's Train controller logs its
# epochs from whichever node the trial landed on. So it listens on all interfaces, and:
#   - MLflow's basic-auth app is on. The admin user is `distrib-rda` and its password is the
#     cluster's Ray token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token), the one
#     secret every node and every user of the cluster already holds. Nodes send it through
#     MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, which the `ray start` commands export.
#   - Only the Host names of the cluster are accepted (`ray-head`, private IPs, localhost).
#   - The cloud firewall admits nothing but SSH from outside the cluster (Ray's default
#     security group / firewall rules); users reach the UI through an SSH tunnel.
# The store (sqlite database, users, artifacts unless --artifacts-destination says otherwise)
# lives in DIR on the head's disk: copy it out before `ray down` (see cluster/README.md).
set -euo pipefail

DIR=$HOME/mlflow
PORT=5000
ARTIFACTS=""
while [[ $# -gt 0 ]]; do
  [[ $# -ge 2 ]] || { echo "head-mlflow.sh: $1 needs a value" >&2; exit 2; }
  case $1 in
    --dir) DIR=$2 ;;
    --port) PORT=$2 ;;
    --artifacts-destination) ARTIFACTS=$2 ;;
    *) echo "head-mlflow.sh: unknown option $1 (allowed: --dir, --port, --artifacts-destination)" >&2
       exit 2 ;;
  esac
  shift 2
done
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
ARTIFACTS=${ARTIFACTS:-$DIR/artifacts}

if [[ -n ${RAY_AUTH_TOKEN:-} ]]; then
  TOKEN=$RAY_AUTH_TOKEN
else
  TOKEN_FILE=${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}
  [[ -s $TOKEN_FILE ]] || {
    echo "head-mlflow.sh: no Ray token in $TOKEN_FILE; the cluster config must mount it" >&2
    exit 1
  }
  TOKEN=$(<"$TOKEN_FILE")
fi

# The previous server, if this is a restart (`ray up` on a running cluster).
if [[ -f $DIR/mlflow.pid ]]; then
  kill -TERM -- "-$(<"$DIR/mlflow.pid")" 2>/dev/null || true
  sleep 2
  kill -KILL -- "-$(<"$DIR/mlflow.pid")" 2>/dev/null || true
  rm -f "$DIR/mlflow.pid"
fi

umask 077
cat >"$DIR/basic_auth.ini" <<EOF
[mlflow]
default_permission = NO_PERMISSIONS
database_uri = sqlite:///$DIR/basic_auth.db
admin_username = distrib-rda
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
grant_default_workspace_access = false
EOF

# The key that signs the UI's CSRF tokens; kept so that a restart keeps sessions valid.
[[ -s $DIR/flask_secret ]] ||
  python -c "import secrets; print(secrets.token_hex(32), end='')" >"$DIR/flask_secret"

ALLOWED_HOSTS="ray-head,ray-head:*,localhost,localhost:*,127.0.0.1,127.0.0.1:*,10.*,192.168.*"
ALLOWED_HOSTS+=$(printf ',172.%d.*' {16..31})
# The admin password is read once, when the user store is created.
MLFLOW_AUTH_CONFIG_PATH=$DIR/basic_auth.ini MLFLOW_AUTH_ADMIN_PASSWORD=$TOKEN \
  MLFLOW_FLASK_SERVER_SECRET_KEY=$(<"$DIR/flask_secret") MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
  setsid mlflow server --app-name basic-auth --host 0.0.0.0 --port "$PORT" \
  --backend-store-uri "sqlite:///$DIR/mlflow.db" --artifacts-destination "$ARTIFACTS" \
  --allowed-hosts "$ALLOWED_HOSTS" --workers 2 >"$DIR/mlflow.log" 2>&1 </dev/null &
echo $! >"$DIR/mlflow.pid"

for _ in $(seq 240); do
  if python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" \
    "http://127.0.0.1:$PORT/health" 2>/dev/null; then
    echo "MLflow server on port $PORT (user distrib-rda, password: the Ray token); store in $DIR"
    exit 0
  fi
  kill -0 "$(<"$DIR/mlflow.pid")" 2>/dev/null || break
  sleep 0.5
done
echo "head-mlflow.sh: the MLflow server did not start; see $DIR/mlflow.log" >&2
tail -n 20 "$DIR/mlflow.log" >&2
exit 1
