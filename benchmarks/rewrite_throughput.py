"""The SDFT rewrite's speed, lever by lever, as ratios to a one-row `generate` loop measured in the same run.

    python benchmarks/rewrite_throughput.py                      # CPU: the bundled model on bundled GSM8K rows
    python benchmarks/rewrite_throughput.py --preset llama2-7b   # GPU: the 7B-shaped QLoRA model of gpu_qlora.py
    python benchmarks/rewrite_throughput.py --preset tiny        # the GPU path on a tiny model, to check it on a CPU

On a CPU the bundled SmolLM2-135M-Instruct rewrites bundled GSM8K training rows with the math template and greedy
decoding, so every engine must produce the one-row loop's text; the table says how many of the compared rows match.
On a GPU the model has Llama-2-7B's shape with random weights, quantized on load (NF4, bf16 compute) as QLoRA trains
it, and every row gets exactly `--new-tokens` tokens with the paper's sampling (random weights never stop early).

Arms (each a `GenerationEngine`, timed on the same prompts; the one-row loop on a subset spread over the lengths):
- one-row loop: `generate` on one prompt at a time, dynamic cache (the floor every batching lever is measured from);
- batch 16, dynamic cache: SDFTTrainer's previous default;
- SDFTTrainer's default: `sdft_batch_size=None` (sized from free memory), length-sorted, static KV cache on a GPU,
  dynamic on a CPU;
- the same with the other kind of cache, to measure that lever alone;
- continuous batching: transformers' `generate_batch`, where finished rows stop costing compute;
- on a GPU, the unquantized bf16 seed weights (`sdft_unquantized_seed=True`), with the static cache compiled
  (`sdft_compile=True`: its first run, then once compiled) and with a dynamic cache.

Tokens/s counts generated tokens; against the hardware, a GPU arm's rate is also given as a fraction of the decode
floor (each step reads the weights once and the KV cache of the whole batch). It prints a table, writes JSON, and
puts the ratios on its last line.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from harness import device_name, free_memory, load_model, model_and_tokenizer_configs, random_state_dict, synchronize
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, GenerationConfig

from trl_selfdistill.data import bundled_gsm8k, gsm8k_to_prompt_completion
from trl_selfdistill.generation import TransformersEngine
from trl_selfdistill.generation.local import _kv_cache_bytes_per_token
from trl_selfdistill.models import bundled_model_path
from trl_selfdistill.sdft.spec import DistillSpec
from trl_selfdistill.sdft.targets import collect_targets

RANDOM_PRESETS = {  # random weights, quantized on load, exactly --new-tokens per row
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
}
GPU_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}  # bytes/s of the SXM parts
PREVIOUS_DEFAULT_BATCH = 16


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=["bundled", *RANDOM_PRESETS], default="bundled")
    parser.add_argument("--rows", type=int, default=None, help="rows rewritten by the batched arms")
    parser.add_argument("--one-row-rows", type=int, default=None, help="rows of the one-row loop (a spread subset)")
    parser.add_argument("--new-tokens", type=int, default=None, help="max new tokens (exactly this many on a GPU)")
    parser.add_argument("--skip", nargs="*", default=[], help="arms to leave out, by key")
    parser.add_argument("--out", default=None, help="JSON results (default benchmarks/results/rewrite_<preset>.json)")
    cli = parser.parse_args()
    gpu = cli.preset in RANDOM_PRESETS
    if cli.preset == "llama2-7b" and not torch.cuda.is_available():
        parser.error("--preset llama2-7b needs a CUDA GPU; on a CPU use the default --preset bundled.")
    cli.rows = cli.rows or (512 if gpu else 64)
    cli.one_row_rows = cli.one_row_rows or (4 if gpu else 8)
    cli.new_tokens = cli.new_tokens or 128
    if not 1 <= cli.one_row_rows <= cli.rows or cli.new_tokens < 1:
        parser.error("Need 1 <= --one-row-rows <= --rows and --new-tokens >= 1.")
    cli.out = cli.out or f"benchmarks/results/rewrite_{cli.preset}.json"
    return cli


def continuous_batching(model, tokenizer, prompts: list[str], decoding: dict) -> list[str]:
    """transformers' `generate_batch`: a paged KV cache, rows join and leave the running batch as they finish."""
    token_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    config = GenerationConfig(**decoding, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    outputs = model.generate_batch(inputs=token_ids, generation_config=config)  # it manages its own grad mode
    ordered = list(outputs.values())  # in input order
    failed = [o.error for o in ordered if o.error is not None]
    if failed or len(ordered) != len(prompts):
        raise RuntimeError(f"{len(prompts) - len(ordered) + len(failed)} requests failed: {failed[:1]}")
    return [tokenizer.decode(o.generated_tokens, skip_special_tokens=True).strip() for o in ordered]


def engine_arm(engine: TransformersEngine) -> Callable[[list[str], dict], list[str]]:
    def run(prompts: list[str], decoding: dict) -> list[str]:
        texts = [""] * len(prompts)
        for group in engine.generate(prompts, decoding, seeds=list(range(len(prompts)))):
            for completion in group:
                texts[completion.index] = completion.text
        return texts

    return run


def measure(label: str, run, prompts: list[str], decoding: dict, count_tokens) -> dict:
    print(f"[{time.strftime('%H:%M:%S')}] {label}: {len(prompts)} rows ...", flush=True)
    synchronize()
    started = time.perf_counter()
    try:
        texts = run(prompts, decoding)
    except Exception as error:  # a lever that does not work here is reported, not fatal
        print(f"  failed: {type(error).__name__}: {error}", flush=True)
        return {"arm": label, "error": f"{type(error).__name__}: {str(error)[:300]}"}
    synchronize()
    seconds = time.perf_counter() - started
    tokens = count_tokens(texts)
    print(f"  {seconds:.1f} s, {tokens / seconds:,.1f} tokens/s", flush=True)
    rate = tokens / seconds
    return {"arm": label, "rows": len(prompts), "seconds": seconds, "new_tokens": tokens, "tokens_per_s": rate,
            "texts": texts}  # fmt: skip


def describe(engine: TransformersEngine) -> str:
    return f"auto batch, {'static' if engine.static_cache else 'dynamic'} cache"


def spread(order: list[int], count: int) -> list[int]:
    """`count` rows spread evenly over a length-sorted order."""
    return [order[round(i * (len(order) - 1) / max(count - 1, 1))] for i in range(count)]


def main() -> None:
    cli = parse_args()
    gpu = cli.preset in RANDOM_PRESETS  # the GPU path (also on a CPU with the tiny preset)
    started = time.perf_counter()
    if gpu:
        shape = RANDOM_PRESETS[cli.preset]
        config, tokenizer = model_and_tokenizer_configs(32000, max_position_embeddings=4096, **shape)
        rows = [{"prompt": " ".join(f"w{(7 * i + j) % 31000 + 4}" for j in range(64)),
                 "completion": " " + " ".join(f"w{(11 * i + j) % 31000 + 4}" for j in range(64))}
                for i in range(cli.rows)]  # fmt: skip
        from datasets import Dataset

        dataset = Dataset.from_list(rows)
        spec = DistillSpec.create("general", generation_kwargs={"max_new_tokens": cli.new_tokens,
                                                                "min_new_tokens": cli.new_tokens})  # fmt: skip
        state_dict = random_state_dict(config, torch.bfloat16)
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )  # fmt: skip
        model = load_model(config, state_dict, torch.bfloat16, quantization)
    else:
        path = bundled_model_path()
        model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
        dataset = gsm8k_to_prompt_completion(bundled_gsm8k("train", n=cli.rows))
        spec = DistillSpec.create("gsm8k", checker="math", generation_kwargs={"do_sample": False, "temperature": None,
                                  "top_p": None, "top_k": None, "max_new_tokens": cli.new_tokens})  # fmt: skip
    decoding = dict(spec.decoding)
    prompts = [spec.render(t.instruction, t.reference, tokenizer) for t in collect_targets(dataset)]
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    subset = spread(sorted(range(len(prompts)), key=lambda i: -lengths[i]), cli.one_row_rows)

    def count_tokens(texts: list[str]) -> int:
        if gpu:  # every row is exactly --new-tokens long
            return len(texts) * cli.new_tokens
        return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])

    default = TransformersEngine(
        model, tokenizer
    )  # sdft_batch_size=None (batch_size='auto'), static cache on a GPU only
    other_cache = TransformersEngine(model, tokenizer, static_cache=not default.static_cache)  # that lever alone
    arms = {
        "one_row": ("one-row loop", TransformersEngine(model, tokenizer, 1, static_cache=False), subset),
        "previous_default": (
            f"batch {PREVIOUS_DEFAULT_BATCH}, dynamic cache (previous default)",
            TransformersEngine(model, tokenizer, PREVIOUS_DEFAULT_BATCH, static_cache=False),
            list(range(min(len(prompts), 32 if gpu else len(prompts)))),
        ),
        "default": (f"SDFTTrainer default ({describe(default)})", default, None),
        "other_cache": (f"{describe(other_cache)}", other_cache, None),
    }
    # Not timed: CUDA context, kernel selection, bitsandbytes' first calls.
    warm_up = {**decoding, "max_new_tokens": 2, "min_new_tokens": 0}
    engine_arm(TransformersEngine(model, tokenizer, 2))(prompts[:2], warm_up)
    results = {}
    for key, (label, engine, rows) in arms.items():
        if key in cli.skip:
            continue
        rows = rows if rows is not None else list(range(len(prompts)))
        results[key] = measure(label, engine_arm(engine), [prompts[i] for i in rows], decoding, count_tokens)
        results[key]["row_indices"] = rows
        free_memory()
    if "continuous" not in cli.skip:
        rows = list(range(min(len(prompts), 128 if gpu else len(prompts))))
        results["continuous"] = measure(
            "continuous batching (generate_batch)" + (", 4-bit" if gpu else ""),
            lambda p, d: continuous_batching(model, tokenizer, p, d), [prompts[i] for i in rows], decoding,
            count_tokens,
        )  # fmt: skip
        results["continuous"]["row_indices"] = rows
        free_memory()
    if gpu and "unquantized" not in cli.skip:
        unquantized = load_model(config, state_dict, torch.bfloat16)
        for key, label, static in (
            ("unquantized_compiling", "bf16 seed weights, auto batch, static cache, first run (compiles)", True),
            ("unquantized", "bf16 seed weights, auto batch, static cache, compiled", True),
            ("unquantized_dynamic", "bf16 seed weights, auto batch, dynamic cache", False),
        ):
            engine = TransformersEngine(unquantized, tokenizer, static_cache=static, compile=static)
            results[key] = measure(label, engine_arm(engine), prompts, decoding, count_tokens)
            results[key]["row_indices"] = list(range(len(prompts)))
            free_memory()

    report(cli, results, model, prompts, lengths, subset, gpu, time.perf_counter() - started)


