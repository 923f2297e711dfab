"""Both trainers train in every precision users run: bf16 weights with `bf16=True` (full, LoRA, 4-bit QLoRA), 8-bit,
fp16, on the CPU. Each run must move the trained weights, leave the frozen ones alone and log finite losses."""

from __future__ import annotations

import math

import pytest
import torch
from recipes import RECIPES, changed, snapshot, tiny_training_args
from tiny_models import addition_rows

from trl_selfdistill import (
    DynSDPBConfig,
    DynSDPBTrainer,
    SDFTConfig,
    SDFTDynSDPBConfig,
    SDFTDynSDPBTrainer,
    SDFTTrainer,
)


def training_args(tmp_path, recipe) -> dict:
    return tiny_training_args(tmp_path, learning_rate=1e-2, max_steps=3, **recipe.args())


def train_and_check(trainer, recipe) -> list[dict]:
    before = snapshot(trainer.model)
    trainer.train()
    trained, frozen = changed(before, trainer.model)
    assert trained, f"{recipe.name}: no trainable weight moved"
    assert not frozen, f"{recipe.name}: frozen weights moved: {sorted(frozen)[:3]}"
    if recipe.lora:
        assert all("lora_" in name for name in trained)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3 and all(math.isfinite(entry["loss"]) for entry in logs)
    return logs


@pytest.mark.parametrize("recipe", RECIPES.values(), ids=RECIPES.keys())
def test_dynsdpb_trains_in_every_precision(tmp_path, tiny_model_dir, recipe):
    args = DynSDPBConfig(**training_args(tmp_path, recipe))
    trainer = DynSDPBTrainer(model=tiny_model_dir, args=args, train_dataset=addition_rows(), **recipe.model_kwargs())
    logs = train_and_check(trainer, recipe)
    assert all(entry["distill/loss"] > 0 for entry in logs[1:])  # distillation from step 2 on
    # LoRA freezes the output layer, so the teacher is cached as hidden states; a trained output layer needs logits.
    assert trainer.teacher_cache.holds_hidden_states == recipe.lora
    width = trainer.model.config.hidden_size if recipe.lora else trainer.model.config.vocab_size
    assert all(entry.states.shape[1] == width for entry in trainer.teacher_cache.current.values())


@pytest.mark.parametrize("recipe", RECIPES.values(), ids=RECIPES.keys())
def test_sdft_rewrites_and_trains_in_every_precision(tmp_path, tiny_model_dir, recipe):
    args = SDFTConfig(
        **training_args(tmp_path, recipe),
        sdft_cache_dir=str(tmp_path / "cache"),
        sdft_generation_kwargs={"max_new_tokens": 8},
        sdft_batch_size=4,
    )
    trainer = SDFTTrainer(model=tiny_model_dir, args=args, train_dataset=addition_rows(8), **recipe.model_kwargs())
    assert trainer.distillation_report["generated"] == 8
    # The distribution gap is scored by the seed model in this precision too (a forward pass over every target).
    assert 0 < trainer.distillation_report["seed_nll_reference"] < float("inf")
    train_and_check(trainer, recipe)


@pytest.mark.parametrize(
    "recipe", [RECIPES["bf16-lora"], RECIPES["qlora-nf4-bf16"]], ids=["bf16-lora", "qlora-nf4-bf16"]
)
def test_sdft_data_with_the_dynsdpb_loss_in_bf16_and_4bit(tmp_path, tiny_model_dir, recipe):
    args = SDFTDynSDPBConfig(
        **training_args(tmp_path, recipe),
        sdft_cache_dir=str(tmp_path / "cache"),
        sdft_generation_kwargs={"max_new_tokens": 8},
        sdft_batch_size=4,
    )
    trainer = SDFTDynSDPBTrainer(
        model=tiny_model_dir, args=args, train_dataset=addition_rows(8), **recipe.model_kwargs()
    )
    assert trainer.distillation_report["generated"] == 8
    logs = train_and_check(trainer, recipe)
    assert all(entry["distill/loss"] > 0 for entry in logs[1:])


def test_bf16_weights_stay_bf16(tmp_path, tiny_model_dir):
    """The crash this file guards against: bf16 weights under `bf16=True` (the headline QLoRA setup)."""
    recipe = RECIPES["qlora-nf4-bf16"]
    args = DynSDPBConfig(**training_args(tmp_path, recipe))
    trainer = DynSDPBTrainer(model=tiny_model_dir, args=args, train_dataset=addition_rows(), **recipe.model_kwargs())
    head = trainer.model.get_base_model().get_output_embeddings()
    assert head.weight.dtype == torch.bfloat16 and trainer.model.get_base_model().is_loaded_in_4bit
    assert trainer.accelerator.mixed_precision == "bf16"
    train_and_check(trainer, recipe)
