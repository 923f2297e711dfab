"""Two processes with gradient accumulation: every micro-batch slot on every rank is its own chain."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from launch import launch_two_processes

HERE = Path(__file__).parent


@pytest.mark.slow
def test_chains_per_rank_and_slot_with_two_processes(tmp_path):
    launch_two_processes(HERE / "distributed_dynsdpb.py", str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    accumulation, new_per_batch = 2, 2
    new_seen = []
    for rank in ranks:
        batches = rank["batches"]
        assert len(batches) == 16 // (2 * accumulation * new_per_batch) * accumulation  # 2 steps x 2 slots
        for position, (indices, reused) in enumerate(batches):
            new = [i for i, r in zip(indices, reused, strict=True) if not r]
            new_seen += new
            if position >= accumulation:  # same slot, one optimizer step earlier, same rank
                previous_indices, previous_reused = batches[position - accumulation]
                previous_new = [i for i, r in zip(previous_indices, previous_reused, strict=True) if not r]
                assert [i for i, r in zip(indices, reused, strict=True) if r] == previous_new
    assert sorted(new_seen) == list(range(16))  # each sample new exactly once, over both ranks
    # Metrics are gathered over both processes, so both log the same values; distillation runs from step 2 on.
    assert ranks[0]["logs"] == ranks[1]["logs"]
    assert [entry["distill/reused_fraction"] for entry in ranks[0]["logs"]] == [0.0, 0.5]