def report(cli, results: dict, model, prompts, lengths, subset, gpu: bool, wall: float) -> None:
    device = device_name()
    one_row = results.get("one_row", {})
    reference = dict(zip(one_row.get("row_indices", []), one_row.get("texts", []), strict=True))
    print(f"\nSDFT rewrite on {device}, {datetime.date.today()}: {cli.preset}, {len(prompts)} prompts of "
          f"{min(lengths)}-{max(lengths)} tokens, {'exactly' if gpu else 'at most'} {cli.new_tokens} new tokens, "
          f"{'paper sampling' if gpu else 'greedy'}; one-row loop on {len(subset)} rows")  # fmt: skip
    print("| engine | rows | tokens/s | x one-row loop | same text as one-row |")
    print("|---|---|---|---|---|")
    for result in results.values():
        if "error" in result:
            print(f"| {result['arm']} | - | failed: {result['error'][:80]} | - | - |")
            continue
        by_row = dict(zip(result["row_indices"], result["texts"], strict=True))
        same = [by_row[i] == text for i, text in reference.items() if i in by_row]
        result["same_text_as_one_row"] = f"{sum(same)}/{len(same)}" if same and not gpu else "n/a (sampled)"
        result["x_one_row"] = result["tokens_per_s"] / one_row["tokens_per_s"] if one_row.get("tokens_per_s") else None
        ratio = f"{result['x_one_row']:.1f}x" if result["x_one_row"] else "-"
        print(f"| {result['arm']} | {result['rows']} | {result['tokens_per_s']:,.1f} | {ratio} | "
              f"{result['same_text_as_one_row']} |")  # fmt: skip
    bandwidth = next((v for k, v in GPU_BANDWIDTH.items() if k in device), None)
    if bandwidth and "default" in results and "error" not in results["default"]:
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        kv_per_row = (sum(lengths) / len(lengths) + cli.new_tokens / 2) * _kv_cache_bytes_per_token(model)
        rows_per_step = min(len(prompts), 512)
        floor = rows_per_step * bandwidth / (weights + rows_per_step * kv_per_row)
        results["default"]["of_decode_floor"] = results["default"]["tokens_per_s"] / floor
        print(f"\nDecode floor at batch {rows_per_step} (4-bit weights + KV cache read once per step): "
              f"{floor:,.0f} tokens/s; the default reaches {results['default']['of_decode_floor']:.1%}")  # fmt: skip

    out = Path(cli.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {k: {f: v for f, v in r.items() if f not in ("texts", "row_indices")} for k, r in results.items()}
    out.write_text(json.dumps({"device": device, "date": str(datetime.date.today()), "arguments": vars(cli),
                               "wall_seconds": round(wall, 1), "arms": summary}, indent=2) + "\n")  # fmt: skip
    print(f"wrote {out}")
    default, previous = results.get("default", {}), results.get("previous_default", {})
    ratios = [f"default {default.get('x_one_row') or 0:.1f}x the one-row loop"]
    if previous.get("tokens_per_s") and default.get("tokens_per_s"):
        ratios.append(f"{default['tokens_per_s'] / previous['tokens_per_s']:.1f}x the previous default")
    if not gpu:
        ratios.append(f"same text as the one-row loop on {default.get('same_text_as_one_row', '-')} rows")
    print("ratios | " + " | ".join(ratios))


if __name__ == "__main__":
    main()
