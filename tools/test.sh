#!/usr/bin/env bash
# Lint and the whole test suite (CPU, offline), in the project's virtual environment.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
VENV="$VENV" bash tools/bootstrap.sh
export HF_HUB_OFFLINE=1
"$VENV/bin/ruff" check .
"$VENV/bin/python" -m pytest -q "$@"
