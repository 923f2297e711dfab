"""Run by test_sdft_distributed.py under `accelerate launch --multi_gpu --num_processes 2` on CPUs, without
`PartialState(cpu=True)`: accelerate's state does not join the two processes, and `distill_dataset` must refuse."""

import os
import sys
from pathlib import Path

from datasets import Dataset
from tiny_models import build_tiny_llama, build_tiny_tokenizer

from trl_selfdistill import distill_dataset

out = Path(sys.argv[1])
tokenizer = build_tiny_tokenizer()
dataset = Dataset.from_list([{"prompt": "Count to 2.", "completion": "0 1 2"}])
try:
    distill_dataset(build_tiny_llama(tokenizer), tokenizer, dataset, cache_dir=out / "cache", show_progress=False)
    message = "not refused"
except RuntimeError as error:
    message = str(error)
(out / f"rank{os.environ['RANK']}.txt").write_text(message)
