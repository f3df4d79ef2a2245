#!/usr/bin/env bash
# One prepared check of a GPU node (`cstwa-dist doctor`): FBGEMM fused kernels, NCCL all-to-all,
# faiss-gpu IVF with recall, CSTWA training with its graphs, `bench train`; one JSON (docs/gpu-check.md).
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: launchers/gpu_check.sh [-h|--help] [--dry-run] [--out FILE] [DOCTOR OPTIONS...]

One prepared check of a GPU node in under 10 minutes (`cstwa-dist doctor`, docs/gpu-check.md): the
environment (versions, devices, NCCL), FBGEMM's fused table optimizer on a sharded EmbeddingBagCollection,
all-to-all across every visible GPU, Faiss IVF build + search on 1M vectors with recall@k against
exact search, CSTWA training with its kNN graphs (synth, pretrain, train) and `bench train`. Each
check runs in its own processes with its own time budget; one failing check never stops the others.
Writes one JSON (ok / failed / skipped, seconds and figures per check) and exits 1 if a check failed.
On a machine without CUDA it refuses (exit 2) unless --dry-run is given. It runs from the
repository root: relative paths in its options are taken from there.

  --dry-run      every check at tiny size on CPU (gloo ranks, faiss-cpu): the rehearsal
  --out FILE     the JSON (default: $OUT)
  other options  passed to `cstwa-dist doctor` (--checks, --work-dir, --budget-factor, ...;
                 `cstwa-dist doctor --help` lists them)

Environment:
  OUT                   JSON file when --out is not given (default runs/gpu_check.json)
  CUDA_VISIBLE_DEVICES  the GPUs checked (default: every GPU the node shows)
  VENV                  virtual environment holding cstwa-dist (default .venv)
USAGE
}

has_out=0
for arg in "$@"; do
  case $arg in
    -h | --help) usage; exit 0 ;;
    --out | --out=*) has_out=1 ;;
  esac
done

cd "$(dirname "$0")/.."
venv=${VENV:-.venv}
case $venv in
  /*) export PATH="$venv/bin:$PATH" ;;
  *) export PATH="$PWD/$venv/bin:$PATH" ;;
esac
args=("$@")
if [ "$has_out" = 0 ]; then
  args+=(--out "${OUT:-runs/gpu_check.json}")
fi
exec cstwa-dist doctor "${args[@]}"
