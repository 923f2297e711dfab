"""What makes the forgetting probes faster on a CPU: the probes' generation in float32 against bfloat16 weights.

    python benchmarks/probe_speed.py                      # the bundled model, about 2 minutes on 2 CPU cores

Generation dominates the benchmark's cost. Both runs answer the same prompts greedily (the addition task's held-out
questions and the general prompts, as the probes render them) with the same batch size, one after the other in this
process; the float32 run is the baseline. It prints tokens/s for each, the ratio, and how often the two dtypes give the
same answer and the same task score: bfloat16 changes some greedy answers, so a benchmark probes every model in one
dtype (`eval_dtype`). On a CPU without bfloat16 matrix instructions (AMX or AVX-512 BF16) bfloat16 is slower, which
is why `eval_dtype: auto` keeps the trained dtype there. The last line holds the ratio.
"""

from __future__ import annotations

import argparse
import datetime
import time

import torch
from harness import write_json
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_selfdistill import BUNDLED_MODEL_NAME, resolve_model_name
from trl_selfdistill.evaluation.answers import chat_prompt, greedy_answers
from trl_selfdistill.evaluation.gsm8k import GSM8K_SYSTEM_PROMPT, score_gsm8k_answer
from trl_selfdistill.evaluation.probes import cpu_has_bf16_matmul, load_addition_test
from trl_selfdistill.evaluation.similarity import load_general_prompts


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=BUNDLED_MODEL_NAME)
    parser.add_argument("--rows", type=int, default=40, help="addition questions and general prompts, each")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=40)
    parser.add_argument("--out", default="benchmarks/results/probe_speed_cpu.json")
    cli = parser.parse_args()
    if cli.rows < 1 or cli.max_new_tokens < 1 or cli.batch_size < 1:
        parser.error("--rows, --max-new-tokens and --batch-size must be at least 1")
    return cli


def generate(model, tokenizer, prompts: list[str], cli) -> tuple[list[str], float, int]:
    """Greedy answers, seconds taken and new tokens generated."""
    started = time.perf_counter()
    answers = greedy_answers(
        model, tokenizer, prompts, max_new_tokens=cli.max_new_tokens, batch_size=cli.batch_size, show_progress=False
    )
    seconds = time.perf_counter() - started
    tokens = sum(len(tokenizer(answer, add_special_tokens=False).input_ids) for answer in answers)
    return answers, seconds, tokens


def main() -> None:
    cli = parse_args()
    path = resolve_model_name(cli.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    questions = load_addition_test(cli.rows)
    prompts = [chat_prompt(tokenizer, row["question"], GSM8K_SYSTEM_PROMPT) for row in questions]
    prompts += [chat_prompt(tokenizer, prompt) for prompt in load_general_prompts(cli.rows)]
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        answers, seconds, tokens = generate(model, tokenizer, prompts, cli)
        task = [score_gsm8k_answer(answer, row["answer"]) for answer, row in zip(answers, questions, strict=False)]
        runs[str(dtype)] = {
            "seconds": seconds,
            "tokens": tokens,
            "tokens_per_s": tokens / seconds,
            "task_accuracy": sum(task) / len(task),
            "answers": answers,
        }
        print(f"{str(dtype):15s} {seconds:7.1f} s  {tokens / seconds:7.1f} tokens/s  task {sum(task)}/{len(task)}")
    fp32, bf16 = runs["torch.float32"], runs["torch.bfloat16"]
    same = sum(a == b for a, b in zip(fp32["answers"], bf16["answers"], strict=True))
    ratio = bf16["tokens_per_s"] / fp32["tokens_per_s"]
    print(f"bfloat16 matrix instructions on this CPU: {cpu_has_bf16_matmul()}")
    print(f"same answer in both dtypes: {same}/{len(prompts)}")
    write_json(
        cli.out,
        {
            "date": datetime.date.today().isoformat(),
            "model": cli.model,
            "cpu_bf16_matmul": cpu_has_bf16_matmul(),
            "threads": torch.get_num_threads(),
            "prompts": len(prompts),
            "max_new_tokens": cli.max_new_tokens,
            "batch_size": cli.batch_size,
            "same_answers": same,
            "bf16_over_fp32_tokens_per_s": ratio,
            "runs": {name: {k: v for k, v in run.items() if k != "answers"} for name, run in runs.items()},
        },
    )
    print(f"ratios | bfloat16: {ratio:.2f}x float32's tokens/s")


if __name__ == "__main__":
    main()
