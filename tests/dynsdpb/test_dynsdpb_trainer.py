"""DynSDPBTrainer on a tiny local Llama: batches, loss, SFT equivalence at alpha 0, resume, QLoRA, bad configs."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import IterableDataset
from peft import LoraConfig
from recipes import tiny_training_args
from tiny_models import addition_rows, build_tiny_llama, build_tiny_tokenizer
from transformers import BitsAndBytesConfig, TrainerCallback
from trl import SFTConfig, SFTTrainer

from trl_selfdistill import BUNDLED_MODEL_NAME, DynSDPBConfig, DynSDPBTrainer
from trl_selfdistill.dynsdpb.sampler import OverlappingBatchSampler, reuse_count_for


def training_kwargs(tmp_path, **overrides) -> dict:
    return tiny_training_args(tmp_path, **{"learning_rate": 5e-3, "max_steps": 4, **overrides})


def config(tmp_path, **overrides) -> DynSDPBConfig:
    return DynSDPBConfig(**training_kwargs(tmp_path, **overrides))


def make_trainer(tmp_path, tokenizer=None, **overrides) -> DynSDPBTrainer:
    tokenizer = tokenizer or build_tiny_tokenizer()
    return DynSDPBTrainer(
        model=build_tiny_llama(tokenizer), args=config(tmp_path, **overrides), train_dataset=addition_rows(),
        processing_class=tokenizer,
    )  # fmt: skip


def losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("accumulation", [1, 2])
def test_train_batches_overlap_by_chain(tmp_path, accumulation):
    trainer = make_trainer(tmp_path, gradient_accumulation_steps=accumulation)
    batches = [(b["dynsdpb_index"].tolist(), b["dynsdpb_reused"].tolist()) for b in trainer.get_train_dataloader()]
    steps = len(batches) // accumulation
    assert steps == math.ceil(16 / (accumulation * 2))
    for step in range(1, steps):
        for slot in range(accumulation):
            previous_indices, previous_reused = batches[(step - 1) * accumulation + slot]
            indices, reused = batches[step * accumulation + slot]
            previous_new = [i for i, r in zip(previous_indices, previous_reused, strict=True) if not r]
            assert [i for i, r in zip(indices, reused, strict=True) if r] == previous_new[:2]
    new = [i for indices, reused in batches for i, r in zip(indices, reused, strict=True) if not r]
    assert sorted(new) == list(range(16))  # every sample new exactly once per epoch


def test_distillation_starts_at_step_two_and_logs_its_metrics(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs[0]["distill/reused_fraction"] == 0  # step 1: nothing to re-use yet
    for entry in logs[1:]:
        assert entry["distill/reused_fraction"] == pytest.approx(0.5)
        for key in ("ce_loss", "distill/loss", "distill/mean_alpha", "distill/mean_temperature",
                    "distill/mean_uncertainty", "distill/mean_discrimination"):  # fmt: skip
            assert math.isfinite(entry[key])
        assert 3.0 <= entry["distill/mean_temperature"] <= 6.0
    assert trainer.teacher_cache.nbytes > 0


@pytest.mark.parametrize("accumulation", [1, 2])
def test_alpha_zero_reproduces_sft_on_the_same_batches(tmp_path, accumulation):
    tokenizer = build_tiny_tokenizer()
    common = dict(gradient_accumulation_steps=accumulation, max_steps=4, learning_rate=5e-3)
    dynsdpb = make_trainer(tmp_path / "d", tokenizer, dynsdpb_alpha=0.0, **common)
    dynsdpb.train()

    class SFTOnSameBatches(SFTTrainer):
        def get_train_dataloader(self):
            sampler = OverlappingBatchSampler(
                len(self.train_dataset), 4, reuse_count_for(4, 0.5), accumulation, seed=0
            )
            batches = [[i for i, _ in batch] for batch in sampler]
            dataset = self._remove_unused_columns(self.train_dataset)
            loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=self.data_collator)
            return self.accelerator.prepare(loader)

    sft_args = SFTConfig(**training_kwargs(tmp_path / "s", **common))
    sft = SFTOnSameBatches(
        model=build_tiny_llama(tokenizer), args=sft_args, train_dataset=addition_rows(), processing_class=tokenizer
    )
    sft.train()
    assert losses(dynsdpb) == pytest.approx(losses(sft), rel=1e-4)
    assert len(losses(dynsdpb)) == 4


def test_resume_from_checkpoint_continues_with_the_same_losses(tmp_path):
    uninterrupted = make_trainer(tmp_path / "a", max_steps=6, save_strategy="steps", save_steps=3)
    uninterrupted.train()
    checkpoint = tmp_path / "a" / "out" / "checkpoint-3"
    assert (checkpoint / "dynsdpb_teacher_cache_rank0.pt").is_file()

    resumed = make_trainer(tmp_path / "b", max_steps=6, save_strategy="steps", save_steps=3)
    resumed.train(resume_from_checkpoint=str(checkpoint))

    def after_checkpoint(trainer):  # the resumed trainer also carries the checkpoint's own log history
        return [(e["loss"], e["distill/loss"]) for e in trainer.state.log_history if "loss" in e and e["step"] > 3]

    assert len(after_checkpoint(resumed)) == 3
    for (loss, distill), (expected_loss, expected_distill) in zip(
        after_checkpoint(resumed), after_checkpoint(uninterrupted), strict=True
    ):
        assert loss == pytest.approx(expected_loss, rel=1e-5) and distill == pytest.approx(expected_distill, rel=1e-4)
    assert after_checkpoint(resumed)[0][1] > 0  # the first resumed step distils from the restored cache


def test_qlora_path_trains_the_adapter_only(tmp_path):
    tokenizer = build_tiny_tokenizer()
    build_tiny_llama(tokenizer).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    trainer = DynSDPBTrainer(
        model=str(tmp_path / "model"),
        args=config(tmp_path, max_steps=3),
        train_dataset=addition_rows(),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=torch.float32),
    )  # fmt: skip
    assert trainer.model.get_base_model().is_loaded_in_4bit
    before = {n: p.detach().clone().float() for n, p in trainer.model.named_parameters()}
    trainer.train()
    after = {n: p.detach().float() for n, p in trainer.model.named_parameters()}
    assert any(not torch.equal(before[n], after[n]) for n in before if "lora_" in n)
    assert all(torch.equal(before[n], after[n]) for n in before if "lora_" not in n)
    assert any(e.get("distill/loss", 0) > 0 for e in trainer.state.log_history)


@pytest.mark.parametrize(
    ("overrides", "dataset", "error", "message"),
    [
        ({"per_device_train_batch_size": 1}, None, ValueError, "batch"),
        ({"dynsdpb_reuse_fraction": 0.75}, None, ValueError, "reuse"),
        ({"packing": True}, None, ValueError, "packing"),
        ({"gradient_accumulation_steps": 16}, None, ValueError, "rows"),
        ({"loss_type": "dft"}, None, ValueError, "nll"),
        ({"dynsdpb_mode": "adaptive"}, None, ValueError, "dynsdpb_mode"),
        ({"dynsdpb_temperature": 0.0}, None, ValueError, "temperature"),
        ({"dynsdpb_loss_chunk_size": 0}, None, ValueError, "dynsdpb_loss_chunk_size"),
        (
            {},
            IterableDataset.from_generator(lambda: iter([{"prompt": "a", "completion": "b"}])),
            TypeError,
            "map-style",
        ),
    ],
)
def test_bad_configurations_fail_at_construction(tmp_path, overrides, dataset, error, message):
    tokenizer = build_tiny_tokenizer()
    with pytest.raises(error, match=message):
        DynSDPBTrainer(
            model=str(tmp_path / "never-loaded"),  # refused before any loading
            args=config(tmp_path, **overrides),
            train_dataset=addition_rows() if dataset is None else dataset,
            processing_class=tokenizer,
        )


def test_evaluation_uses_the_plain_sft_loss_and_leaves_the_cache_alone(tmp_path):
    tokenizer = build_tiny_tokenizer()
    eval_rows = addition_rows(6)
    trainer = DynSDPBTrainer(
        model=build_tiny_llama(tokenizer), args=config(tmp_path, max_steps=2), train_dataset=addition_rows(),
        eval_dataset=eval_rows, processing_class=tokenizer,
    )  # fmt: skip
    trainer.train()
    cached = {index: entry.states.clone() for index, entry in trainer.teacher_cache.current.items()}
    eval_loss = trainer.evaluate()["eval_loss"]
    assert trainer.teacher_cache.current.keys() == cached.keys()
    assert all(torch.equal(trainer.teacher_cache.current[i].states, cached[i]) for i in cached)

    sft = SFTTrainer(
        model=trainer.model, args=SFTConfig(**training_kwargs(tmp_path / "sft")), train_dataset=addition_rows(),
        processing_class=tokenizer,
    )  # fmt: skip
    assert eval_loss == pytest.approx(sft.evaluate(eval_rows)["eval_loss"], rel=1e-5)


def test_a_resumed_dataloader_still_follows_the_epoch(tmp_path):
    from accelerate import skip_first_batches

    trainer = make_trainer(tmp_path)
    loader = trainer.get_train_dataloader()
    loader.set_epoch(1)
    epoch_one = [batch["dynsdpb_index"].tolist() for batch in loader]
    loader.set_epoch(0)
    resumed = skip_first_batches(loader, 2)  # what `Trainer` does when resuming mid-epoch
    resumed.set_epoch(1)
    assert [batch["dynsdpb_index"].tolist() for batch in resumed] == epoch_one[2:]


def test_the_bundled_model_name_is_accepted(tmp_path, bundled_model_dir):
    trainer = DynSDPBTrainer(
        model=BUNDLED_MODEL_NAME, args=config(tmp_path, max_steps=1), train_dataset=addition_rows()
    )
    assert trainer.model.config._name_or_path == bundled_model_dir
    trainer.train()
    assert trainer.state.global_step == 1


def test_a_broken_weighting_rule_is_refused_at_construction(tmp_path):
    class OneWeightForAll(DynSDPBTrainer):
        def distillation_weights(self, stats):
            return torch.tensor(0.5), torch.tensor(3.0)  # not one per sample

    tokenizer = build_tiny_tokenizer()
    with pytest.raises(ValueError, match="one finite weight and one finite positive temperature per re-used sample"):
        OneWeightForAll(
            model=build_tiny_llama(tokenizer), args=config(tmp_path), train_dataset=addition_rows(),
            processing_class=tokenizer,
        )  # fmt: skip


def test_a_weighting_rule_giving_non_finite_weights_is_refused_at_construction(tmp_path):
    class InfiniteWeights(DynSDPBTrainer):
        def distillation_weights(self, stats):
            return torch.full_like(stats.uncertainty, math.inf), torch.full_like(stats.uncertainty, 3.0)

    tokenizer = build_tiny_tokenizer()
    with pytest.raises(ValueError, match="one finite weight"):
        InfiniteWeights(
            model=build_tiny_llama(tokenizer), args=config(tmp_path), train_dataset=addition_rows(),
            processing_class=tokenizer,
        )  # fmt: skip


def _train_until_stopped(trainer) -> tuple[str, dict[str, torch.Tensor]]:
    """Trains until the non-finite guard stops it; returns its message and the weights before and after."""
    weights = {}

    class KeepWeights(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            weights.update({n: p.detach().clone() for n, p in trainer.model.named_parameters()})

    trainer.add_callback(KeepWeights())
    with pytest.raises(FloatingPointError) as stopped:
        trainer.train()
    return str(stopped.value), weights


def test_a_temperature_that_overflows_the_gradients_stops_training_with_the_weights_intact(tmp_path):
    # the loss stays finite (the term is scaled by T^2 = 0) while its gradients are NaN
    trainer = make_trainer(tmp_path, dynsdpb_mode="constant", dynsdpb_temperature=1e-45)
    message, last_good = _train_until_stopped(trainer)
    assert "Training stopped at step 2, before its update: the gradient norm is nan" in message
    assert "dynsdpb_temperature=1e-45" in message and "temperature 1.401e-45" in message
    assert trainer.state.global_step == 1
    for name, param in trainer.model.named_parameters():
        assert param.isfinite().all() and torch.equal(param, last_good[name]), name


def test_a_distillation_term_that_overflows_stops_training_before_its_update(tmp_path):
    class HugeWeights(DynSDPBTrainer):
        def distillation_weights(self, stats):
            return torch.full_like(stats.uncertainty, 1e38), torch.full_like(stats.uncertainty, 3.0)

    tokenizer = build_tiny_tokenizer()
    trainer = HugeWeights(
        model=build_tiny_llama(tokenizer), args=config(tmp_path), train_dataset=addition_rows(),
        processing_class=tokenizer,
    )  # fmt: skip
    message, last_good = _train_until_stopped(trainer)
    assert "Training stopped at step 2, before its update: the loss is not finite" in message
    assert "distillation term inf" in message and "alpha 1e+38" in message
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param, last_good[name]), name
