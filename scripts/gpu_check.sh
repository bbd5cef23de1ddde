#!/usr/bin/env bash
# The GPU check on a bare GPU machine, from the repository root (issue 17):
#   bash scripts/gpu_check.sh [bench/gpu_check.py arguments, e.g. --only tests,e2e]
# Uses the machine's own python3 and torch (no venv, no torch install, no network): installs the wheels
# of .gpu/wheels (scripts/fetch_gpu_wheels.sh; avalanche-lib and what it imports) into .gpu/site,
# reads CIFAR-10 from .gpu/data, then runs bench/gpu_check.py (with --results-dir "$OUT" where $OUT is set). Exits 2
# at once without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" bench/gpu_check.py --preflight "$@"  # exit 2 now when no CUDA device is visible (unless --dry-run)

[ -d .gpu/wheels ] || { echo "gpu_check: .gpu/wheels missing: run scripts/fetch_gpu_wheels.sh where PyPI is reachable and carry .gpu/wheels and .gpu/data" >&2; exit 1; }
stamp=.gpu/site/.installed
want=$(ls .gpu/wheels | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    rm -rf .gpu/site
    mkdir -p .gpu/site
    wheels=()
    for w in .gpu/wheels/*.whl; do
        case "$(basename "$w")" in
            protobuf-*)  # wandb needs protobuf >= 5: install ours only when the machine's is older
                "$PY" -c 'import sys, google.protobuf as p; sys.exit(int(int(p.__version__.split(".")[0]) < 5))' \
                    2>/dev/null && continue ;;
        esac
        wheels+=("$w")
    done
    if "$PY" -m pip --version >/dev/null 2>&1; then
        "$PY" -m pip install --quiet --no-deps --no-index --find-links .gpu/wheels --target .gpu/site "${wheels[@]}"
    else  # no pip: a wheel is a zip of its site-packages files
        "$PY" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(".gpu/site") for w in sys.argv[1:]]' "${wheels[@]}"
    fi
    # avalanche-lib's wheel also installs top-level tests/ and examples/ packages: ours must be the only `tests`
    rm -rf .gpu/site/tests .gpu/site/examples
    echo "$want" > "$stamp"
fi
export PYTHONPATH="$PWD/.gpu/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export STREAMING_SSL_DATA="${STREAMING_SSL_DATA:-$PWD/.gpu/data}"
# the device tool brings back only what lands in its $OUT: the report and a tar.gz of the logs go there too
exec "$PY" bench/gpu_check.py ${OUT:+--results-dir "$OUT"} "$@"
