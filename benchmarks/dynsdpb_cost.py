"""The CPU twin of `gpu_qlora.py`: what DynSDPB costs next to `SFTTrainer` on the same batch shapes, on this machine.

    python benchmarks/dynsdpb_cost.py                 # about 2 minutes on 2 CPU cores
    python benchmarks/dynsdpb_cost.py --bf16          # bf16 weights and bf16 autocast, as on a GPU

A small Llama with Llama-2's 32,000-token vocabulary and random weights, LoRA r 8 on q_proj and v_proj, batch 8 x 128,
float32 by default. Each trainer runs in a process of its own, so that the peak resident memory growth during training
(the CPU's stand-in for peak allocated GPU memory) is its own and not what the previous run left in the allocator.

With 2 layers of width 256 the output layer does most of the work, so the loss, where DynSDPB differs from SFT, weighs
far more here than in a 7B model. On a CPU, TRL's SFT loss also takes its Triton-less path, which scores every position
(prompt and padding included) in large float32 tiles, while DynSDPB scores the response tokens only: SFT is the slower
and heavier of the two here. These ratios describe CPU runs; `gpu_qlora.py` measures the GPU's.
It prints a table, writes JSON (`--out`) and puts the ratios to SFT on its last line.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from harness import (
    TRAINERS,
    TrainingResult,
    check_run_arguments,
    device_name,
    format_ratios,
    load_model,
    model_and_tokenizer_configs,
    print_table,
    prompt_completion_rows,
    random_state_dict,
    ratios_to,
    scratch_dir,
    train_one,
    write_json,
)
from peft import LoraConfig


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sequence-length", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--bf16", action="store_true", help="bf16 weights and `bf16=True` instead of float32")
    parser.add_argument("--out", default="benchmarks/results/dynsdpb_cost.json")
    parser.add_argument("--trainer", choices=TRAINERS, help=argparse.SUPPRESS)  # one run, in a child process
    parser.add_argument("--result", help=argparse.SUPPRESS)
    cli = parser.parse_args()
    check_run_arguments(parser, cli)
    return cli


def run_one(cli: argparse.Namespace) -> TrainingResult:
    dtype = torch.bfloat16 if cli.bf16 else torch.float32
    heads = max(1, cli.hidden_size // 64)
    config, tokenizer = model_and_tokenizer_configs(
        cli.vocab_size,
        hidden_size=cli.hidden_size,
        intermediate_size=cli.hidden_size * 8 // 3 // 32 * 32,
        num_hidden_layers=cli.layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
    )
    completion_tokens = cli.sequence_length - cli.prompt_tokens - 1  # SFT appends the EOS token
    dataset = prompt_completion_rows(8 * cli.batch_size, cli.prompt_tokens, completion_tokens, cli.vocab_size)
    workdir = scratch_dir("dynsdpb_cost-")

    args = dict(
        output_dir=f"{workdir}/{cli.trainer}",
        per_device_train_batch_size=cli.batch_size,
        max_steps=cli.steps,
        learning_rate=1e-4,
        bf16=cli.bf16,
        gradient_checkpointing=True,
        max_length=cli.sequence_length,
        logging_steps=cli.steps,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )

    model = load_model(config, random_state_dict(config, dtype), dtype)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    return train_one(cli.trainer, model, args, tokenizer, dataset, lora, cli.sequence_length, cli.batch_size)


def main() -> None:
    cli = parse_args()
    if cli.trainer:  # a child: one trainer, its result as JSON
        Path(cli.result).write_text(json.dumps(asdict(run_one(cli))))
        return
    results = []
    for name in TRAINERS:
        result_file = scratch_dir("dynsdpb_cost-result-") / "result.json"
        subprocess.run([sys.executable, *sys.argv, "--trainer", name, "--result", str(result_file)], check=True)
        results.append(TrainingResult(**json.loads(result_file.read_text())))
    sft, dynsdpb = results
    ratios = ratios_to(sft, dynsdpb)
    tokens_per_step = cli.batch_size * cli.sequence_length
    print(
        f"\nDynSDPB cost on {device_name()}, {datetime.date.today()}: hidden {cli.hidden_size} x {cli.layers} layers, "
        f"vocabulary {cli.vocab_size}, LoRA, {'bf16' if cli.bf16 else 'float32'}, batch {cli.batch_size} x "
        f"{cli.sequence_length} = {tokens_per_step} tokens/step, median of {sft.steps_timed} steps after 2 warm-up"
    )
    print_table(results)
    write_json(cli.out, {"device": device_name(), "date": str(datetime.date.today()), "arguments": vars(cli),
                         "training": results, "ratios_to_sft": {"DynSDPBTrainer": ratios}})  # fmt: skip
    print("ratios to SFTTrainer | " + format_ratios("DynSDPB", ratios))


if __name__ == "__main__":
    main()
