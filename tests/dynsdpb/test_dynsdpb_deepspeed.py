"""DynSDPB under DeepSpeed ZeRO-2 and ZeRO-3, on two CPU processes (DeepSpeed's CPU accelerator, gloo).

DeepSpeed restores a checkpoint's weights with its own loader and never calls `Trainer._load_from_checkpoint`, which
once was the only place the teacher cache was restored: the resumed run's first step then trained without
distillation. ZeRO-3 holds each process's shard of the output layer outside the forward and gathers it inside, where
DynSDPB uses it (and where the teacher logits are projected): it trains as ZeRO-2, which keeps every weight whole.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from launch import launch_two_processes
from safetensors.torch import load_file

HERE = Path(__file__).parent
WEIGHTS = {"full": "model.safetensors", "lora": "adapter_model.safetensors"}


@pytest.fixture(scope="module")
def zero_run(tmp_path_factory):
    """`zero_run(stage)`: the folder of `deepspeed_dynsdpb.py` run with that stage, launched once per module."""
    runs = {}

    def run(stage: int) -> Path:
        if stage not in runs:
            runs[stage] = tmp_path_factory.mktemp(f"zero{stage}")
            launch_two_processes(HERE / "deepspeed_dynsdpb.py", str(runs[stage]), str(stage))
        return runs[stage]

    return run


def results(folder: Path, rank: int, adapter: str) -> dict:
    return json.loads((folder / f"rank{rank}.json").read_text())[adapter]


def assert_same_weights(checkpoint: Path, expected: Path, adapter: str, **tolerance) -> None:
    weights, expected_weights = load_file(checkpoint / WEIGHTS[adapter]), load_file(expected / WEIGHTS[adapter])
    assert weights.keys() == expected_weights.keys()
    for name, weight in weights.items():
        torch.testing.assert_close(weight, expected_weights[name], **tolerance, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_a_resumed_zero_run_equals_the_uninterrupted_one(zero_run, stage, adapter):
    folder = zero_run(stage) / adapter
    for rank in (0, 1):
        logs = results(folder.parent, rank, adapter)
        resumed = [entry for entry in logs["resumed"] if entry[0] > 4]
        expected = [entry for entry in logs["uninterrupted"] if entry[0] > 4]
        assert [entry[0] for entry in resumed] == [5, 6]
        assert resumed[0][2] > 0  # the first resumed step distils from the restored cache
        for (_, loss, distill), (_, expected_loss, expected_distill) in zip(resumed, expected, strict=True):
            assert loss == pytest.approx(expected_loss, rel=1e-5)
            assert distill == pytest.approx(expected_distill, rel=1e-4)

    resumed, uninterrupted = folder / "resumed/out/checkpoint-6", folder / "uninterrupted/out/checkpoint-6"
    for rank in (0, 1):  # what steps 5 and 6 cached, for step 7
        cache_file = f"dynsdpb_teacher_cache_rank{rank}.pt"
        cache, expected = (torch.load(run / cache_file) for run in (resumed, uninterrupted))
        assert cache["step"] == expected["step"] == 5 and cache["entries"].keys() == expected["entries"].keys()
        assert cache["kind"] == ("hidden_states" if adapter == "lora" else "logits")
        for index, (states, statistics) in cache["entries"].items():
            torch.testing.assert_close(states, expected["entries"][index][0], rtol=1e-3, atol=1e-3)
            torch.testing.assert_close(statistics, expected["entries"][index][1], rtol=1e-4, atol=1e-5)
    assert_same_weights(resumed, uninterrupted, adapter, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_zero3_trains_as_zero2(zero_run, adapter):
    zero2, zero3 = zero_run(2), zero_run(3)
    for rank in (0, 1):
        assert results(zero3, rank, adapter)["output_layer_numel"] == 0  # outside the forward: not even a shard here
        assert results(zero2, rank, adapter)["output_layer_numel"] == 300 * 64
        logs, expected = (results(run, rank, adapter)["uninterrupted"] for run in (zero3, zero2))
        assert [entry[0] for entry in logs] == list(range(1, 7)) and logs[-1][2] > 0
        for (_, loss, distill), (_, expected_loss, expected_distill) in zip(logs, expected, strict=True):
            assert loss == pytest.approx(expected_loss, rel=1e-5)
            # Another reduction order; the bf16 teacher cache rounds a few entries the other way.
            assert distill == pytest.approx(expected_distill, rel=2e-3)
    checkpoint = f"{adapter}/uninterrupted/out/checkpoint-6"
    assert_same_weights(zero3 / checkpoint, zero2 / checkpoint, adapter, rtol=1e-3, atol=1e-5)
