# Copyright 2026 The trl_selfdistill developers. Licensed under the Apache License, Version 2.0.
"""The SDFT rewrite alone: write the distilled dataset and its report, without training.

For people who rewrite on one cluster (say, next to a vLLM server) and train on another. The output directory gets
`distilled_dataset.jsonl`, `distillation_report.json` and the per-row audit trail `distillation_rows.jsonl`, the same
files `SDFTTrainer` writes; train on them with
`SFTTrainer` (or with `SDFTTrainer` and the same cache, which then finds every rewrite done).

    # on a vLLM server that serves the seed model (no weights are loaded here, only the tokenizer)
    python examples/distill_dataset.py --config examples/configs/sdft_llama2_7b_gsm8k_qlora.yaml \\
        --sdft_engine server --sdft_server_url http://localhost:8000 --output_dir distilled
    # in process, on the bundled model and data
    python examples/distill_dataset.py --config examples/configs/sdft_smollm2_cpu.yaml --output_dir distilled

Every `SDFTConfig` field applies (template, checker, decoding, engine, cache); training fields are ignored.
"""

from __future__ import annotations

import json

from _common import SDFTScriptArguments  # the training script's arguments (and the warning filters)
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import ModelConfig, TrlParser, get_quantization_config

from trl_selfdistill import SDFTConfig, distill_dataset
from trl_selfdistill.data import load_task_dataset
from trl_selfdistill.models import resolve_model_name
from trl_selfdistill.sdft.outputs import save_distillation
from trl_selfdistill.sdft.rewrite import engine_from_config


def main(script_args: SDFTScriptArguments, args: SDFTConfig, model_args: ModelConfig) -> None:
    name = resolve_model_name(model_args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(name, revision=model_args.model_revision)
    dataset = load_task_dataset(
        script_args.dataset_name,
        split=script_args.dataset_train_split,
        config=script_args.dataset_config,
        max_samples=script_args.max_train_samples,
    )
    model = name  # the server engine needs only the name
    if args.sdft_engine == "transformers":
        model = AutoModelForCausalLM.from_pretrained(
            name, revision=model_args.model_revision, dtype=model_args.dtype or "auto",
            quantization_config=get_quantization_config(model_args), device_map="auto",
        )  # fmt: skip
    result = distill_dataset(
        model, tokenizer, dataset, args.sdft_spec, engine=engine_from_config(args, model, tokenizer),
        seed=args.seed, cache_dir=args.sdft_cache_dir, show_progress=not args.disable_tqdm,
    )  # fmt: skip
    save_distillation(args.output_dir, result.dataset, result.report, result.rows)
    print(json.dumps(result.report, indent=2, default=str))
    print(f"Distilled dataset, report and per-row audit trail written to {args.output_dir}.")


if __name__ == "__main__":
    parser = TrlParser((SDFTScriptArguments, SDFTConfig, ModelConfig))
    main(*parser.parse_args_and_config())
