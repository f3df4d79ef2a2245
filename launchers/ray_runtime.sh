# Sourced, not run: `source launchers/ray_runtime.sh; start_node_ray_runtime`.
# Starts this node's Ray runtime (`ray start --head` on loopback), waits until a driver can attach,
# exports RAY_ADDRESS for the ranks, and stops it (by its own pid) when the sourcing shell exits, so
# other Ray runtimes on the machine are never touched. If RAY_ADDRESS is already set, an outer
# launcher owns the runtime and nothing is started.
# Env: RAY_NUM_CPUS (default: the node's CPU count, `nproc`): CPUs the runtime offers the readers' read
#        tasks. All of them by default: the ranks' own CPU work is light on a GPU node, and every rank's
#        reader runs Ray Data read tasks here; set it lower to keep cores for something else.
#      RAY_START_TIMEOUT (default 60): seconds to wait for the runtime before failing.
# Needs `python` and `ray` on PATH (the launchers put the venv first).

# A node-local runtime on loopback: Ray's token authentication would make ranks look for the token in
# the runtime's temp dir; the runtime is private to this node (or pod), so it is switched off.
export RAY_AUTH_MODE=disabled
_node_ray_pid=""

# Every process below pid $1 (its children, their children, ...), parents first.
_ray_descendants() {
  local child
  for child in $(pgrep -P "$1" 2>/dev/null); do
    echo "$child"
    _ray_descendants "$child"
  done
}

stop_node_ray_runtime() {
  # SIGTERM lets `ray start --block` stop its runtime; it has been seen to take ~30 s on a loaded
  # machine, so after RAY_STOP_TIMEOUT (default 20) seconds the runtime's processes are killed: the
  # whole tree, because the raylet's own children (dashboard and runtime-env agents) would otherwise
  # outlive it, re-parented to init.
  if [ -n "$_node_ray_pid" ]; then
    local tree
    tree=$(_ray_descendants "$_node_ray_pid")
    kill "$_node_ray_pid" 2>/dev/null || true
    local waited=0
    while kill -0 "$_node_ray_pid" 2>/dev/null && [ "$waited" -lt "${RAY_STOP_TIMEOUT:-20}" ]; do
      sleep 1
      waited=$((waited + 1))
    done
    if kill -0 "$_node_ray_pid" 2>/dev/null; then
      tree="$tree $(_ray_descendants "$_node_ray_pid")"
      kill -KILL "$_node_ray_pid" 2>/dev/null || true
      # shellcheck disable=SC2086
      [ -z "${tree// /}" ] || kill -KILL $tree 2>/dev/null || true
    fi
    wait "$_node_ray_pid" 2>/dev/null || true
    _node_ray_pid=""
  fi
}

start_node_ray_runtime() {
  if [ -n "${RAY_ADDRESS:-}" ]; then
    echo "ray_runtime: using the runtime at $RAY_ADDRESS" >&2
    return 0
  fi
  local port tmp deadline ncpus
  ncpus="${RAY_NUM_CPUS:-$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)}"
  port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  tmp=$(mktemp -d /tmp/cstwa-ray.XXXXXX)
  ray start --head --block --node-ip-address=127.0.0.1 --port="$port" --num-cpus="$ncpus" \
    --include-dashboard=false --disable-usage-stats --temp-dir="$tmp" >"$tmp/ray-start.log" 2>&1 &
  _node_ray_pid=$!
  trap stop_node_ray_runtime EXIT
  trap 'stop_node_ray_runtime; exit 130' INT TERM
  deadline=$(( $(date +%s) + ${RAY_START_TIMEOUT:-60} ))
  until python -c 'import ray, sys; ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False); ray.shutdown()' \
      "127.0.0.1:$port" >/dev/null 2>&1; do
    if ! kill -0 "$_node_ray_pid" 2>/dev/null; then
      echo "ray_runtime: 'ray start' exited before the runtime answered; its log ($tmp/ray-start.log):" >&2
      cat "$tmp/ray-start.log" >&2
      _node_ray_pid=""
      return 1
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
      echo "ray_runtime: the Ray runtime on 127.0.0.1:$port did not answer within ${RAY_START_TIMEOUT:-60}s" \
        "(raise RAY_START_TIMEOUT on a loaded machine); its log: $tmp/ray-start.log" >&2
      stop_node_ray_runtime
      return 1
    fi
    sleep 0.5
  done
  export RAY_ADDRESS="127.0.0.1:$port"
  echo "ray_runtime: node runtime ready at $RAY_ADDRESS ($ncpus CPUs, logs in $tmp)" >&2
}
