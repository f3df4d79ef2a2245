#!/usr/bin/env bash
# Day 1 -> day 2 of one synthetic world: a warm-started 1-epoch retrain against a cold 3-epoch one,
# per model and seed; writes OUT/retrain.json and OUT/retrain.md (docs/experiments/retrain.md).
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: launchers/retrain_days.sh [-h|--help]

Day 1 -> day 2 of one synthetic world (docs/retrain.md): generates both days (`synth --day 1|2`, new
users and items appended, tastes drifting), then for every seed and model trains day 1 (pretrain +
EPOCHS epochs), day 2 cold (pretrain + EPOCHS epochs from random weights) and day 2 warm (pretrain
--init-from day 1's, then WARM_EPOCHS epochs with train --init-from day 1's run), and writes the test
AUCs and wall times of the day-2 runs to OUT/retrain.json and OUT/retrain.md. Finished runs (their
metrics.json present) are kept, so an interrupted job continues. Settings come from the environment:

  NPROC        ranks per job (default 2)
  CONFIG       base run config (default configs/demo.yaml)
  MODELS       models to compare (default "esmm cstwa")
  SEEDS        training seeds (default "0 1 2"); the world's seed is WORLD_SEED (default 0)
  PRESET       synthetic preset (default demo), SCALE its scale (default 1.0)
  GROWTH       new users and items per day as a fraction (default 0.1)
  DRIFT        per-day taste drift (default 0.05)
  EPOCHS       epochs of day 1 and of the cold day-2 run (default 3); WARM_EPOCHS (default 1)
  DATA         where the two days' data sets go (default data/retrain)
  OUT          where the runs and the tables go (default runs/retrain)
  VENV         virtual environment holding cstwa-dist (default .venv)
USAGE
}

for arg in "$@"; do
  case $arg in
    -h | --help) usage; exit 0 ;;
  esac
done
if [ $# -gt 0 ]; then
  echo "launchers/retrain_days.sh: takes no arguments, got: $*; set NPROC, SEEDS, MODELS, ... instead (--help)" >&2
  exit 2
fi

cd "$(dirname "$0")/.."
venv=${VENV:-.venv}
export PATH="$PWD/$venv/bin:$PATH"
nproc=${NPROC:-2}
config=${CONFIG:-configs/demo.yaml}
models=${MODELS:-esmm cstwa}
seeds=${SEEDS:-0 1 2}
preset=${PRESET:-demo}
scale=${SCALE:-1.0}
world_seed=${WORLD_SEED:-0}
growth=${GROWTH:-0.1}
drift=${DRIFT:-0.05}
epochs=${EPOCHS:-3}
warm_epochs=${WARM_EPOCHS:-1}
data=${DATA:-data/retrain}
out=${OUT:-runs/retrain}
start=$(date +%s)

for day in 1 2; do
  ds="$data/day$day"
  if python -c "import sys; from cstwa_dist.data.writer import dataset_complete; sys.exit(0 if dataset_complete('$ds') else 1)"; then
    echo "== $ds present"
  else
    echo "== generating day $day into $ds"
    rm -rf "$ds"
    cstwa-dist synth --preset "$preset" --scale "$scale" --seed "$world_seed" --day "$day" \
      --growth "$growth" --drift "$drift" --out "$ds"
  fi
done

source launchers/ray_runtime.sh
start_node_ray_runtime

# One job: `torchrun.sh` with the base config, the day's data, and this leg's run folders.
job() {
  local command=$1 leg=$2 day=$3 seed=$4 leg_epochs=$5
  shift 5
  bash launchers/torchrun.sh "$nproc" "$command" --config "$config" \
    --set "data.dataset=$data/day$day" --set "train.run_dir=$out/seed$seed/$leg" \
    --set "structure.graph_dir=$out/seed$seed/$leg/structure" --set "train.seed=$seed" \
    --set "train.epochs=$leg_epochs" "$@"
}

timed() {  # timed FILE cmd...: runs cmd, writes its wall seconds to FILE
  local file=$1
  shift
  local t0
  t0=$(date +%s.%N)
  "$@"
  python -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$t0" "$(date +%s.%N)" >"$file"
}

for seed in $seeds; do
  for leg in day1 cold warm; do
    day=2
    leg_epochs=$epochs
    init=()
    pre_init=()
    if [ "$leg" = day1 ]; then day=1; fi
    if [ "$leg" = warm ]; then
      leg_epochs=$warm_epochs
      pre_init=(--init-from "$out/seed$seed/day1/structure/pretrain")
    fi
    dir="$out/seed$seed/$leg"
    mkdir -p "$dir"
    if [ ! -f "$dir/structure/structure.json" ]; then
      echo "== seed $seed $leg: pretrain (day $day)"
      rm -rf "$dir/structure"
      timed "$dir/pretrain.seconds" job pretrain "$leg" "$day" "$seed" "$epochs" "${pre_init[@]}"
    fi
    for model in $models; do
      if [ -f "$dir/$model/metrics.json" ]; then
        echo "== seed $seed $leg $model: done"
        continue
      fi
      if [ "$leg" = warm ]; then init=(--init-from "$out/seed$seed/day1/$model"); fi
      echo "== seed $seed $leg: train $model (day $day, $leg_epochs epochs)"
      timed "$dir/$model.seconds" job train "$leg" "$day" "$seed" "$leg_epochs" --model "$model" "${init[@]}"
    done
  done
done

python -m cstwa_dist.experiments.retrain "$out" --models $models --seeds $seeds
echo "retrain_days finished in $(( $(date +%s) - start ))s; tables in $out/retrain.md"
