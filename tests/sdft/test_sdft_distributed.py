"""Under `accelerate launch` with two processes, the rewrite is sharded across ranks and gathered, not repeated; so
are the least surprising target's candidates and likelihoods."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import Dataset
from launch import launch_two_processes

from trl_selfdistill import distill_dataset
from trl_selfdistill.cache import RowCache

HERE = Path(__file__).parent


@pytest.mark.slow
def test_rewrite_is_sharded_across_two_processes(tmp_path, tiny_tokenizer, make_tiny_llama):
    launch_two_processes(HERE / "distributed_sdft.py", str(tmp_path))

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # every process trains on the full, identical distilled set
    assert ranks[0]["report"]["generated"] == 8

    # Each process generated its own share only: disjoint halves, written to its own cache file.
    (cache_dir,) = (tmp_path / "cache" / "rewrites").iterdir()
    shares = [set(RowCache(cache_dir, f"rank{r}").load_own()) for r in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 4 and not shares[0] & shares[1]

    # Sharding changes nothing: one process with the same seed and batches writes the same rewrites.
    dataset = Dataset.from_list(
        [{"prompt": f"Count to {i}.", "completion": " ".join(map(str, range(i + 1)))} for i in range(8)]
    )
    single = distill_dataset(
        make_tiny_llama(tiny_tokenizer), tiny_tokenizer, dataset, generation_kwargs={"max_new_tokens": 6},
        keep_truncated=True, batch_size=2, cache_dir=tmp_path / "single", show_progress=False,
    )  # fmt: skip
    trained_on = [c.removesuffix(tiny_tokenizer.eos_token) for c in ranks[0]["completions"]]
    assert trained_on == single.dataset["completion"] != dataset["completion"]

    # The least surprising target: the same candidates, likelihoods and choices as one process computes.
    least = ranks[0]["least_surprising"]
    alone = distill_dataset(
        make_tiny_llama(tiny_tokenizer), tiny_tokenizer, dataset, candidates=["own_answer", "rewrite"],
        selection="lowest_nll", checker=lambda text, reference, row: True, generation_kwargs={"max_new_tokens": 6},
        keep_truncated=True, batch_size=2, cache_dir=tmp_path / "single_least_surprising", show_progress=False,
    )  # fmt: skip
    assert least["report"]["generated"] == alone.report["generated"] == 2 * 8
    for key in ("target_own_answer", "target_rewrite", "target_reference"):
        assert least["report"][key] == alone.report[key]
    assert least["report"]["seed_nll_distilled"] == pytest.approx(alone.report["seed_nll_distilled"], abs=1e-4)
    for shared, single in zip(least["rows"], alone.rows, strict=True):
        assert shared["target"] == single["target"]
        assert [c["text"] for c in shared["candidates"]] == [c["text"] for c in single["candidates"]]
        assert [c["seed_nll"] for c in shared["candidates"]] == pytest.approx(
            [c["seed_nll"] for c in single["candidates"]], abs=1e-4
        )


@pytest.mark.slow
def test_processes_that_accelerate_did_not_join_are_refused(tmp_path):
    """On CPUs, two launched processes stay apart unless accelerate's state is told `cpu=True`; rewriting then would
    have both rewrite everything into one cache file."""
    launch_two_processes(HERE / "unjoined_processes.py", str(tmp_path))
    for rank in (0, 1):
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert "one of 2 launched processes" in message and "PartialState(cpu=True)" in message, message
    assert not (tmp_path / "cache").exists()  # refused before anything was written
