"""SFT, SDFT and DynSDPB with the papers' QLoRA recipe on a Llama-2-7B-shaped model, on one GPU, in one command.

    python benchmarks/gpu_qlora.py                      # about 3 minutes on one H100; no downloads
    python benchmarks/gpu_qlora.py --preset tiny        # the same on a tiny model, to check the script on a CPU

The model has Llama-2-7B's shape (32 layers, hidden 4096, MLP 11008, 32 heads, 32,000-token vocabulary) and random
weights, built locally and quantized on load: NF4 with double quantization and bf16 compute, LoRA r 8 / alpha 16 /
dropout 0.05 on q_proj and v_proj, gradient checkpointing, `bf16=True`, lr 1e-4 cosine, batch 8 x 512 tokens. Each
trainer gets a fresh model; their median step time (after two warm-up steps), tokens/s, and peak allocated and reserved
GPU memory during training (the 4-bit weights included) are compared with `SFTTrainer`'s, measured in the same run.

SDFT's extra cost, the rewrite, has its own benchmark (`rewrite_throughput.py`). Here the rewrite only fills the cache
(`--rewrite-tokens` tokens per row), and SDFT's training steps run on the references (the benchmark's checker rejects
every rewrite), so that its batches have the same 8 x 512 shape as the others: after the rewrite, SDFT training is SFT.

Against the hardware: the training steps' model FLOP/s (6 x parameters x tokens: forward, recomputed forward and
input-gradient backward, no weight gradients for the frozen 4-bit weights) as a fraction of the GPU's dense bf16 peak,

It prints a table, writes JSON (`--out`), and puts the ratios to SFT on its last line.
"""

from __future__ import annotations

import argparse
import datetime
import time

import torch
from harness import (
    check_row_lengths,
    check_run_arguments,
    device_name,
    format_ratios,
    free_memory,
    load_model,
    measure_training,
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
from transformers import BitsAndBytesConfig

from trl_selfdistill import SDFTConfig, SDFTTrainer, distill_dataset

PRESETS = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
}
SEED = 0
# Dense bf16 tensor-core peak and memory bandwidth of the SXM parts, for the fractions of the floor.
GPU_PEAKS = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llama2-7b")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sequence-length", type=int, default=512)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--rows", type=int, default=96, help="training rows of SFT and DynSDPB")
    parser.add_argument("--rewrite-rows", type=int, default=16, help="rows SDFT rewrites and trains on")
    parser.add_argument("--rewrite-tokens", type=int, default=32, help="new tokens per rewritten row")
    parser.add_argument(
        "--loss-chunk-sizes",
        type=int,
        nargs="+",
        default=[0],
        help="DynSDPB `dynsdpb_loss_chunk_size`s to run (0: default)",
    )
    parser.add_argument("--out", default="benchmarks/results/gpu_qlora.json")
    cli = parser.parse_args()
    check_run_arguments(parser, cli)
    if cli.preset != "tiny" and not torch.cuda.is_available():
        parser.error(f"--preset {cli.preset} needs a CUDA GPU; on a CPU use --preset tiny (or dynsdpb_cost.py).")
    if not 1 <= cli.rewrite_rows <= cli.rows or cli.rows < 2 * cli.batch_size:
        parser.error("Need 1 <= --rewrite-rows <= --rows and --rows of at least twice --batch-size.")
    return cli


def reject_every_rewrite(rewrite: str, reference: str, row: dict) -> bool:
    """The benchmark's checker: SDFT trains on the references, in batches of the same shape as SFT's."""
    return False


