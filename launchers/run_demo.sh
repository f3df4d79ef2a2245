#!/usr/bin/env bash
# The main job (`make run`): demo dataset if absent → pretrain + graphs → CSTWA and ESMM on NPROC
# torchrun ranks → AUC table. Env: NPROC (2), CONFIG (configs/demo.yaml), SCALE (1.0), SEED (0).
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: launchers/run_demo.sh [-h|--help]

The main job (`make run`): generates the demo data set if it is absent, starts one Ray runtime, runs
`pretrain` (CTR MLP + user/item kNN graphs), trains CSTWA and ESMM on NPROC torchrun ranks and prints
their AUC table (`cstwa-dist report`). Takes no arguments; settings come from the environment:

  NPROC   ranks per job (default 2)
  CONFIG  run config (default configs/demo.yaml); its data.dataset and train.run_dir say where
          the data and the runs go
  SCALE   demo data set scale when it is generated (default 1.0)
  SEED    demo data set seed when it is generated (default 0)
  VENV    virtual environment holding cstwa-dist (default .venv)
USAGE
}

for arg in "$@"; do
  case $arg in
    -h | --help) usage; exit 0 ;;
  esac
done
if [ $# -gt 0 ]; then
  echo "launchers/run_demo.sh: takes no arguments, got: $*; set NPROC, CONFIG, SCALE, SEED instead (--help)" >&2
  exit 2
fi

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
