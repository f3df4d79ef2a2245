# Sourced, not run: `source launchers/ray_runtime.sh; start_node_ray_runtime`.
# Starts this node's Ray runtime (`ray start --head`, every port on RAY_NODE_IP, token authentication
# on), waits until a driver can attach, exports RAY_ADDRESS and the token's location for the ranks, and
# stops it (by its own pid) when the sourcing shell exits, so other Ray runtimes on the machine are
# never touched. If RAY_ADDRESS is already set, an outer launcher owns the runtime and nothing is
# started. `bash launchers/ray_runtime.sh --help` (or sourcing it with --help) prints this and starts
# nothing.
# Env: RAY_NODE_IP (default 127.0.0.1): the address the runtime's ports listen on. Leave it on loopback:
#        the ranks attach from the same node (one runtime per node or pod), and only for 127.0.0.1 does
#        Ray 2.60 bind its GCS, raylet and worker ports to that address alone; for any other address
#        they listen on all interfaces (README, "One Ray runtime per node").
#      RAY_NUM_CPUS (default: the node's CPU count, `nproc`): CPUs the runtime offers the readers' read
#        tasks. All of them by default: the ranks' own CPU work is light on a GPU node, and every rank's
#        reader runs Ray Data read tasks here; set it lower to keep cores for something else.
#      RAY_START_TIMEOUT (default 60): seconds to wait for the runtime before failing.
#      RAY_STOP_TIMEOUT (default 20): seconds a stop waits before killing the runtime's processes.
#      RAY_KEEP_LOGS (default 0): 1 keeps the runtime's folder (logs) after the stop, closed to others.
# Needs `python` and `ray` on PATH (the launchers put the venv first).

_ray_runtime_usage() {
  sed -n '1,/^# Needs/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
}

# --help, whether run or sourced: print and start nothing (`return` when sourced, `exit` when run).
case "${1:-}" in
  -h | --help)
    _ray_runtime_usage
    # shellcheck disable=SC2317
    return 0 2>/dev/null || exit 0
    ;;
esac
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  echo "launchers/ray_runtime.sh is sourced, not run: source it, then call start_node_ray_runtime" \
    "(--help)" >&2
  exit 2
fi

_node_ray_pid=""
_node_ray_dir=""

# Every process below pid $1 (its children, their children, ...), parents first.
_ray_descendants() {
  local child
  for child in $(pgrep -P "$1" 2>/dev/null); do
    echo "$child"
    _ray_descendants "$child"
  done
}

# A free TCP port on address $1 (the kernel's pick; released at once, so `ray start` can take it).
_ray_free_port() {
  python -c 'import socket, sys; s = socket.socket(); s.bind((sys.argv[1], 0)); print(s.getsockname()[1])' "$1"
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
  # The folder holds the token and Ray's sockets and logs; Ray makes its own temp dir world-writable
  # (0777), so it is either removed or, to keep the logs, closed to everyone but its owner.
  if [ -n "$_node_ray_dir" ] && [ -d "$_node_ray_dir" ]; then
    if [ "${RAY_KEEP_LOGS:-0}" = 1 ]; then
      rm -f "$_node_ray_dir/auth_token"
      chmod -R go-rwx "$_node_ray_dir" 2>/dev/null || true
      echo "ray_runtime: runtime logs kept in $_node_ray_dir" >&2
    else
      rm -rf "$_node_ray_dir"
    fi
  fi
  _node_ray_dir=""
}

