#!/usr/bin/env bash
# Runs a cstwa-dist command on this node under torchrun, with one Ray runtime for the node.
#   launchers/torchrun.sh NPROC COMMAND [ARGS...]      e.g. launchers/torchrun.sh 2 train --model cstwa
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (the k8s manifests do) and run it on
# every node. If RAY_ADDRESS is already set (an outer launcher started the runtime), it is reused.
# The Ray runtime is started with `ray start --head --block` and stopped by its own pid on exit, so
# other Ray runtimes on the machine are never touched.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { sed -n 2,7p "$0"; exit 2; }
nproc=$1; shift
venv=${VENV:-.venv}
export PATH="$PWD/$venv/bin:$PATH"

ray_pid=""
# A node-local runtime on loopback: Ray's token authentication would make ranks look for the token in
# the runtime's temp dir; the runtime is private to this node (or pod), so it is switched off.
export RAY_AUTH_MODE=disabled
cleanup() {
  if [ -n "$ray_pid" ]; then
    kill "$ray_pid" 2>/dev/null || true
    wait "$ray_pid" 2>/dev/null || true
  fi
}
trap cleanup EXIT INT TERM
if [ -z "${RAY_ADDRESS:-}" ]; then
  port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  tmp=$(mktemp -d /tmp/cstwa-ray.XXXXXX)
  ray start --head --block --node-ip-address=127.0.0.1 --port="$port" --num-cpus="${RAY_NUM_CPUS:-2}" \
    --include-dashboard=false --disable-usage-stats --temp-dir="$tmp" >"$tmp/ray-start.log" 2>&1 &
  ray_pid=$!
  export RAY_ADDRESS="127.0.0.1:$port"
  for _ in $(seq 1 120); do
    if python -c 'import ray, os; ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR", log_to_driver=False); ray.shutdown()' >/dev/null 2>&1; then
      break
    fi
    kill -0 "$ray_pid" 2>/dev/null || { cat "$tmp/ray-start.log" >&2; exit 1; }
    sleep 0.5
  done
fi
torchrun --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" --nproc_per_node="$nproc" \
  --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29511}" \
  -m cstwa_dist.cli "$@"
