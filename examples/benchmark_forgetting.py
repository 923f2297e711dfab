# Copyright 2026 The trl_selfdistill developers. Licensed under the Apache License, Version 2.0.
"""The forgetting benchmark: one seed model fine-tuned on one task several ways and seeds, every result probed.

Arms: vanilla SFT, SDFT, DynSDPB (dynamic and constant), and SDFT's distilled data trained with DynSDPB's loss; all
with the same data, optimizer updates and LoRA, each trained once per seed. Probes: the task (GSM8K or the bundled
addition task), IFEval (scored by lm-eval's own code), HumanEval pass@1 (code run in a sandbox), the AdvBench safe rate
(raw and jailbroken), and the similarity of general answers to the seed model's (all-MiniLM-L6-v2). Every score is
reported as the mean over seeds with its 95% confidence interval, and each arm's difference from vanilla SFT paired
on the same probe items. Writes forgetting_benchmark.{md,json} and chart_<probe>.png into `output_dir`.

The default on the bundled model (SFT, SDFT and DynSDPB x 3 seeds; about 30 minutes on 2 CPU cores):

    python examples/benchmark_forgetting.py --config examples/configs/benchmark_forgetting_smollm2_cpu.yaml

The paper's scale on one GPU (Llama-2-7b-chat QLoRA, full GSM8K train, full probe sets):

    python examples/benchmark_forgetting.py --config examples/configs/benchmark_forgetting_llama2_7b_qlora.yaml

A rerun with the same `output_dir` reuses a finished arm, and a probe result, only when everything that produced it
is unchanged (training settings, adapter weights, probe settings): an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from _common import set_model_init_kwargs  # first: its warning filters
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config

from trl_selfdistill import SDFTDynSDPBConfig
from trl_selfdistill.data import load_task_dataset
from trl_selfdistill.evaluation.arms import ARMS, DEFAULT_ARMS, register_variants
from trl_selfdistill.evaluation.benchmark import run_forgetting_benchmark
from trl_selfdistill.evaluation.probes import ProbeArguments
from trl_selfdistill.evaluation.report import REPORT_JSON, REPORT_MARKDOWN


@dataclass
class BenchmarkScriptArguments(ScriptArguments):
    arms: list[str] = field(
        default_factory=lambda: list(DEFAULT_ARMS),
        metadata={
            "help": f"Arms to train and compare with the seed model: {', '.join(ARMS)} (default: "
            f"{', '.join(DEFAULT_ARMS)}; the own-answer arms need a `sdft_checker`)."
        },
    )
    seeds: list[int] | None = field(
        default=None,
        metadata={"help": "Training seeds: every arm is trained once per seed (default: `seed` alone)."},
    )
    seeds_per_arm: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Arms trained on fewer seeds, as a dict or JSON {arm: n}: the first n of `seeds`."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N training rows (quick runs and demos)."}
    )
    gsm8k_style: str = field(
        default="raw",
        metadata={"help": "Raw GSM8K answers: `raw` (as on the Hub) or `official` (the SDFT code's preparation)."},
    )
    arm_variants: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Arms defined as variants of others, as a dict or JSON: {name: {of: arm, label: text, overrides: "
            "{config field: value}}}, e.g. SDFT with another checker; name them in `arms`."
        },
    )
    native_dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "The same questions with the references in the seed model's own style, for the `sft_native` arm "
            "(e.g. `bundled/addition` beside `--dataset_name bundled/addition-german`)."
        },
    )


def _json(value: dict | str | None) -> dict:
    """A dict option as YAML gives it, or as JSON text from the command line."""
    return json.loads(value) if isinstance(value, str) else dict(value or {})


def main(
    script_args: BenchmarkScriptArguments,
    probe_args: ProbeArguments,
    training_args: SDFTDynSDPBConfig,
    model_args: ModelConfig,
) -> None:
    set_model_init_kwargs(training_args, model_args)
    register_variants(_json(script_args.arm_variants))
    train_dataset = load_task_dataset(
        script_args.dataset_name,
        split=script_args.dataset_train_split,
        config=script_args.dataset_config,
        max_samples=script_args.max_train_samples,
        gsm8k_style=script_args.gsm8k_style,
    )
    native_dataset = None
    if script_args.native_dataset_name is not None:
        native_dataset = load_task_dataset(
            script_args.native_dataset_name,
            split=script_args.dataset_train_split,
            config=script_args.dataset_config,
            max_samples=script_args.max_train_samples,
            gsm8k_style=script_args.gsm8k_style,
        )
    report = run_forgetting_benchmark(
        model_args.model_name_or_path,
        training_args,
        train_dataset,
        probe_args,
        script_args.arms,
        seeds=script_args.seeds,
        seeds_per_arm=_json(script_args.seeds_per_arm),
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
        dataset_name=script_args.dataset_name,
        native_dataset=native_dataset,
    )
    with open(f"{training_args.output_dir}/{REPORT_MARKDOWN}", encoding="utf-8") as handle:
        print(handle.read())
    print(f"Report, JSON ({REPORT_JSON}) and charts written to {training_args.output_dir}.")
    return report


if __name__ == "__main__":
    parser = TrlParser((BenchmarkScriptArguments, ProbeArguments, SDFTDynSDPBConfig, ModelConfig))
    main(*parser.parse_args_and_config())
