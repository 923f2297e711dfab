"""DynSDPB checkpoints are complete or refused: saves stopped halfway, cut, missing and stale teacher caches.

Each test damages a real checkpoint the way a kill or a stray copy would, resumes, and checks that the run either
continues with the uninterrupted run's losses or stops before training with an error that names the file, the step
and the checkpoint to resume from instead.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from recipes import tiny_training_args
from tiny_models import addition_rows, build_tiny_llama, build_tiny_tokenizer

from trl_selfdistill import DynSDPBConfig, DynSDPBTrainer

CACHE = "dynsdpb_teacher_cache_rank0.pt"
SAVES = dict(max_steps=6, save_strategy="steps", save_steps=2, learning_rate=5e-3)


def make_trainer(tmp_path, trainer_class=DynSDPBTrainer, **overrides) -> DynSDPBTrainer:
    tokenizer = build_tiny_tokenizer()
    return trainer_class(
        model=build_tiny_llama(tokenizer), args=DynSDPBConfig(**tiny_training_args(tmp_path, **SAVES, **overrides)),
        train_dataset=addition_rows(), processing_class=tokenizer,
    )  # fmt: skip


def losses_after(trainer, step: int) -> list[tuple[float, float]]:
    """(loss, distillation loss) of the steps after `step`: a resumed trainer also carries its checkpoint's logs."""
    return [(e["loss"], e["distill/loss"]) for e in trainer.state.log_history if "loss" in e and e["step"] > step]


def assert_same_losses(resumed, uninterrupted, step: int) -> None:
    assert len(losses_after(resumed, step)) == 6 - step
    for (loss, distill), (expected_loss, expected_distill) in zip(
        losses_after(resumed, step), losses_after(uninterrupted, step), strict=True
    ):
        assert loss == pytest.approx(expected_loss, rel=1e-5) and distill == pytest.approx(expected_distill, rel=1e-4)
    assert losses_after(resumed, step)[0][1] > 0  # the first resumed step distils from the restored cache


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> DynSDPBTrainer:
    """Six steps with checkpoints at 2, 4 and 6; the reference every resumed run must match."""
    trainer = make_trainer(tmp_path_factory.mktemp("uninterrupted"))
    trainer.train()
    return trainer


@pytest.fixture
def run_stopped_after_step_4(tmp_path, uninterrupted):
    """An output folder as a run killed after saving step 4 leaves it: checkpoints 2 and 4, copied, no 6."""
    source = uninterrupted.args.output_dir
    for step in (2, 4):
        shutil.copytree(f"{source}/checkpoint-{step}", tmp_path / "out" / f"checkpoint-{step}")
    return tmp_path


def refused_resume(tmp_path) -> str:
    """Resumes `tmp_path/out` with `resume_from_checkpoint=True`; returns the error, checking nothing was trained."""
    trainer = make_trainer(tmp_path)
    with pytest.raises(ValueError, match="Cannot resume exactly from") as error:
        trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 0 and trainer.state.log_history == []  # stopped before any step
    assert not (tmp_path / "out" / "checkpoint-6").exists()
    return str(error.value)


def test_checkpoints_hold_one_whole_cache_per_process_and_resume_exactly(run_stopped_after_step_4, uninterrupted):
    for step in (2, 4, 6):
        checkpoint = Path(uninterrupted.args.output_dir) / f"checkpoint-{step}"
        files = [p.name for p in checkpoint.iterdir()]
        assert CACHE in files and not [name for name in files if name.endswith(".tmp")]
        assert torch.load(checkpoint / CACHE)["step"] == step - 1  # written by step `step`'s forward passes
    resumed = make_trainer(run_stopped_after_step_4)
    resumed.train(resume_from_checkpoint=True)  # picks checkpoint-4
    assert_same_losses(resumed, uninterrupted, 4)


def test_resuming_with_gradient_accumulation_is_exact(tmp_path):
    uninterrupted = make_trainer(tmp_path / "a", gradient_accumulation_steps=2)
    uninterrupted.train()
    for step in (2, 4):
        shutil.copytree(tmp_path / "a" / "out" / f"checkpoint-{step}", tmp_path / "b" / "out" / f"checkpoint-{step}")
    resumed = make_trainer(tmp_path / "b", gradient_accumulation_steps=2)
    resumed.train(resume_from_checkpoint=True)
    assert_same_losses(resumed, uninterrupted, 4)


class _Stop(Exception):
    """Stands for the kill."""


