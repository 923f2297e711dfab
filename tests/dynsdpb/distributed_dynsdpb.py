"""Run by test_dynsdpb_distributed.py under `accelerate launch --multi_gpu --num_processes 2` (two CPU processes)."""

import json
import os
import sys
from pathlib import Path

from datasets import Dataset
from tiny_models import build_tiny_llama, build_tiny_tokenizer

from trl_selfdistill import DynSDPBConfig, DynSDPBTrainer


class RecordingTrainer(DynSDPBTrainer):
    """Records the (index, reused) rows of every micro-batch this process trains on."""

    batches = []

    def compute_loss(self, model, inputs, *args, **kwargs):
        if self.model.training:
            self.batches.append([inputs["dynsdpb_index"].tolist(), inputs["dynsdpb_reused"].tolist()])
        return super().compute_loss(model, inputs, *args, **kwargs)


out = Path(sys.argv[1])
tokenizer = build_tiny_tokenizer()
dataset = Dataset.from_list([{"prompt": f"Say {i}.", "completion": f"{i} {i} {i}"} for i in range(16)])
args = DynSDPBConfig(
    output_dir=str(out / "train"),
    per_device_train_batch_size=4,
    gradient_accumulation_steps=2,
    num_train_epochs=1,
    logging_steps=1,
    bf16=False,
    use_cpu=True,
    report_to=[],
    save_strategy="no",
    disable_tqdm=True,
)
trainer = RecordingTrainer(
    model=build_tiny_llama(tokenizer), args=args, train_dataset=dataset, processing_class=tokenizer
)
trainer.train()
rank = trainer.accelerator.process_index
logs = [entry for entry in trainer.state.log_history if "loss" in entry]
(out / f"rank{rank}.json").write_text(json.dumps({"batches": trainer.batches, "logs": logs}))
# Both results are on disk once every process is here. Then leave without the gloo teardown, which on CPU now and
# then aborts a process ("terminate called without an active exception") after all the work is done.
trainer.accelerator.wait_for_everyone()
os._exit(0)
