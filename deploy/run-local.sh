#!/usr/bin/env bash
# The main job: build corral and run a local cluster (1 master, 2 agents) with demo tasks, in the foreground.
# Dashboard, REST API and gRPC: http://127.0.0.1:5050. Ctrl-C stops the cluster and everything it runs.
set -euo pipefail
cd "$(dirname "$0")/.."
# etcd-server: `corral dev up --ha` runs a local etcd for three masters.
bash deploy/install-deps.sh etcd-server etcd-client
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --bins
BIN="$PWD/target/release"
export CORRAL_MASTER=http://127.0.0.1:5050

"$BIN/corral" dev up --agents "${CORRAL_AGENTS:-2}" --port 5050 &
DEV=$!
stop() { kill -INT "$DEV" 2>/dev/null || true; wait "$DEV" 2>/dev/null || true; }
trap stop INT TERM EXIT

for _ in $(seq 1 100); do
    "$BIN/corral" node list >/dev/null 2>&1 && break
    kill -0 "$DEV" 2>/dev/null || { echo "corral dev up failed" >&2; exit 1; }
    sleep 0.2
done
sleep 1
echo
echo "== demo: a one-shot task =="
"$BIN/corral" execute --name hello --command 'echo "hello from $CORRAL_TASK_ID on $CORRAL_AGENT_HOST"'
"$BIN/corral" task log hello
echo
echo "== demo: a long-running task (see: corral task list; corral task log demo-ticker --follow) =="
"$BIN/corral" execute --name demo-ticker --resources "cpus:0.1;mem:16" \
    --command 'i=0; while true; do i=$((i+1)); echo "tick $i"; sleep 5; done' >/dev/null 2>&1 &
sleep 2
"$BIN/corral" task list
echo
echo "cluster running: dashboard at http://127.0.0.1:5050 (API: /state, /api/v1/…, /metrics) — Ctrl-C to stop"
wait "$DEV"
