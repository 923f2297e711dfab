"""Runs a test script on two CPU processes with `accelerate launch`.

`--multi_gpu` picks accelerate's torchrun launcher, which runs on CPU with gloo; `--cpu --num_processes 2` would start
a single process with accelerate 1.15.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent


def launch_two_processes(script: Path, *script_args: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(script), *script_args]  # fmt: skip
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
