#!/usr/bin/env bash
# Runs a cstwa-dist command on this node under torchrun, with one Ray runtime for the node.
#   launchers/torchrun.sh NPROC COMMAND [ARGS...]      e.g. launchers/torchrun.sh 2 train --model cstwa
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (the k8s manifests do) and run it on
# every node. The node's Ray runtime comes from launchers/ray_runtime.sh (reused if RAY_ADDRESS is set).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { sed -n 2,5p "$0"; exit 2; }
nproc=$1; shift
venv=${VENV:-.venv}
export PATH="$PWD/$venv/bin:$PATH"

source launchers/ray_runtime.sh
start_node_ray_runtime
torchrun --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" --nproc_per_node="$nproc" \
  --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29511}" \
  -m cstwa_dist.cli "$@"
