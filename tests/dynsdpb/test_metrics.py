"""DynSDPBTrainer's logged means are weighted as `Trainer` weights `loss`, so that `loss == ce_loss + distill/loss`."""

from __future__ import annotations

import pytest
from datasets import Dataset
from recipes import tiny_training_args
from tiny_models import build_tiny_llama, build_tiny_tokenizer

from trl_selfdistill import DynSDPBConfig, DynSDPBTrainer


def uneven_rows(n: int = 16) -> Dataset:
    """Responses of 1 to 16 filler words: the micro-batches of a step carry different numbers of tokens."""
    rows = [{"prompt": f"Add {i} and {i + 1}.", "completion": "so " * (1 + 5 * (i % 4)) + f"{i}."} for i in range(n)]
    return Dataset.from_list(rows)


@pytest.mark.parametrize("logging_steps", [1, 3])
def test_loss_is_ce_loss_plus_distill_loss_with_uneven_micro_batches(tmp_path, logging_steps):
    tokenizer = build_tiny_tokenizer()
    args = DynSDPBConfig(
        **tiny_training_args(
            tmp_path, learning_rate=5e-3, max_steps=6, gradient_accumulation_steps=2, logging_steps=logging_steps,
            dynsdpb_mode="constant",  # a distillation term far from zero from the second step on
        )
    )  # fmt: skip
    trainer = DynSDPBTrainer(
        model=build_tiny_llama(tokenizer), args=args, train_dataset=uneven_rows(), processing_class=tokenizer
    )
    counts = [int((batch["labels"][:, 1:] != -100).sum()) for batch in trainer.get_train_dataloader()]
    assert len(set(counts)) > 1, counts  # otherwise a plain mean over micro-batches would pass too

    trainer.train()

    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 6 // logging_steps
    assert all(entry["distill/loss"] > 1e-4 for entry in logs[1:])
    for entry in logs:
        assert entry["loss"] == pytest.approx(entry["ce_loss"] + entry["distill/loss"], rel=1e-5, abs=1e-6), entry
        assert 0 <= entry["mean_token_accuracy"] <= 1
    for entry in logs[1:]:  # constant mode: every re-used sample has the configured weight and temperature
        assert entry["distill/mean_alpha"] == pytest.approx(args.dynsdpb_alpha)
        assert entry["distill/mean_temperature"] == pytest.approx(args.dynsdpb_temperature)
        assert entry["distill/reused_fraction"] == pytest.approx(0.5)
