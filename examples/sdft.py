# Copyright 2026 The trl_selfdistill developers. Licensed under the Apache License, Version 2.0.
"""Self-Distillation Fine-Tuning (Yang et al., ACL 2024) with `SDFTTrainer`.

The CPU demo (bundled SmolLM2-135M-Instruct, bundled GSM8K sample, before/after accuracy):

    accelerate launch --cpu --num_processes 1 examples/sdft.py --config examples/configs/sdft_smollm2_cpu.yaml

The paper's recipe as QLoRA on one GPU (Llama-2-7b-chat, GSM8K):

    accelerate launch examples/sdft.py --config examples/configs/sdft_llama2_7b_gsm8k_qlora.yaml

Datasets: a Hub name (`--dataset_name openai/gsm8k --dataset_config main`), a local json/jsonl/csv/parquet file or
directory, or `bundled/gsm8k`. Raw GSM8K `question`/`answer` columns are converted to prompt-completion.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field

# Third-party notes that every run would print, harmless here, filtered before the imports that emit them:
# bitsandbytes on an optional CPU kernel package, and PEFT reading a transformers attribute that was renamed.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward from kernels-community")
)
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config  # noqa: E402

from trl_selfdistill import SDFTConfig, SDFTTrainer  # noqa: E402
from trl_selfdistill.data import BUNDLED_GSM8K_NAME, load_task_dataset  # noqa: E402
from trl_selfdistill.evaluation.gsm8k import evaluate_gsm8k  # noqa: E402


@dataclass
class SDFTScriptArguments(ScriptArguments):
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N training rows (quick runs and demos)."}
    )
    gsm8k_style: str = field(
        default="raw",
        metadata={"help": "Raw GSM8K answers: `raw` (as on the Hub) or `official` (the SDFT code's preparation)."},
    )
    eval_gsm8k_samples: int = field(
        default=0,
        metadata={"help": "If > 0, GSM8K accuracy of the model before and after training on this many held-out rows."},
    )
    eval_gsm8k_dataset: str = field(
        default=BUNDLED_GSM8K_NAME, metadata={"help": "GSM8K held-out data (name or path), split `test`."}
    )
    eval_max_new_tokens: int = field(default=256, metadata={"help": "Generation budget of the GSM8K probe."})
    eval_batch_size: int = field(default=16, metadata={"help": "Batch size of the GSM8K probe."})


def gsm8k_accuracy(trainer: SDFTTrainer, script_args: SDFTScriptArguments, held_out) -> float:
    model = trainer.accelerator.unwrap_model(trainer.model)
    result = evaluate_gsm8k(
        model,
        trainer.processing_class,
        held_out,
        batch_size=script_args.eval_batch_size,
        max_new_tokens=script_args.eval_max_new_tokens,
    )
    return result["accuracy"]


def main(script_args: SDFTScriptArguments, training_args: SDFTConfig, model_args: ModelConfig) -> None:
    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }
    train_dataset = load_task_dataset(
        script_args.dataset_name,
        split=script_args.dataset_train_split,
        config=script_args.dataset_config,
        max_samples=script_args.max_train_samples,
        gsm8k_style=script_args.gsm8k_style,
    )

    trainer = SDFTTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=train_dataset,
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
    )
    trainer.accelerator.print("SDFT distillation report:\n" + json.dumps(trainer.distillation_report, indent=2))

    results = {}
    if script_args.eval_gsm8k_samples > 0:
        held_out = load_task_dataset(
            script_args.eval_gsm8k_dataset,
            split=script_args.dataset_test_split,
            max_samples=script_args.eval_gsm8k_samples,
        )
        # The fresh LoRA adapter is the identity, so this is the seed model.
        results["gsm8k_accuracy_before"] = gsm8k_accuracy(trainer, script_args, held_out)

    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)

    if script_args.eval_gsm8k_samples > 0:
        results["gsm8k_accuracy_after"] = gsm8k_accuracy(trainer, script_args, held_out)
        trainer.log({f"eval/{key}": value for key, value in results.items()})
        trainer.accelerator.print(
            f"GSM8K accuracy on {len(held_out)} held-out questions: "
            f"before {results['gsm8k_accuracy_before']:.1%}, after SDFT {results['gsm8k_accuracy_after']:.1%}"
        )
    trainer.accelerator.print(
        f"Distilled dataset, report and adapter saved to {training_args.output_dir} "
        f"({trainer.distillation_report['accepted']}/{trainer.distillation_report['total']} rewrites accepted)."
    )
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    trainer.end()  # finish the trackers and destroy the process group, as TRL's scripts do


if __name__ == "__main__":
    parser = TrlParser((SDFTScriptArguments, SDFTConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config()
    main(script_args, training_args, model_args)
