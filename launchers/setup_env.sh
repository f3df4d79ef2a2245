#!/usr/bin/env bash
# Creates .venv and installs one pinned profile: cpu (fbgemm-gpu-cpu, faiss-cpu) or gpu (CUDA builds).
#   launchers/setup_env.sh [--profile auto|cpu|gpu] [--venv DIR] [--python PY]
# Idempotent: a stamp records the hash of the requirement files; when nothing changed it returns at once.
# torchrec is installed with --no-deps because it declares the CUDA fbgemm-gpu, which fails to import
# on machines without a GPU driver; its other requirements are pinned in the profile files.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=auto
venv=.venv
python=${PYTHON:-python3}
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile=$2; shift 2 ;;
    --venv) venv=$2; shift 2 ;;
    --python) python=$2; shift 2 ;;
    -h|--help) sed -n 2,6p "$0"; exit 0 ;;
    *) echo "setup_env.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
if [ "$profile" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then profile=gpu; else profile=cpu; fi
fi
case "$profile" in cpu|gpu) ;; *) echo "setup_env.sh: profile must be auto, cpu or gpu" >&2; exit 2 ;; esac

req=launchers/requirements
stamp="$venv/.install-stamp"
want="$profile $(cat "$req/$profile.txt" "$req/dev.txt" pyproject.toml | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/cstwa-dist" ]; then
  echo "setup_env: $venv is up to date ($profile profile)"
  exit 0
fi

"$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required")'
echo "setup_env: installing the $profile profile into $venv (takes about a minute on the cpu profile)"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install -r "$req/$profile.txt" -r "$req/dev.txt"
"${pip[@]}" install --no-deps torchrec==1.8.0
"${pip[@]}" install --no-deps --no-build-isolation -e . 2>/dev/null || "${pip[@]}" install --no-deps -e .
"$venv/bin/python" -c 'import torchrec, fbgemm_gpu, faiss, ray.data, pyarrow, sklearn, cstwa_dist' \
  || { echo "setup_env: import check failed" >&2; exit 1; }
echo "$want" > "$stamp"
echo "setup_env: done ($profile profile)"
