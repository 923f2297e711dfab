"""Run by test_dynsdpb_deepspeed.py on two CPU processes: DynSDPB under DeepSpeed ZeRO-`stage`, stopped and resumed.

For full fine-tuning and for LoRA, six steps with checkpoints at 2, 4 and 6, then a second trainer that resumes from a
copy of checkpoints 2 and 4 (what a run killed after saving step 4 leaves) and trains steps 5 and 6 again. DeepSpeed
restores the weights with its own loader, never through `Trainer._load_from_checkpoint`. Each process writes the
runs' losses and what it held of the output layer's weight after training (ZeRO-3: a shard).
"""

import json
import os
import shutil
import sys
from pathlib import Path

os.environ["DS_ACCELERATOR"] = "cpu"  # also on a machine with a GPU: two processes cannot share one

from peft import LoraConfig
from recipes import tiny_training_args
from tiny_models import addition_rows, build_tiny_llama, build_tiny_tokenizer

from trl_selfdistill import DynSDPBConfig, DynSDPBTrainer
from trl_selfdistill.dynsdpb.head import output_layer

out, stage = Path(sys.argv[1]), int(sys.argv[2])
deepspeed = {
    "zero_optimization": {
        "stage": stage,
        "stage3_param_persistence_threshold": 0,  # every parameter partitioned (the default keeps small ones whole)
        "stage3_gather_16bit_weights_on_model_save": True,  # whole weights in the checkpoint, to compare
    },
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
}


def train(folder: Path, lora: bool, resume: bool) -> DynSDPBTrainer:
    tokenizer = build_tiny_tokenizer()
    args = tiny_training_args(
        folder, max_steps=6, save_strategy="steps", save_steps=2, learning_rate=5e-3, deepspeed=deepspeed,
        use_cpu=True, dynsdpb_mode="constant",  # full-weight distillation: a lost teacher changes the weights too
    )  # fmt: skip
    trainer = DynSDPBTrainer(
        model=build_tiny_llama(tokenizer), args=DynSDPBConfig(**args), train_dataset=addition_rows(),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]) if lora else None,
    )  # fmt: skip
    trainer.train(resume_from_checkpoint=True if resume else None)
    return trainer


results = {}
for adapter in ("full", "lora"):
    uninterrupted = train(out / adapter / "uninterrupted", lora=adapter == "lora", resume=False)
    if uninterrupted.accelerator.is_main_process:
        for step in (2, 4):
            checkpoint = f"{adapter}/%s/out/checkpoint-{step}"
            shutil.copytree(out / (checkpoint % "uninterrupted"), out / (checkpoint % "resumed"))
    uninterrupted.accelerator.wait_for_everyone()
    resumed = train(out / adapter / "resumed", lora=adapter == "lora", resume=True)
    results[adapter] = {
        name: [[e["step"], e["loss"], e["distill/loss"]] for e in trainer.state.log_history if "loss" in e]
        for name, trainer in (("uninterrupted", uninterrupted), ("resumed", resumed))
    }
    results[adapter]["output_layer_numel"] = output_layer(resumed.model).weight.numel()
(out / f"rank{resumed.accelerator.process_index}.json").write_text(json.dumps(results))
# Leave without the gloo teardown, which on CPU now and then aborts a process after all the work is done.
resumed.accelerator.wait_for_everyone()
os._exit(0)
