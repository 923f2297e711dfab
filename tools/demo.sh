#!/usr/bin/env bash
# The CPU demo: SDFT on the bundled SmolLM2-135M-Instruct over the bundled two-digit addition task (rewrite, report,
# LoRA training; before/after: the task's accuracy on held-out questions and IFEval scored by lm-eval). About 5
# minutes on 2 CPU cores once installed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
VENV="$VENV" bash tools/bootstrap.sh
export HF_HUB_OFFLINE=1
# accelerate's own CPU default (OMP_NUM_THREADS, else the physical cores), passed so that it does not warn about it.
THREADS="${OMP_NUM_THREADS:-$("$VENV/bin/python" -c 'import psutil; print(psutil.cpu_count(logical=False) or 1)')}"
"$VENV/bin/accelerate" launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
    --num_cpu_threads_per_process "$THREADS" examples/sdft.py --config examples/configs/sdft_smollm2_cpu.yaml "$@"
