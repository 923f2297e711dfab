"""Run by test_sdft_distributed.py under `accelerate launch --multi_gpu --num_processes 2` (two CPU processes)."""

import json
import os
import sys
from pathlib import Path

from accelerate import PartialState
from datasets import Dataset
from tiny_models import build_tiny_llama, build_tiny_tokenizer

from trl_selfdistill import SDFTConfig, SDFTTrainer, distill_dataset

out = Path(sys.argv[1])
# Two CPU processes talk over gloo, as `use_cpu=True` sets up in the trainer below; `distill_dataset` before it needs
# that state too, or each process would take itself for the only one.
PartialState(cpu=True)
tokenizer = build_tiny_tokenizer()
dataset = Dataset.from_list(
    [{"prompt": f"Count to {i}.", "completion": " ".join(map(str, range(i + 1)))} for i in range(8)]
)


def accept_any(text, reference, row):  # own answers need a checker; with this one the likelihoods alone decide
    return True


# The least surprising target: candidates generated and scored in shares, every process choosing from all the scores.
model = build_tiny_llama(tokenizer)
least_surprising = distill_dataset(
    model, tokenizer, dataset, candidates=["own_answer", "rewrite"], selection="lowest_nll", checker=accept_any,
    generation_kwargs={"max_new_tokens": 6}, keep_truncated=True, batch_size=2, cache_dir=out / "least_surprising",
    show_progress=False,
)  # fmt: skip
args = SDFTConfig(
    output_dir=str(out / "train"),
    sdft_cache_dir=str(out / "cache"),
    sdft_generation_kwargs={"max_new_tokens": 6},
    sdft_keep_truncated=True,  # the random tiny model never ends within 6 tokens: keep its rewrites to compare
    sdft_batch_size=2,
    max_steps=1,
    per_device_train_batch_size=2,
    bf16=False,
    use_cpu=True,
    report_to=[],
    save_strategy="no",
    disable_tqdm=True,
)
trainer = SDFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
trainer.train()
rank = PartialState().process_index
result = {
    "report": trainer.distillation_report,
    "completions": list(trainer.train_dataset["completion"]),
    "least_surprising": {"report": least_surprising.report, "rows": least_surprising.rows},
}
(out / f"rank{rank}.json").write_text(json.dumps(result))
# Both results are on disk once every process is here. Then leave without the gloo teardown, which on CPU now and
# then aborts a process ("terminate called without an active exception") after all the work is done.
trainer.accelerator.wait_for_everyone()
os._exit(0)
