# Copyright 2026 The trl_selfdistill developers. Licensed under the Apache License, Version 2.0.
"""Dynamic self-distillation from the previous mini-batch (Fu et al., 2024) with `DynSDPBTrainer`.

CPU demo on the bundled model and GSM8K sample:

    accelerate launch --cpu --num_processes 1 examples/dynsdpb.py --config examples/configs/dynsdpb_smollm2_cpu.yaml

Llama-2-7b-chat on GSM8K as QLoRA on one GPU (or several with `--multi_gpu`):

    accelerate launch examples/dynsdpb.py --config examples/configs/dynsdpb_llama2_7b_gsm8k_qlora.yaml
"""

from __future__ import annotations

from dataclasses import dataclass, field

from _common import set_model_init_kwargs  # first: its warning filters
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config

from trl_selfdistill import DynSDPBConfig, DynSDPBTrainer
from trl_selfdistill.data import load_task_dataset
from trl_selfdistill.models import resolve_model_name


@dataclass
class DynSDPBScriptArguments(ScriptArguments):
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N training rows (quick runs and demos)."}
    )


def main(script_args: DynSDPBScriptArguments, training_args: DynSDPBConfig, model_args: ModelConfig) -> None:
    set_model_init_kwargs(training_args, model_args)
    train_dataset = load_task_dataset(
        script_args.dataset_name,
        split=script_args.dataset_train_split,
        config=script_args.dataset_config,
        max_samples=script_args.max_train_samples,
    )
    eval_dataset = None
    if training_args.eval_strategy != "no":
        eval_dataset = load_task_dataset(
            script_args.dataset_name, split=script_args.dataset_test_split, config=script_args.dataset_config
        )

    trainer = DynSDPBTrainer(
        model=resolve_model_name(model_args.model_name_or_path),
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    trainer.end()  # finish the trackers and destroy the process group, as TRL's scripts do


if __name__ == "__main__":
    parser = TrlParser((DynSDPBScriptArguments, DynSDPBConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config()
    main(script_args, training_args, model_args)
