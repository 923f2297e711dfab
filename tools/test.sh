#!/usr/bin/env bash
# Lint and the whole test suite (CPU, offline), in the project's virtual environment and vLLM's.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
VLLM_VENV="${VLLM_VENV:-.venv-vllm}"
VENV="$VENV" bash tools/bootstrap.sh
VLLM_VENV="$VLLM_VENV" bash tools/vllm_env.sh
export HF_HUB_OFFLINE=1
# The vLLM tests start the server from this environment, and fail (rather than skip) without it.
export TRL_SELFDISTILL_VLLM_PYTHON="$VLLM_VENV/bin/python" TRL_SELFDISTILL_REQUIRE_VLLM=1
"$VENV/bin/ruff" check .
"$VENV/bin/python" -m pytest -q "$@"
