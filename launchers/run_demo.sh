#!/usr/bin/env bash
# The main job (`make run`): demo dataset if absent → pretrain + graphs → CSTWA and ESMM on NPROC
# torchrun ranks → AUC table. Env: NPROC (2), CONFIG (configs/demo.yaml), SCALE (1.0), SEED (0).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv}
export PATH="$PWD/$venv/bin:$PATH"
nproc=${NPROC:-2}
config=${CONFIG:-configs/demo.yaml}
dataset=$(python -c "from cstwa_dist.registry import load_config; print(load_config('$config').data.dataset)")
run_dir=$(python -c "from cstwa_dist.registry import load_config; print(load_config('$config').train.run_dir)")
start=$(date +%s)

if python -c "import sys; from cstwa_dist.data.writer import dataset_complete; sys.exit(0 if dataset_complete('$dataset') else 1)"; then
  echo "== dataset $dataset present"
else
  echo "== generating the demo dataset into $dataset"
  rm -rf "$dataset"
  cstwa-dist synth --preset demo --scale "${SCALE:-1.0}" --seed "${SEED:-0}" --out "$dataset"
fi

# One Ray runtime for the whole job (torchrun.sh reuses it through RAY_ADDRESS).
source launchers/ray_runtime.sh
start_node_ray_runtime

echo "== pretrain the CTR MLP and build the user/item graphs ($nproc ranks)"
bash launchers/torchrun.sh "$nproc" pretrain --config "$config"
for model in cstwa esmm; do
  echo "== train $model ($nproc ranks)"
  bash launchers/torchrun.sh "$nproc" train --config "$config" --model "$model"
done
echo
cstwa-dist report "$run_dir/cstwa" "$run_dir/esmm"
echo "make run finished in $(( $(date +%s) - start ))s; runs under $run_dir, data under $dataset"
