"""How busy the rewrite keeps a vLLM server: tokens/s against a plain client's ceiling, measured in the same run.

    python benchmarks/server_saturation.py                       # starts vLLM (tools/vllm_env.sh) on the bundled model
    python benchmarks/server_saturation.py --server_url http://localhost:8000 --served_model seed --model <dir>

The bundled SmolLM2-135M-Instruct rewrites bundled GSM8K training rows with the math template and greedy decoding, so
rows end at varied lengths (an answer of a few dozen tokens, or cut at `--max_new_tokens`) and every arm generates
the same text. Arms, all on the same prompts at the same concurrency, in alternating order over `--repeats` rounds:

- ceiling: a plain client that only keeps `concurrency` requests in flight (a thread pool over the prompts), with no
  cache, claims or answer checks: the most this server gives this client at this concurrency;
- blocks (before): the previous rewrite loop, which handed the engine one block of `concurrency` rows at a time and
  waited for the block's slowest row before starting the next;
- distill_dataset (after): the whole rewrite, claims, cache and answer checks included, which takes the next block
  as soon as a request slot is free.

Prints tokens/s per arm (the median round), distill_dataset's ratio to blocks and its fraction of the ceiling (goal:
at least 0.9), and writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from transformers import AutoTokenizer

from trl_selfdistill import distill_dataset
from trl_selfdistill.data import bundled_gsm8k, gsm8k_to_prompt_completion
from trl_selfdistill.generation import ServerEngine
from trl_selfdistill.generation.server import completion_fields
from trl_selfdistill.generation.vllm_server import VLLMServer
from trl_selfdistill.models import bundled_model_path
from trl_selfdistill.sdft.spec import DistillSpec
from trl_selfdistill.sdft.targets import collect_targets

SERVED_NAME = "seed"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2, help="rounds; each runs every arm once")
    parser.add_argument(
        "--vllm_python", default=os.environ.get("TRL_SELFDISTILL_VLLM_PYTHON", ".venv-vllm/bin/python")
    )
    parser.add_argument("--server_url", default=None, help="a running server instead of starting vLLM here")
    parser.add_argument("--served_model", default=SERVED_NAME, help="the model id on --server_url")
    parser.add_argument("--model", default=None, help="the seed model's directory (default: the bundled model)")
    parser.add_argument("--out", default="benchmarks/results/server_saturation_cpu.json")
    cli = parser.parse_args()
    if cli.rows < 1 or cli.concurrency < 1 or cli.max_new_tokens < 1 or cli.repeats < 1:
        parser.error("--rows, --concurrency, --max_new_tokens and --repeats must be at least 1.")
    return cli


def ceiling(url: str, model: str, prompts: list[str], fields: dict, concurrency: int) -> list[str]:
    """A plain client: `concurrency` requests in flight until every prompt is answered, nothing else."""

    def complete(prompt: str) -> str:
        body = json.dumps({"model": model, "prompt": prompt, **fields}).encode()
        request = urllib.request.Request(
            f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=600) as response:
            return json.loads(response.read())["choices"][0]["text"].strip()

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(complete, prompts))


def blocks(engine: ServerEngine, prompts: list[str], decoding: dict) -> list[str]:
    """The previous loop: one block of `concurrency` rows at a time, each drained before the next starts."""
    texts = [""] * len(prompts)
    size = engine.concurrency
    for start in range(0, len(prompts), size):
        block = list(range(start, min(start + size, len(prompts))))
        for group in engine.generate([prompts[i] for i in block], decoding, seeds=[0] * len(block)):
            for completion in group:
                texts[block[completion.index]] = completion.text
    return texts


def main() -> None:
    cli = parse_args()
    model_dir = cli.model or bundled_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset = gsm8k_to_prompt_completion(bundled_gsm8k("train", n=cli.rows))
    greedy = {"do_sample": False, "max_new_tokens": cli.max_new_tokens}
    spec = DistillSpec.create("gsm8k", checker="math", generation_kwargs=greedy)
    # The prompts distill_dataset sends, longest first as it deals them, so the blocks are its blocks.
    prompts = [spec.render(t.instruction, t.reference, tokenizer) for t in collect_targets(dataset)]
    prompts.sort(key=lambda prompt: -len(tokenizer(prompt, add_special_tokens=False)["input_ids"]))
    fields = completion_fields(spec.decoding)

    server = None
    if cli.server_url is None:
        # No prefix caching: each arm sends the same prompts, and a cache warmed by the arms before would favour those
        # after (real rewrite prompts are all different).
        arguments = ["--dtype", "float32", "--max-model-len", "2048", "--enforce-eager", "--no-enable-prefix-caching"]
        server = VLLMServer(model_dir, python=cli.vllm_python, served_model_name=SERVED_NAME, arguments=arguments,
                            env={"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_NO_USAGE_STATS": "1"},
                            log_path=Path(tempfile.mkdtemp()) / "vllm.log")  # fmt: skip
        print(f"[{time.strftime('%H:%M:%S')}] starting vLLM ({server.log_path}) ...", flush=True)
        server.start()
    url, model = (server.url, SERVED_NAME) if server else (cli.server_url.rstrip("/"), cli.served_model)
    engine = ServerEngine(url, model, tokenizer, concurrency=cli.concurrency)

    def run_distill() -> list[str]:
        with tempfile.TemporaryDirectory() as cache:  # a fresh cache: every row is generated
            result = distill_dataset(None, tokenizer, dataset, spec, engine=engine, cache_dir=cache,
                                     show_progress=False)  # fmt: skip
        return [row["rewrite"] for row in result.rows]

    arms = {
        "ceiling": lambda: ceiling(url, model, prompts, fields, cli.concurrency),
        "blocks": lambda: blocks(engine, prompts, spec.decoding),
        "distill_dataset": run_distill,
    }
    rates: dict[str, list[float]] = {name: [] for name in arms}
    try:
        ceiling(url, model, prompts[: cli.concurrency], fields, cli.concurrency)  # warm-up, not timed
        for round_index in range(cli.repeats):
            order = list(arms) if round_index % 2 == 0 else list(reversed(arms))
            for name in order:
                started = time.perf_counter()
                texts = arms[name]()
                seconds = time.perf_counter() - started
                lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
                tokens = sum(lengths)
                rates[name].append(tokens / seconds)
                print(f"[{time.strftime('%H:%M:%S')}] round {round_index + 1} {name}: {tokens} tokens in "
                      f"{seconds:.1f} s, {tokens / seconds:.1f} tokens/s", flush=True)  # fmt: skip
    finally:
        if server is not None:
            server.stop()

    quartiles = statistics.quantiles(lengths, n=4)
    print(f"\nnew tokens per row: min {min(lengths)}, quartiles {quartiles}, max {max(lengths)}")
    median = {name: statistics.median(values) for name, values in rates.items()}
    summary = {
        "distill_dataset_vs_blocks": median["distill_dataset"] / median["blocks"],
        "blocks_fraction_of_ceiling": median["blocks"] / median["ceiling"],
        "distill_dataset_fraction_of_ceiling": median["distill_dataset"] / median["ceiling"],
    }
    print(f"\n{'arm':<18}{'tokens/s (median)':>20}  rounds")
    for name in arms:
        print(f"{name:<18}{median[name]:>20.1f}  {', '.join(f'{r:.1f}' for r in rates[name])}")
    print(f"\ndistill_dataset / blocks: {summary['distill_dataset_vs_blocks']:.2f}x; fraction of the ceiling: "
          f"blocks {summary['blocks_fraction_of_ceiling']:.2f}, distill_dataset "
          f"{summary['distill_dataset_fraction_of_ceiling']:.2f} (goal >= 0.90)")  # fmt: skip
    record = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "server": "vLLM (vllm-cpu 0.32, --enforce-eager, float32, no prefix caching)" if server else url,
        "settings": {k: v for k, v in vars(cli).items() if k not in ("out", "vllm_python")},
        "new_tokens_per_row": {"min": min(lengths), "quartiles": quartiles, "max": max(lengths)},
        "tokens_per_s": rates,
        "median_tokens_per_s": median,
        **summary,
    }
    Path(cli.out).parent.mkdir(parents=True, exist_ok=True)
    Path(cli.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {cli.out}")


if __name__ == "__main__":
    main()
