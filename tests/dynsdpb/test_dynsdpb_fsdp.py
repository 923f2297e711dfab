"""DynSDPB with FSDP2: the loss inside the forward sees the whole output layer; FSDP1 is refused.

Trainer cannot run FSDP on the CPU (accelerate enables it on GPUs only), so `fsdp_dynsdpb.py` shards the model with
`fully_shard` as accelerate does and drives the forward as `DynSDPBTrainer.compute_loss` does, on two processes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from launch import launch_two_processes
from recipes import tiny_training_args
from tiny_models import addition_rows

from trl_selfdistill import DynSDPBConfig, DynSDPBTrainer

HERE = Path(__file__).parent


@pytest.mark.slow
def test_the_loss_inside_the_forward_under_fsdp2_equals_the_unsharded_one(tmp_path):
    launch_two_processes(HERE / "fsdp_dynsdpb.py", str(tmp_path))
    for rank in (0, 1):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for adapter, width in (("full", 300), ("lora", 64)):
            # Inside the forward the output layer is whole; outside it each process holds half of its rows.
            assert results[adapter]["weights_inside_forward"] == ["Parameter", [300, 64]]
            for step in results[adapter]["steps"]:
                assert step["weight_outside_forward"] == [150, 64]
                assert step["loss"] == pytest.approx(step["expected_loss"], rel=1e-6)
                assert step["gradient_difference"] < 1e-6 and step["zero_gradients"] == []
                assert step["lm_head_gradients"] == (["lm_head.weight"] if adapter == "full" else [])
                # The rows to cache: logits projected inside the forward (full), hidden states (LoRA).
                assert step["returned_shape"] == [12, width] and step["returned_difference"] < 1e-5
            assert results[adapter]["weight_difference"] < 1e-6  # after three AdamW steps, on both processes
        assert "FSDP made `lm_head` a unit of its own" in results["lm_head_alone"]


def test_fsdp1_is_refused_before_the_model_is_loaded(tmp_path):
    args = DynSDPBConfig(**tiny_training_args(tmp_path, fsdp=True, fsdp_config={"version": 1}))
    with pytest.raises(ValueError, match=r"not with FSDP1 .* `fsdp_config=\{'version': 2\}`"):
        DynSDPBTrainer(model="not/loaded", args=args, train_dataset=addition_rows())
