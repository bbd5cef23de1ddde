#!/usr/bin/env bash
# Rehearse the GPU machine here, on the CPU, before a device is lent (issue 17). That machine runs Python 3.12
# with its own torch 2.11 / torchvision 0.26 and a fixed set of packages; our .venv runs Python 3.11 and torch
# 2.14.1. This builds .gpu/rehearsal (git-ignored) with only what the GPU machine has, then runs
#   1. scripts/gpu_check.sh --dry-run with that python: the carried wheels install into .gpu/site exactly as
#      there, and every check runs on tiny sizes on the CPU;
#   2. with --suite, the whole test suite on that python (torch 2.11 API drift shows up here, not there).
# Usage: STREAMING_SSL_DATA=../shared/data bash scripts/gpu_rehearsal.sh [--suite]
# Needs PyPI (torch 2.11's Linux wheel is the CUDA 13 build: about 3 GB of downloads, once) and python3.12.
set -euo pipefail
cd "$(dirname "$0")/.."
PY312=${PYTHON312:-}
if [ -z "$PY312" ]; then  # python3.12 on the PATH (a pyenv shim may exist without being active), else pyenv's own
    for candidate in python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
        if "$candidate" -V >/dev/null 2>&1; then PY312=$candidate; break; fi
    done
fi
[ -n "$PY312" ] || { echo "gpu_rehearsal: no working python3.12 found: install one, or set PYTHON312" >&2; exit 1; }
VENV=.gpu/rehearsal
# the GPU machine's packages (issue 17; and JAX, which its image also holds and avalanche's qpsolvers imports
# when present), and nothing else
GPU_PACKAGES="torch==2.11.0 torchvision==0.26.0 numpy scipy scikit-learn matplotlib tensorboard tqdm pyyaml
torchmetrics psutil pytest jax==0.11.2"
if [ ! -x "$VENV/bin/python" ]; then
    "$PY312" -m venv "$VENV.tmp"
    "$VENV.tmp/bin/python" -m pip install --quiet $GPU_PACKAGES
    rm -rf "$VENV"
    mv "$VENV.tmp" "$VENV"  # only complete venvs under the final name; we call bin/python -m, which survives a move
fi
"$VENV/bin/python" -c 'import sys, torch, torchvision; print("rehearsal:", sys.version.split()[0], "torch",
torch.__version__, "torchvision", torchvision.__version__, "cuda available:", torch.cuda.is_available())'
[ -d .gpu/wheels ] || bash scripts/fetch_gpu_wheels.sh

PYTHON="$VENV/bin/python" bash scripts/gpu_check.sh --dry-run
if [ "${1:-}" = "--suite" ]; then
    PYTHONPATH="$PWD/.gpu/site:$PWD" "$VENV/bin/python" -m pytest tests -p no:cacheprovider
fi
