"""What a forgetting benchmark run may never report: another run's weights or settings, a damaged record, two runs
writing one output_dir at a time."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from test_benchmark import arithmetic_dataset, lora, shared_config

from trl_selfdistill.evaluation.arms import ARM_RECORD_FILE, ARM_SETTINGS_FILE, ARMS, train_arm, weights_digest
from trl_selfdistill.evaluation.benchmark import LOCK_FILE, output_dir_lock

HOLD_THE_LOCK = """
import sys, time
from trl_selfdistill.evaluation.benchmark import output_dir_lock
with output_dir_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_one_run_per_output_dir_at_a_time(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RuntimeError, match=rf"Another forgetting benchmark is running.*process {holder.pid}"):
            with output_dir_lock(str(tmp_path)):
                pass
    finally:
        holder.kill()
        holder.wait()
    deadline = time.monotonic() + 10
    while True:  # the lock goes with the process that held it, killed or not
        try:
            with output_dir_lock(str(tmp_path)):
                break
        except RuntimeError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert os.path.exists(tmp_path / LOCK_FILE)


def train_sft(tmp_path, model_dir, directory, **overrides):
    config = shared_config(tmp_path, **overrides)
    return train_arm(ARMS["sft"], model_dir, config, arithmetic_dataset(), str(directory), peft_config=lora())


def test_a_finished_arm_is_reused_only_with_the_weights_it_recorded(tmp_path, tiny_model_dir):
    first = train_sft(tmp_path, tiny_model_dir, tmp_path / "a")
    assert train_sft(tmp_path, tiny_model_dir, tmp_path / "a") == first  # unchanged: reused
    other = train_sft(tmp_path, tiny_model_dir, tmp_path / "b", learning_rate=5e-3)
    shutil.copy(tmp_path / "b" / "adapter_model.safetensors", tmp_path / "a" / "adapter_model.safetensors")
    retrained = train_sft(tmp_path, tiny_model_dir, tmp_path / "a")
    assert retrained["weights_sha256"] == first["weights_sha256"] != other["weights_sha256"]  # trained again
    assert weights_digest(str(tmp_path / "a")) == first["weights_sha256"]


def test_checkpoints_are_resumed_only_under_the_settings_that_wrote_them(tmp_path, tiny_model_dir):
    directory = tmp_path / "arm"
    train_sft(tmp_path, tiny_model_dir, directory, max_steps=2, save_strategy="steps", save_steps=1)
    assert (directory / "checkpoint-1").is_dir()
    for name in (ARM_RECORD_FILE, ARM_SETTINGS_FILE):  # what says which run wrote the checkpoints, gone
        os.remove(directory / name)
    record = train_sft(tmp_path, tiny_model_dir, directory, learning_rate=5e-3, max_steps=2)
    assert record["resumed_from"] is None and record["settings"]["learning_rate"] == 5e-3


def test_a_damaged_record_is_named(tmp_path, tiny_model_dir):
    directory = tmp_path / "arm"
    train_sft(tmp_path, tiny_model_dir, directory)
    text = (directory / ARM_RECORD_FILE).read_text()
    (directory / ARM_RECORD_FILE).write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=rf"{ARM_RECORD_FILE} is damaged .*Delete it and rerun"):
        train_sft(tmp_path, tiny_model_dir, directory)
    os.remove(directory / ARM_RECORD_FILE)
    assert json.loads(json.dumps(train_sft(tmp_path, tiny_model_dir, directory)))["global_step"] == 2
