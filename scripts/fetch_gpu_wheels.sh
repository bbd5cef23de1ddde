#!/usr/bin/env bash
# Prepare what the GPU check needs on a bare GPU machine that has its own python3 + torch but no
# package registry and no internet (run here, with internet to PyPI):
#   .gpu/wheels/  avalanche-lib 0.6.0 and every package it imports at import time that such a machine
#                 lacks (cp312 / manylinux x86_64 or pure-python wheels, the versions of this .venv)
#   .gpu/data/    cifar10.npz: the first TRAIN_PER_CLASS / TEST_PER_CLASS images of every class
# Both are git-ignored; pass them as `carry` (.gpu/wheels, .gpu/data). Then on the GPU machine:
#   bash scripts/gpu_check.sh
# Usage: STREAMING_SSL_DATA=/path/to/folder-of-cifar10.npz bash scripts/fetch_gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
PYVER=${GPU_PYTHON_VERSION:-3.12}
TRAIN_PER_CLASS=${TRAIN_PER_CLASS:-300}
TEST_PER_CLASS=${TEST_PER_CLASS:-100}
LIMIT_MB=60

# avalanche-lib 0.6.0's requirements the GPU machine lacks, then what those import at import time
# (found by importing our entry points with only the GPU machine's packages visible; see bench/README.md)
MISSING="avalanche-lib dill GPUtil pytorchcv qpsolvers gdown wandb"
IMPORTED="requests urllib3 idna certifi charset-normalizer beautifulsoup4 soupsieve click platformdirs pydantic
pydantic-core typing-inspection annotated-types typing-extensions opentelemetry-api xxhash protobuf"

# a fresh folder, swapped in whole at the end: a wheel left by an earlier fetch (another version of one package)
# would stop gpu_check.sh's install there (pip: ResolutionImpossible), and a failed download keeps the old set
new=.gpu/wheels.new
rm -rf "$new"
mkdir -p "$new" .gpu/data
pins=()
for dist in $MISSING $IMPORTED; do
    version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$dist")
    pins+=("$dist==$version")
done
binary=() sdist=()
for pin in "${pins[@]}"; do
    case "$pin" in GPUtil==*) sdist+=("$pin") ;; *) binary+=("$pin") ;; esac  # GPUtil is on PyPI as sdist only
done
"$PY" -m pip download --quiet --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --platform any --no-deps -d "$new" "${binary[@]}"
# a pure-python sdist: build its wheel here (py3-none-any)
"$PY" -m pip wheel --quiet --no-deps -w "$new" "${sdist[@]}"
rm -f "$new"/*.tar.gz
rm -rf .gpu/wheels
mv "$new" .gpu/wheels

data=${STREAMING_SSL_DATA:?set STREAMING_SSL_DATA to the folder holding cifar10.npz}
[ -f "$data" ] || data="$data/cifar10.npz"
"$PY" bench/gpu_check.py --write-data "$data" .gpu/data/cifar10.npz \
    --train-per-class "$TRAIN_PER_CLASS" --test-per-class "$TEST_PER_CLASS"

ls -1 .gpu/wheels
du -sh .gpu/wheels .gpu/data
bytes=$(du -sb .gpu/wheels .gpu/data | awk '{s += $1} END {print s}')
echo "total $((bytes / 1048576)) MiB in .gpu/wheels + .gpu/data (limit of what travels: 64 MiB)"
if [ "$bytes" -gt $((LIMIT_MB * 1048576)) ]; then
    echo "error: more than $LIMIT_MB MiB: lower TRAIN_PER_CLASS / TEST_PER_CLASS" >&2
    exit 1
fi
