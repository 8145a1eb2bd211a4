#!/usr/bin/env bash
# The test command: sets up ./.venv if needed, then runs the whole CPU test suite
# (GPU tests report themselves skipped, with the reason, on machines without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
exec .venv/bin/python -m pytest -q "$@"