@pytest.mark.parametrize("stopped_in", ["teacher cache", "Trainer's files"])
def test_a_save_stopped_halfway_leaves_a_checkpoint_that_is_refused(tmp_path, uninterrupted, monkeypatch, stopped_in):
    real_save = torch.save

    def cut_teacher_cache_at_step_4(obj, f, *args, **kwargs):
        if CACHE in getattr(f, "name", str(f)) and obj["step"] == 3:
            f.write(b"PK\x03\x04 half a teacher cache")
            raise _Stop
        return real_save(obj, f, *args, **kwargs)

    class StoppedWhileSavingStep4(DynSDPBTrainer):
        def _save_optimizer_and_scheduler(self, output_dir):  # the first of `Trainer`'s files after the weights
            if self.state.global_step == 4:
                raise _Stop
            super()._save_optimizer_and_scheduler(output_dir)

    if stopped_in == "teacher cache":
        monkeypatch.setattr(torch, "save", cut_teacher_cache_at_step_4)
    with pytest.raises(_Stop):
        make_trainer(tmp_path, StoppedWhileSavingStep4 if stopped_in == "Trainer's files" else DynSDPBTrainer).train()
    monkeypatch.undo()

    stopped = tmp_path / "out" / "checkpoint-4"
    assert not (stopped / "trainer_state.json").exists()  # `Trainer` writes it last: the save never got there
    if stopped_in == "teacher cache":
        assert not (stopped / CACHE).exists()  # the cut bytes went to a temporary file, removed with the error
        assert not [path.name for path in stopped.iterdir() if CACHE in path.name]
        assert not (stopped / "model.safetensors").exists()  # the cache goes first, before `Trainer`'s files
    else:
        assert (stopped / CACHE).is_file()
    message = refused_resume(tmp_path)
    assert f"{stopped} (step 4)" in message and "trainer_state.json" in message
    assert f"resume_from_checkpoint='{tmp_path / 'out' / 'checkpoint-2'}'" in message

    shutil.rmtree(stopped)  # what the error says to do
    resumed = make_trainer(tmp_path)
    resumed.train(resume_from_checkpoint=True)
    assert_same_losses(resumed, uninterrupted, 2)


def test_a_checkpoint_without_its_teacher_cache_is_refused_and_the_previous_one_resumes_exactly(
    run_stopped_after_step_4, uninterrupted
):
    # What the earlier save order left when killed between `Trainer`'s files and the teacher cache.
    tmp_path = run_stopped_after_step_4
    (tmp_path / "out" / "checkpoint-4" / CACHE).unlink()
    message = refused_resume(tmp_path)
    assert f"{tmp_path / 'out' / 'checkpoint-4' / CACHE} is missing" in message and "(step 4)" in message
    previous = re.search(r"resume_from_checkpoint='([^']+)'", message).group(1)
    assert previous == str(tmp_path / "out" / "checkpoint-2")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["checkpoint-2", "checkpoint-4"]  # kept as is

    resumed = make_trainer(tmp_path)
    resumed.train(resume_from_checkpoint=Path(previous))  # `Trainer` takes a path object too
    assert_same_losses(resumed, uninterrupted, 2)


@pytest.mark.parametrize("kept", [0.5, 0.0])
def test_a_cut_teacher_cache_is_refused_naming_the_file(run_stopped_after_step_4, kept):
    path = run_stopped_after_step_4 / "out" / "checkpoint-4" / CACHE
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * kept)])
    message = refused_resume(run_stopped_after_step_4)
    assert f"{path} is cut short or damaged" in message and "(step 4)" in message
    assert "checkpoint-2'" in message
    assert path.stat().st_size == int(len(data) * kept)  # left for the user to inspect


def test_a_stale_teacher_cache_is_refused_naming_both_steps(run_stopped_after_step_4):
    out = run_stopped_after_step_4 / "out"
    shutil.copy(out / "checkpoint-2" / CACHE, out / "checkpoint-4" / CACHE)
    message = refused_resume(run_stopped_after_step_4)
    path = out / "checkpoint-4" / CACHE
    assert f"{path} was saved at step 2, not at the checkpoint's step 4" in message
    assert "checkpoint-2'" in message


def test_with_no_complete_earlier_checkpoint_the_error_says_to_start_again(run_stopped_after_step_4):
    out = run_stopped_after_step_4 / "out"
    (out / "checkpoint-2" / CACHE).unlink()  # not complete either: not offered as the way out
    (out / "checkpoint-4" / CACHE).write_bytes(b"")
    message = refused_resume(run_stopped_after_step_4)
    assert "checkpoint-2" not in message
    assert f"no complete earlier checkpoint next to it: delete {out / 'checkpoint-4'} and train from" in message
