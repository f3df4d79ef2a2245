#!/usr/bin/env bash
# usage: launchers/torchrun.sh NPROC COMMAND [ARGS...]   e.g. launchers/torchrun.sh 2 train --model cstwa
#        launchers/torchrun.sh --help                     this text; starts nothing
# Runs a cstwa-dist command on this node under torchrun, with one Ray runtime for the node.
# One node: nothing to set (a private rendezvous through a file; every port on loopback).
# Multi-node, static: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT on every node.
# Multi-node, c10d rendezvous (the k8s/ manifests): set NNODES, RDZV_ENDPOINT (host:port), JOB_ID,
# NODE_RANK (0 hosts the rendezvous store), optionally LOCAL_ADDR (this node's address, e.g. the pod
# IP, where its ranks' store listens; default: what the host's FQDN resolves to), optionally
# RDZV_BIND_ADDR (NODE_RANK 0: where the rendezvous store listens; default: RDZV_ENDPOINT's host).
# Both: MAX_RESTARTS (default 0) restarts of a failed group. c10d: a node other than NODE_RANK 0 started
# again with the same NNODES, RDZV_ENDPOINT and JOB_ID (a replaced pod) rejoins the job, where the
# other nodes have a restart left: they wait for it in the rendezvous, then every rank resumes from
# the newest checkpoint with `--resume auto` (README, "Several nodes, rehearsed on one machine").
# VENV (default .venv): the virtual environment whose bin/ goes first on PATH.
# The node's Ray runtime comes from launchers/ray_runtime.sh (reused if RAY_ADDRESS is set; its own
# settings: bash launchers/ray_runtime.sh --help).
# Listening sockets: the Ray runtime's all on RAY_NODE_IP (loopback by default). On one node every
# other one is on loopback too: the rendezvous goes through a file (no port), the ranks' store
# listens on MASTER_ADDR=127.0.0.1 (--local_addr; cstwa_dist.distributed.env binds it there) and
# GLOO_SOCKET_IFNAME=lo keeps gloo's sockets on loopback. Multi-node, the ranks' store listens on
# this node's address (LOCAL_ADDR, else the FQDN's); the c10d rendezvous store (NODE_RANK 0,
# RDZV_ENDPOINT's port) on RDZV_BIND_ADDR, else RDZV_ENDPOINT's host (the cstwa-c10d backend,
# cstwa_dist.distributed.rendezvous, binds it). The static rendezvous's store (MASTER_PORT) still
# listens on all interfaces, without authentication: torch 2.13's TCPStore takes no bind address
# and torchrun passes it no listening socket (README, "One Ray runtime per node").
set -euo pipefail
usage() { sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; }
case "${1:-}" in
  -h | --help) usage; exit 0 ;;
esac
[ $# -ge 2 ] || { usage >&2; exit 2; }
if [ "${NNODES:-1}" != 1 ] && [ -z "${RDZV_ENDPOINT:-}" ] && [ -z "${MASTER_ADDR:-}" ]; then
  echo "torchrun.sh: NNODES=$NNODES needs MASTER_ADDR or RDZV_ENDPOINT (node 0's address, reachable from every node); see --help" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
nproc=$1; shift
venv=${VENV:-.venv}
rdzv_dir=""
export PATH="$PWD/$venv/bin:$PATH"

source launchers/ray_runtime.sh
start_node_ray_runtime

# In-job restarts (MAX_RESTARTS > 0) need fresh store keys for every attempt: torch >= 2.4 no longer
# prefixes the workers' keys per attempt, so a restarted group that shares the torchrun agent's store
# reads the killed group's gloo addresses and fails ("Connection refused") or hangs for good in
# init_process_group. So the c10d rendezvous does not share its store
# (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1): each rendezvous round's rank 0 worker hosts a new one, on a
# port the round publishes, and every node agrees on the round (not on a restart count: a node that
# only saw another node restart does not count one). The static rendezvous always shares its store;
# there init_distributed prefixes the keys with the attempt.
if [ -n "${RDZV_ENDPOINT:-}" ]; then
  # c10d rendezvous: NODE_RANK 0 hosts the store (said explicitly: guessing it from the endpoint's DNS
  # fails while pod 0's record is not yet published); the rendezvous assigns the node ranks.
  if [ "${NODE_RANK:-0}" = 0 ]; then is_host=1; else is_host=0; fi
  # cstwa-c10d: torch's c10d backend with its store bound to RDZV_BIND_ADDR / the endpoint's host
  # instead of every interface (cstwa_dist.distributed.rendezvous, registered by pyproject.toml)
  rdzv=(--rdzv_backend=cstwa-c10d --rdzv_endpoint="$RDZV_ENDPOINT"
        --rdzv_id="${JOB_ID:?JOB_ID is required with RDZV_ENDPOINT}" --rdzv_conf="is_host=$is_host"
        ${LOCAL_ADDR:+--local_addr="$LOCAL_ADDR"})
  export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
elif [ "${NNODES:-1}" = 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
  # one node: a private c10d rendezvous through a file in a folder of this job's own (0700), not
  # --standalone's TCP store, which would listen on every interface; the ranks' store on loopback
  # (--local_addr becomes their MASTER_ADDR)
  rdzv_dir=$(mktemp -d /tmp/cstwa-rdzv.XXXXXX)
  rdzv=(--rdzv_backend=c10d --rdzv_endpoint="$rdzv_dir/store" --rdzv_id=node --rdzv_conf=store_type=file
        --local_addr=127.0.0.1)
  export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
  # gloo's sockets on loopback: by default gloo takes the address the host name resolves to (often an
  # outward interface, e.g. a pod's IP), though every peer is on this node
  export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-lo}"
else
  rdzv=(--node_rank="${NODE_RANK:-0}" --master_addr="$MASTER_ADDR"
        --master_port="${MASTER_PORT:-29511}")
fi
# torchrun runs in the background so that a stop signal (a pod being deleted) reaches it at once
# instead of waiting for it to exit; the Ray runtime is stopped by ray_runtime.sh's EXIT trap.
# MAX_RESTARTS > 0: a failed rank restarts the whole worker group, which continues from the newest
# checkpoint when the command has `--resume auto`.
torchrun --nnodes="${NNODES:-1}" --nproc_per_node="$nproc" --max_restarts="${MAX_RESTARTS:-0}" "${rdzv[@]}" \
  -m cstwa_dist.cli "$@" &
torchrun_pid=$!
trap 'kill -TERM "$torchrun_pid" 2>/dev/null || true' INT TERM
status=0
wait "$torchrun_pid" || status=$?
if kill -0 "$torchrun_pid" 2>/dev/null; then  # woken by a signal: wait for torchrun to finish stopping
  wait "$torchrun_pid" || status=$?
fi
[ -z "$rdzv_dir" ] || rm -rf "$rdzv_dir"
exit "$status"
