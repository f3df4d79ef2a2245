#!/usr/bin/env bash
# Table 2 (8 models), Table 3 (CSTWA ablation) and four CSTWA variants (the paper's settings, SM
# reading (a), U/I from the pre-trained representation, shared tables) on the fair instrument at the
# three pre-registered conflict levels, 5 seeds each, 2 ranks, then the summary across levels
# (docs/experiments/README.md). Resumable: finished cells and data sets are kept, so re-running
# continues where a killed run stopped (with the same settings: changed ones need another OUT).
#   launchers/experiments_fair.sh [LEVELS...]        default: none moderate strong
# Env: NPROC (default 2), SEEDS (default 5), SCALE (default 1.0), OUT (default runs/fair),
# CSTWA_SET: CSTWA's own settings in every table (--model-set), default the ones chosen on validation
# Purchase AUC at conflict `none` (docs/experiments/README.md, "CSTWA's hyper-parameters on `fair`");
# CSTWA_SET= (empty) runs the paper's. The variants then include the paper's settings as a row.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: launchers/experiments_fair.sh [-h|--help] [LEVEL...]

Table 2 (8 models), Table 3 (CSTWA ablation) and four CSTWA variants on the fair instrument, one
experiment per conflict LEVEL (none, moderate or strong; default: all three), then the summary across
levels in $OUT/summary. Generates data/fair-LEVEL when it is absent. Resumable: finished cells and data
sets are kept (with the same settings; changed ones need another OUT).

Environment:
  NPROC      ranks per experiment (default 2)
  SEEDS      seeds per cell (default 5)
  SCALE      scale of a generated fair data set (default 1.0)
  OUT        results folder (default runs/fair)
  CSTWA_SET  CSTWA's own settings in every table (--model-set cstwa:...); default the ones chosen
             on validation at conflict `none`; set it empty for the paper's
  VENV       virtual environment holding cstwa-dist (default .venv)
USAGE
}

for arg in "$@"; do
  case $arg in
    -h | --help) usage; exit 0 ;;
    none | moderate | strong) ;;
    *)
      echo "launchers/experiments_fair.sh: unknown conflict level '$arg': use none, moderate or strong (--help)" >&2
      exit 2
      ;;
  esac
done

cd "$(dirname "$0")/.."
venv=${VENV:-.venv}
nproc=${NPROC:-2}
seeds=${SEEDS:-5}
scale=${SCALE:-1.0}
out=${OUT:-runs/fair}
cstwa_set=${CSTWA_SET-loss.gamma=2;structure.sm_reading=recomputed;structure.beta=0.5}
model_set=()
[ -z "$cstwa_set" ] || model_set=(--model-set "cstwa:$cstwa_set")
levels=("$@")
[ ${#levels[@]} -gt 0 ] || levels=(none moderate strong)
models=mlp,esmm,omoe,mmoe,ple,aitm,escm2_ips,cstwa
for level in "${levels[@]}"; do
  data=data/fair-$level
  if [ ! -f "$data/stats.json" ]; then
    "$venv/bin/cstwa-dist" synth --preset fair --conflict "$level" --scale "$scale" --seed 0 --out "$data"
  fi
  VENV=$venv bash launchers/torchrun.sh "$nproc" experiment --config configs/fair.yaml \
    --set "data.dataset=$data" --set "train.run_dir=$out/$level" \
    --set "structure.graph_dir=$out/$level/structure" \
    --seeds "$seeds" --ablation --models "$models" "${model_set[@]}" \
    --variant "CSTWA, the paper's settings (γ 3, β 0.3, SM reading a)=cstwa:loss.gamma=3;structure.beta=0.3;structure.sm_reading=free" \
    --variant "CSTWA, SM reading (a)=cstwa:structure.sm_reading=free" \
    --variant "CSTWA, U/I from the pre-trained representation (reading a)=cstwa:structure.sm_reading=free;structure.sm_init=pretrained" \
    --variant "CSTWA, shared CTR/CVR tables (deviation from Eq. 6)=cstwa:model.shared_tables=true" \
    --out "$out/$level"
done
args=()
for level in "${levels[@]}"; do args+=("$level=$out/$level"); done
"$venv/bin/cstwa-dist" experiment-summary "${args[@]}" --out "$out/summary"
