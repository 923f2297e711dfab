"""Run by test_shared_cache.py in a subprocess: one rewrite run on a shared cache, started when a file appears.

Arguments: the model directory, the cache root, the result file, the start file, the number of rows, and the other
`distill_dataset` arguments as JSON.
"""

import json
import sys
import time
from pathlib import Path

import torch
from tiny_models import addition_rows
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_selfdistill import distill_dataset

model_dir, cache_root, result, start, rows, rewrite = sys.argv[1:7]
torch.set_num_threads(1)  # two runs on two cores, each on its own
model = AutoModelForCausalLM.from_pretrained(model_dir)
tokenizer = AutoTokenizer.from_pretrained(model_dir)
dataset = addition_rows(int(rows))
Path(result + ".ready").touch()
while not Path(start).exists():  # loaded and waiting: both runs start their rewrite at the same moment
    time.sleep(0.01)
distilled = distill_dataset(model, tokenizer, dataset, cache_dir=cache_root, **json.loads(rewrite))
Path(result).write_text(json.dumps({"report": distilled.report, "completions": list(distilled.dataset["completion"])}))
