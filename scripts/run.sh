#!/usr/bin/env bash
# Set up (if needed) and run: scripts/run.sh [run_stream.py arguments]
# On CPU, run_stream.py itself picks the faster malloc setting (STREAMING_SSL_ALLOCATOR; see README "Speed").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python run_stream.py "$@"
