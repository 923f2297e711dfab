# Copyright 2026 The trl_selfdistill developers. Licensed under the Apache License, Version 2.0.
"""Self-Distillation Fine-Tuning (Yang et al., ACL 2024) with `SDFTTrainer`.

The CPU demo (bundled SmolLM2-135M-Instruct learning the bundled two-digit addition task from references written in
German, far from its own style; it prints how much closer to the model SDFT's targets are, the task's accuracy on
held-out questions before and after, and the drift: how much less likely the trained model finds the seed model's own
answers to general prompts, what it forgets):

    accelerate launch --cpu --num_processes 1 examples/sdft.py --config examples/configs/sdft_smollm2_cpu.yaml

The paper's recipe as QLoRA on one GPU (Llama-2-7b-chat, GSM8K):

    accelerate launch examples/sdft.py --config examples/configs/sdft_llama2_7b_gsm8k_qlora.yaml

Datasets: a Hub name (`--dataset_name openai/gsm8k --dataset_config main`), a local json/jsonl/csv/parquet file or
directory, `bundled/gsm8k` or `bundled/addition`. Raw `question`/`answer` columns are converted to prompt-completion.
"""

from __future__ import annotations

import json

from _common import SDFTScriptArguments, set_model_init_kwargs  # first: its warning filters
from trl import ModelConfig, TrlParser, get_peft_config, get_quantization_config

from trl_selfdistill import SDFTConfig, SDFTTrainer
from trl_selfdistill.data import load_task_dataset
from trl_selfdistill.evaluation.drift import evaluate_drift, seed_answers
from trl_selfdistill.evaluation.gsm8k import evaluate_gsm8k
from trl_selfdistill.evaluation.ifeval import evaluate_ifeval, load_ifeval


def probe(
    trainer: SDFTTrainer, script_args: SDFTScriptArguments, held_out, ifeval_rows, drift_answers
) -> dict[str, float]:
    """The task's accuracy, IFEval's prompt-level strict accuracy and the NLL of the seed model's own answers of the
    trainer's model (as far as asked)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    tokenizer, batch_size = trainer.processing_class, script_args.eval_batch_size
    scores = {}
    if held_out is not None:
        result = evaluate_gsm8k(
            model,
            tokenizer,
            held_out,
            batch_size=batch_size,
            max_new_tokens=script_args.eval_max_new_tokens,
            desc="task",
        )
        scores["task_accuracy"] = result["accuracy"]
    if ifeval_rows:
        result = evaluate_ifeval(
            model, tokenizer, ifeval_rows, batch_size=batch_size, max_new_tokens=script_args.eval_ifeval_max_new_tokens
        )
        scores["ifeval_prompt_level_strict_acc"] = result["prompt_level_strict_acc"]
    if drift_answers:
        scores["seed_answers_nll"] = evaluate_drift(model, tokenizer, drift_answers)["mean_nll"]
    return scores


def main(script_args: SDFTScriptArguments, training_args: SDFTConfig, model_args: ModelConfig) -> None:
    set_model_init_kwargs(training_args, model_args)
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

    held_out = None
    if script_args.eval_task_samples > 0:
        held_out = load_task_dataset(
            script_args.eval_task_dataset or script_args.dataset_name,
            split=script_args.dataset_test_split,
            max_samples=script_args.eval_task_samples,
        )
    ifeval_rows = load_ifeval(script_args.eval_ifeval_samples) if script_args.eval_ifeval_samples > 0 else []
    drift_answers = []
    if script_args.eval_drift_samples > 0:  # the fresh LoRA adapter is the identity: these are the seed's answers
        drift_answers = seed_answers(
            trainer.accelerator.unwrap_model(trainer.model),
            trainer.processing_class,
            load_ifeval(script_args.eval_drift_samples),
            max_new_tokens=script_args.eval_drift_max_new_tokens,
            batch_size=script_args.eval_batch_size,
        )
    # The fresh LoRA adapter is the identity, so this is the seed model.
    before = probe(trainer, script_args, held_out, ifeval_rows, drift_answers)

    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)

    report = trainer.distillation_report
    if report.get("seed_nll_reference") is not None:
        trainer.accelerator.print(
            f"Distribution gap: the seed model's NLL per token of the references {report['seed_nll_reference']:.3f}, "
            f"of what SDFT trains on {report['seed_nll_distilled']:.3f} "
            f"({report['seed_nll_reference'] - report['seed_nll_distilled']:.3f} closer to its own distribution; "
            f"{report['accepted']} of {report['total']} targets rewritten)"
        )
    if before:
        after = probe(trainer, script_args, held_out, ifeval_rows, drift_answers)
        trainer.log(
            {
                f"eval/{key}_{when}": value
                for when, scores in (("before", before), ("after", after))
                for key, value in scores.items()
            }
        )
        if held_out is not None:
            trainer.accelerator.print(
                f"Task accuracy on {len(held_out)} held-out questions (what SDFT teaches): "
                f"before {before['task_accuracy']:.1%}, after SDFT {after['task_accuracy']:.1%}"
            )
        if ifeval_rows:
            trainer.accelerator.print(
                f"IFEval prompt-level strict accuracy on {len(ifeval_rows)} prompts (what it forgets): "
                f"before {before['ifeval_prompt_level_strict_acc']:.1%}, "
                f"after SDFT {after['ifeval_prompt_level_strict_acc']:.1%}"
            )
        if drift_answers:
            trainer.accelerator.print(
                f"Drift (what it forgets): the seed model's own answers to {len(drift_answers)} IFEval prompts cost "
                f"{before['seed_answers_nll']:.3f} nats/token under the seed model and "
                f"{after['seed_answers_nll']:.3f} after SDFT: drift "
                f"{after['seed_answers_nll'] - before['seed_answers_nll']:+.3f} nats/token"
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
