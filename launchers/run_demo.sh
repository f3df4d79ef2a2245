#!/usr/bin/env bash
# The main job (`make run`): demo dataset if absent → pretrain + graphs → CSTWA and ESMM on NPROC
# torchrun ranks → AUC table. Env: NPROC (2), CONFIG (configs/demo.yaml), SCALE (1.0), SEED (0).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv}
export PATH="$PWD/$venv/bin:$PATH"
nproc=${NPROC:-2}
config=${CONFIG:-configs/demo.yaml}
dataset=$(python -c "from cstwa_dist.config import load_config; print(load_config('$config').data.dataset)")
run_dir=$(python -c "from cstwa_dist.config import load_config; print(load_config('$config').train.run_dir)")
start=$(date +%s)

if python -c "import sys; from cstwa_dist.data.synth import dataset_complete; sys.exit(0 if dataset_complete('$dataset') else 1)"; then
  echo "== dataset $dataset present"
else
  echo "== generating the demo dataset into $dataset"
  rm -rf "$dataset"
  cstwa-dist synth --preset demo --scale "${SCALE:-1.0}" --seed "${SEED:-0}" --out "$dataset"
fi

# One Ray runtime for the whole job (torchrun.sh reuses it through RAY_ADDRESS).
ray_pid=""
# A node-local runtime on loopback: Ray's token authentication would make ranks look for the token in
# the runtime's temp dir; the runtime is private to this node (or pod), so it is switched off.
export RAY_AUTH_MODE=disabled
cleanup() { [ -z "$ray_pid" ] || { kill "$ray_pid" 2>/dev/null || true; wait "$ray_pid" 2>/dev/null || true; }; }
trap cleanup EXIT INT TERM
port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
tmp=$(mktemp -d /tmp/cstwa-ray.XXXXXX)
ray start --head --block --node-ip-address=127.0.0.1 --port="$port" --num-cpus="${RAY_NUM_CPUS:-2}" \
  --include-dashboard=false --disable-usage-stats --temp-dir="$tmp" >"$tmp/ray-start.log" 2>&1 &
ray_pid=$!
export RAY_ADDRESS="127.0.0.1:$port"

echo "== pretrain the CTR MLP and build the user/item graphs ($nproc ranks)"
bash launchers/torchrun.sh "$nproc" pretrain --config "$config"
for model in cstwa esmm; do
  echo "== train $model ($nproc ranks)"
  bash launchers/torchrun.sh "$nproc" train --config "$config" --model "$model"
done
echo
cstwa-dist report "$run_dir/cstwa" "$run_dir/esmm"
echo "make run finished in $(( $(date +%s) - start ))s; runs under $run_dir, data under $dataset"
