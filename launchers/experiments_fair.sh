#!/usr/bin/env bash
# Table 2 (8 models), Table 3 (CSTWA ablation) and three CSTWA variants (SM reading (b), U/I from the
# pre-trained representation, shared tables) on the fair instrument at the three pre-registered
# conflict levels, 5 seeds each, 2 ranks, then the summary across levels (docs/experiments/README.md). Resumable: finished cells and data
# sets are kept, so re-running continues where a killed run stopped.
#   launchers/experiments_fair.sh [LEVELS...]        default: none moderate strong
# Env: NPROC (default 2), SEEDS (default 5), SCALE (default 1.0), OUT (default runs/fair).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv}
nproc=${NPROC:-2}
seeds=${SEEDS:-5}
scale=${SCALE:-1.0}
out=${OUT:-runs/fair}
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
    --seeds "$seeds" --ablation --models "$models" \
    --variant "CSTWA, SM reading (b)=cstwa:structure.sm_reading=recomputed" \
    --variant "CSTWA, U/I from the pre-trained representation=cstwa:structure.sm_init=pretrained" \
    --variant "CSTWA, shared CTR/CVR tables (deviation from Eq. 6)=cstwa:model.shared_tables=true" \
    --out "$out/$level"
done
args=()
for level in "${levels[@]}"; do args+=("$level=$out/$level"); done
"$venv/bin/cstwa-dist" experiment-summary "${args[@]}" --out "$out/summary"