start_node_ray_runtime() {
  if [ -n "${RAY_ADDRESS:-}" ]; then
    echo "ray_runtime: using the runtime at $RAY_ADDRESS" >&2
    return 0
  fi
  local ip port client_port deadline ncpus
  ip="${RAY_NODE_IP:-127.0.0.1}"
  ncpus="${RAY_NUM_CPUS:-$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)}"
  if [ "$ip" = 127.0.0.1 ]; then
    # `ray start --node-ip-address=127.0.0.1` (and ray.init in the ranks) swap a loopback address for
    # the machine's outward one, after which GCS, raylet and workers listen on every interface. Set to
    # 0, this makes Ray take loopback for this node's address, and they bind 127.0.0.1 alone. Its only
    # other effect, no other node can join this runtime, is what is wanted (one runtime per node).
    export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
  else
    echo "ray_runtime: RAY_NODE_IP=$ip: Ray 2.60 binds its GCS, raylet and worker ports on all" \
      "interfaces for a non-loopback address (token authentication still applies)" >&2
  fi
  port=$(_ray_free_port "$ip") || return 1
  # `ray start` always starts a Ray Client server (default port 10001, shared by every job on the
  # machine): a free port of its own, on the same address.
  client_port=$(_ray_free_port "$ip") || return 1
  # mktemp -d creates the folder 0700 and the umask keeps the token 0600: only this user can read the
  # token or reach Ray's Unix sockets (object store, raylet) inside.
  _node_ray_dir=$(mktemp -d /tmp/cstwa-ray.XXXXXX) || return 1
  (umask 077 && python -c 'import secrets; print(secrets.token_hex(32))' >"$_node_ray_dir/auth_token") \
    || { stop_node_ray_runtime; return 1; }
  # Token authentication, with a token made for this job: every client of the runtime (the ranks'
  # ray.init, Ray's own processes) reads it from the file RAY_AUTH_TOKEN_PATH names, never from
  # ~/.ray/auth_token (shared by every job of the user). A file rather than RAY_AUTH_TOKEN keeps the
  # token out of every child's environment.
  export RAY_AUTH_MODE=token
  export RAY_AUTH_TOKEN_PATH="$_node_ray_dir/auth_token"
  unset RAY_AUTH_TOKEN
  trap stop_node_ray_runtime EXIT
  trap 'stop_node_ray_runtime; exit 130' INT TERM
  # --temp-dir is a subfolder: Ray makes its temp dir 0777, and the 0700 folder above keeps it private.
  # The dashboard is off (nothing reads it); metrics export has no listener without it.
  ray start --head --block --node-ip-address="$ip" --port="$port" --ray-client-server-port="$client_port" \
    --num-cpus="$ncpus" --include-dashboard=false --disable-usage-stats \
    --temp-dir="$_node_ray_dir/ray" >"$_node_ray_dir/ray-start.log" 2>&1 &
  _node_ray_pid=$!
  deadline=$(($(date +%s) + ${RAY_START_TIMEOUT:-60}))
  # Each attach attempt is bounded: ray.init to an address nobody answers on blocks for minutes (and
  # ignores SIGTERM), which would hide a `ray start` that died and overrun RAY_START_TIMEOUT.
  until timeout -k 2 15 python -c 'import ray, sys; ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False); ray.shutdown()' \
    "$ip:$port" >/dev/null 2>&1; do
    if ! kill -0 "$_node_ray_pid" 2>/dev/null; then
      echo "ray_runtime: 'ray start' exited before the runtime answered; its log:" >&2
      cat "$_node_ray_dir/ray-start.log" >&2
      wait "$_node_ray_pid" 2>/dev/null || true
      _node_ray_pid=""
      stop_node_ray_runtime
      return 1
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
      echo "ray_runtime: the Ray runtime on $ip:$port did not answer within ${RAY_START_TIMEOUT:-60}s" \
        "(raise RAY_START_TIMEOUT on a loaded machine); its log:" >&2
      cat "$_node_ray_dir/ray-start.log" >&2
      stop_node_ray_runtime
      return 1
    fi
    sleep 0.5
  done
  export RAY_ADDRESS="$ip:$port"
  local fate="removed on exit"
  [ "${RAY_KEEP_LOGS:-0}" != 1 ] || fate="kept on exit"
  echo "ray_runtime: node runtime ready at $RAY_ADDRESS ($ncpus CPUs, token authentication," \
    "folder $_node_ray_dir, $fate)" >&2
}
