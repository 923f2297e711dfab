"""The benchmark scripts run end to end (tiny sizes, on this machine) and end with their ratios line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def run(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_gpu_qlora_benchmark_runs_its_tiny_preset(tmp_path):
    out = tmp_path / "gpu_qlora.json"
    stdout = run(
        "gpu_qlora.py", "--preset", "tiny", "--vocab-size", "512", "--sequence-length", "64", "--prompt-tokens", "8",
        "--rows", "32", "--rewrite-rows", "8", "--rewrite-tokens", "4", "--steps", "4", "--out", str(out),
    )  # fmt: skip
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("ratios to SFTTrainer | DynSDPB: step") and "SDFT: step" in last
    record = json.loads(out.read_text())
    assert [r["trainer"] for r in record["training"]] == ["SFTTrainer", "DynSDPBTrainer", "SDFTTrainer"]
    assert all(r["median_step_s"] > 0 for r in record["training"])


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny", "bundled"])
def test_rewrite_throughput_benchmark_measures_every_lever(preset, tmp_path):
    out = tmp_path / "rewrite.json"
    stdout = run(
        "rewrite_throughput.py", "--preset", preset, "--rows", "4", "--one-row-rows", "2", "--new-tokens", "6",
        "--out", str(out),
    )  # fmt: skip
    assert stdout.strip().splitlines()[-1].startswith("ratios | default ")
    arms = json.loads(out.read_text())["arms"]
    expected = {"one_row", "previous_default", "default", "other_cache", "continuous"}
    if preset == "tiny":
        expected |= {"unquantized_compiling", "unquantized", "unquantized_dynamic"}
    assert set(arms) == expected
    for arm in arms.values():
        assert "error" in arm or (arm["tokens_per_s"] > 0 and arm["x_one_row"] > 0)
    assert "error" not in arms["default"] and "error" not in arms["one_row"]
    if preset == "bundled":  # greedy: every engine writes the one-row loop's text
        assert arms["default"]["same_text_as_one_row"] == "2/2"


@pytest.mark.slow
def test_cpu_twin_and_loss_benchmarks_print_their_ratios(tmp_path):
    stdout = run(
        "dynsdpb_cost.py", "--hidden-size", "64", "--vocab-size", "512", "--sequence-length", "32",
        "--prompt-tokens", "8", "--steps", "4", "--out", str(tmp_path / "cost.json"),
    )  # fmt: skip
    assert stdout.strip().splitlines()[-1].startswith("ratios to SFTTrainer | DynSDPB: step")
    assert json.loads((tmp_path / "cost.json").read_text())["ratios_to_sft"]["DynSDPBTrainer"]["step_time"] > 0
    stdout = run("loss_kernels.py", "--tokens", "64", "--hidden", "32", "--vocab", "128", "--repeats", "2")
    assert stdout.strip().splitlines()[-1].startswith("ratio to TRL's SFT loss")


def test_sizes_that_cannot_make_a_batch_are_refused_before_anything_is_built():
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "dynsdpb_cost.py"), "--sequence-length", "16", "--prompt-tokens", "16"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "raise --sequence-length or lower --prompt-tokens" in result.stderr


@pytest.mark.slow
def test_probe_speed_benchmark_compares_both_dtypes(tmp_path):
    out = tmp_path / "probe_speed.json"
    stdout = run("probe_speed.py", "--rows", "2", "--max-new-tokens", "4", "--batch-size", "2", "--out", str(out))
    assert stdout.strip().splitlines()[-1].startswith("ratios | bfloat16: ")
    record = json.loads(out.read_text())
    assert set(record["runs"]) == {"torch.float32", "torch.bfloat16"}
    assert record["prompts"] == 4 and 0 <= record["same_answers"] <= 4
    assert all(timing["tokens_per_s"] > 0 for timing in record["runs"].values())
