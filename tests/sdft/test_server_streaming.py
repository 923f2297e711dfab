"""The server engine keeps `concurrency` requests in flight across the blocks the rewrite hands it."""

from __future__ import annotations

from servers import TimedServer
from transformers import AutoTokenizer

from trl_selfdistill import distill_dataset
from trl_selfdistill.data import bundled_gsm8k, gsm8k_to_prompt_completion
from trl_selfdistill.generation import Prompt, ServerEngine

GREEDY = {"do_sample": False, "max_new_tokens": 8}


def test_the_next_block_starts_while_the_slowest_row_of_the_last_is_still_generating(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    server = TimedServer("seed", delay=lambda prompt: 1.0 if prompt.startswith("slow") else 0.05)
    try:
        engine = ServerEngine(server.url, "seed", tokenizer, concurrency=3)
        blocks = [[Prompt(3 * b + i, f"{'slow' if i == 0 else 'fast'} {3 * b + i}", 0) for i in range(3)]
                  for b in range(3)]  # fmt: skip
        done = sorted(c.index for group in engine.generate_blocks(blocks, GREEDY) for c in group)
    finally:
        server.close()
    assert done == list(range(9))
    for block in range(2):  # the next block's first request starts before this block's slow row is done
        slow_end = server.log[f"slow {3 * block}"][1]
        assert server.log[f"slow {3 * block + 3}"][0] < slow_end


def test_a_distilled_dataset_never_waits_for_a_block_to_drain(tiny_model_dir, tmp_path):
    """Through `distill_dataset` (claims, cache): with 2 slots and blocks of 2, every row but the slow one is done
    while the slow one is still in flight."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    dataset = gsm8k_to_prompt_completion(bundled_gsm8k("train", n=8))
    longest = max(dataset["prompt"], key=lambda messages: len(messages[-1]["content"]))[-1]["content"]
    server = TimedServer("seed", delay=lambda prompt: 2.0 if longest in prompt else 0.05)
    try:
        engine = ServerEngine(server.url, "seed", tokenizer, concurrency=2)
        result = distill_dataset(
            None, tokenizer, dataset, engine=engine, template="gsm8k", generation_kwargs=GREEDY, cache_dir=tmp_path,
            show_progress=False,
        )  # fmt: skip
    finally:
        server.close()
    assert result.report["generated"] == 8
    (slow,) = [times for prompt, times in server.log.items() if longest in prompt]
    assert all(end < slow[1] for prompt, (_, end) in server.log.items() if longest not in prompt)
