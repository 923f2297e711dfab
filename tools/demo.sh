#!/usr/bin/env bash
# The CPU demo: SDFT on the bundled SmolLM2-135M-Instruct over a bundled GSM8K sample (rewrite, report, LoRA
# training, GSM8K accuracy before/after on held-out questions). About 10 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
VENV="$VENV" bash tools/bootstrap.sh
export HF_HUB_OFFLINE=1
"$VENV/bin/accelerate" launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
    examples/sdft.py --config examples/configs/sdft_smollm2_cpu.yaml "$@"