def main() -> None:
    cli = parse_args()
    on_gpu = torch.cuda.is_available()
    config, tokenizer = model_and_tokenizer_configs(
        cli.vocab_size, max_position_embeddings=4096, **PRESETS[cli.preset]
    )
    completion_tokens = cli.sequence_length - cli.prompt_tokens - 1  # SFT appends the EOS token
    dataset = prompt_completion_rows(cli.rows, cli.prompt_tokens, completion_tokens, cli.vocab_size)
    started = time.perf_counter()
    state_dict = random_state_dict(config, torch.bfloat16)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )

    def load():
        return load_model(config, state_dict, torch.bfloat16, quantization)

    def lora():
        return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"])

    workdir = scratch_dir("gpu_qlora-")

    def args_for(name, **extra) -> dict:
        return dict(
            output_dir=str(workdir / name),
            per_device_train_batch_size=cli.batch_size,
            max_steps=cli.steps,
            learning_rate=1e-4,
            lr_scheduler_type="cosine",
            bf16=True,
            gradient_checkpointing=True,
            max_length=cli.sequence_length,
            logging_steps=cli.steps,
            report_to=[],
            save_strategy="no",
            disable_tqdm=True,
            use_cpu=not on_gpu,
            seed=SEED,
            **extra,
        )

    runs = [("SFTTrainer", None)] + [("DynSDPBTrainer", size or None) for size in cli.loss_chunk_sizes]
    training = []
    for name, chunk_size in runs:  # each on a freshly loaded model, same data and arguments
        label = f"{name} (loss chunk {chunk_size})" if chunk_size else name
        args = args_for(name, **({"dynsdpb_loss_chunk_size": chunk_size} if chunk_size else {}))
        training.append(
            train_one(name, load(), args, tokenizer, dataset, lora(), cli.sequence_length, cli.batch_size, label)
        )
        free_memory()
    sdft = measure_sdft(cli, load, tokenizer, dataset, args_for, lora, workdir)
    training.append(sdft)

    device = device_name()
    peak_flops = next((v for k, v in GPU_PEAKS.items() if k in device), (None, None))[0]
    tokens_per_step = cli.batch_size * cli.sequence_length
    parameters = sum(p.numel() for p in state_dict.values())
    for result in training:
        flops = 6 * parameters * result.tokens_per_s
        result.extra["model_TFLOP/s"] = round(flops / 1e12, 1)
        if peak_flops:
            result.extra["of_bf16_peak"] = f"{flops / peak_flops:.0%}"
    print(
        f"\n{cli.preset} QLoRA on {device}, {datetime.date.today()}: batch {cli.batch_size} x {cli.sequence_length} = "
        f"{tokens_per_step} tokens/step, median of {training[0].steps_timed} steps after 2 warm-up steps"
    )
    print_table(training)
    sft = training[0]
    ratios = {result.trainer: ratios_to(sft, result) for result in training[1:]}
    write_json(
        cli.out,
        {
            "device": device,
            "date": str(datetime.date.today()),
            "preset": cli.preset,
            "arguments": vars(cli),
            "wall_seconds": round(time.perf_counter() - started, 1),
            "training": training,
            "ratios_to_sft": ratios,
        },
    )
    trainer_ratios = [format_ratios(r.trainer.replace("Trainer", ""), ratios[r.trainer]) for r in training[1:]]
    print("ratios to SFTTrainer | " + " | ".join(trainer_ratios))


def measure_sdft(cli, load, tokenizer, dataset, args_for, lora, workdir):
    """SDFT's training steps, after a rewrite (not timed here) that fills the cache."""
    rows = dataset.select(range(cli.rewrite_rows))
    decoding = {"max_new_tokens": cli.rewrite_tokens, "min_new_tokens": cli.rewrite_tokens}
    model = load()
    distill_dataset(
        model, tokenizer, rows, template="general", generation_kwargs=decoding, seed=SEED,
        cache_dir=workdir / "cache", show_progress=False,
    )  # fmt: skip

    # The trainer finds every rewrite in the cache (same model, prompts, decoding and seed): only training is timed.
    args = SDFTConfig(
        **args_for("SDFTTrainer"),
        sdft_template="general",
        sdft_generation_kwargs=decoding,
        sdft_cache_dir=str(workdir / "cache"),
        sdft_checker=reject_every_rewrite,
    )
    trainer = SDFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer, peft_config=lora())
    assert trainer.distillation_report["from_cache"] == cli.rewrite_rows, trainer.distillation_report
    check_row_lengths(trainer.train_dataset, cli.sequence_length)
    result = measure_training("SDFTTrainer", trainer, cli.batch_size * cli.sequence_length)
    del trainer, model
    free_memory()
    return result


if __name__ == "__main__":
    main()
