"""DynSDPB under the setups where a CPU test and a GPU run differ: gradient checkpointing, `torch_compile`,
`device_map`, output layers PEFT or bitsandbytes touch, and the teacher cache restored on resume."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from peft import LoraConfig
from recipes import tiny_training_args
from tiny_models import addition_rows, build_tiny_llama, build_tiny_tokenizer
from transformers.testing_utils import CaptureLogger

from trl_selfdistill import BUNDLED_MODEL_NAME, DynSDPBConfig, DynSDPBTrainer, SDFTConfig, SDFTTrainer
from trl_selfdistill.dynsdpb import teacher_cache
from trl_selfdistill.dynsdpb.teacher_cache import TeacherCache
from trl_selfdistill.utils import check_trainable_dtypes, default_output_dir


def config(tmp_path, **overrides) -> DynSDPBConfig:
    # A random model's dynamic weight is about zero; these tests need the distillation term: constant mode.
    defaults = {"learning_rate": 5e-3, "max_steps": 3, "dynsdpb_mode": "constant"}
    return DynSDPBConfig(**tiny_training_args(tmp_path, **{**defaults, **overrides}))


def lora(**overrides) -> LoraConfig:
    return LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **overrides})


def losses(trainer) -> list[float]:
    """The logged total loss and distillation term of every step, flat."""
    return [e[key] for e in trainer.state.log_history if "loss" in e for key in ("loss", "distill/loss")]


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_gradient_checkpointing_reentrant_or_not_gives_the_same_training(tmp_path, tiny_model_dir, peft):
    runs = {}
    for name, checkpointing in [("off", None), ("reentrant", True), ("non-reentrant", False)]:
        args = config(
            tmp_path / name,
            gradient_checkpointing=checkpointing is not None,
            gradient_checkpointing_kwargs=None if checkpointing is None else {"use_reentrant": checkpointing},
        )
        trainer = DynSDPBTrainer(
            model=tiny_model_dir, args=args, train_dataset=addition_rows(), peft_config=lora() if peft else None
        )
        trainer.train()
        runs[name] = losses(trainer)
    assert runs["off"][-1] > 0
    for name in ("reentrant", "non-reentrant"):
        assert runs[name] == pytest.approx(runs["off"], rel=1e-5), name


@pytest.mark.slow
def test_torch_compile_trains_like_eager(tmp_path, tiny_model_dir):
    eager = DynSDPBTrainer(model=tiny_model_dir, args=config(tmp_path / "eager"), train_dataset=addition_rows())
    eager.train()
    compiled = DynSDPBTrainer(
        model=tiny_model_dir, args=config(tmp_path / "compiled", torch_compile=True), train_dataset=addition_rows()
    )
    compiled.train()
    assert losses(compiled) == pytest.approx(losses(eager), rel=1e-3)
    assert losses(compiled)[-1] > 0


def test_device_map_auto_trains(tmp_path, tiny_model_dir):
    trainer = DynSDPBTrainer(
        model=tiny_model_dir,
        args=config(tmp_path, model_init_kwargs={"device_map": "auto"}),
        train_dataset=addition_rows(),
        peft_config=lora(),
    )
    trainer.train()
    assert losses(trainer)[-1] > 0


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is not None, reason="Liger is installed here")
def test_liger_kernel_without_liger_is_refused_at_construction(tmp_path):
    never_loaded = str(tmp_path / "never-loaded")  # refused before loading anything, let alone rewriting
    with pytest.raises(ImportError, match="pip install liger-kernel"):
        DynSDPBTrainer(model=never_loaded, args=config(tmp_path, use_liger_kernel=True), train_dataset=addition_rows())
    sdft_args = SDFTConfig(output_dir=str(tmp_path / "sdft"), use_liger_kernel=True, use_cpu=True, bf16=False)
    with pytest.raises(ImportError, match="pip install liger-kernel"):
        SDFTTrainer(model=never_loaded, args=sdft_args, train_dataset=addition_rows())


@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None,
    reason="Liger's kernels are Triton GPU kernels",
)
def test_liger_kernels_train_like_the_plain_model(tmp_path, tiny_model_dir):
    """TRL applies Liger's layer kernels only (RMSNorm, RoPE, SwiGLU); DynSDPB's loss stays its own."""
    runs = {}
    for use_liger in (False, True):
        args = config(tmp_path / str(use_liger), bf16=True, use_liger_kernel=use_liger)
        trainer = DynSDPBTrainer(model=tiny_model_dir, args=args, train_dataset=addition_rows(), peft_config=lora())
        trainer.train()
        runs[use_liger] = losses(trainer)
    assert runs[True] == pytest.approx(runs[False], rel=2e-2, abs=1e-4) and runs[True][-1] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 mixed precision has a gradient scaler on GPUs only")
def test_fp16_trainable_weights_are_refused_at_construction_on_a_gpu(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match="float16 gradients"):
        DynSDPBTrainer(
            model=tiny_model_dir,
            args=config(tmp_path, fp16=True, model_init_kwargs={"dtype": "float16"}),
            train_dataset=addition_rows(),
        )


def test_an_offloaded_output_layer_is_refused_at_construction(tmp_path, tiny_model_dir):
    device_map = {"model": "cpu", "lm_head": "disk"}
    with pytest.raises(ValueError, match="offloaded"):
        DynSDPBTrainer(
            model=tiny_model_dir,
            args=config(tmp_path, model_init_kwargs={"device_map": device_map, "offload_folder": str(tmp_path)}),
            train_dataset=addition_rows(),
            peft_config=lora(),
        )


def test_lora_on_the_output_layer_is_refused_and_modules_to_save_trains_it(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match="lm_head"):  # TRL refuses it first, with the fix
        DynSDPBTrainer(
            model=tiny_model_dir,
            args=config(tmp_path),
            train_dataset=addition_rows(),
            peft_config=lora(target_modules=["q_proj", "lm_head"]),
        )
    trainer = DynSDPBTrainer(
        model=tiny_model_dir,
        args=config(tmp_path),
        train_dataset=addition_rows(),
        peft_config=lora(modules_to_save=["lm_head"]),
    )
    assert not trainer.teacher_cache.holds_hidden_states  # a trained output layer: the teacher is cached as logits
    head = trainer.model.get_base_model().get_output_embeddings()
    before = head.weight.detach().clone()
    trainer.train()
    assert not torch.equal(before, head.weight) and losses(trainer)[-1] > 0


def test_the_teacher_cache_is_restored_on_the_output_layer_device_in_the_configured_dtype(tmp_path, tiny_model_dir):
    first = DynSDPBTrainer(
        model=tiny_model_dir,
        args=config(tmp_path / "a", dynsdpb_teacher_cache_dtype="float32", save_strategy="steps", save_steps=2),
        train_dataset=addition_rows(),
        peft_config=lora(),
    )
    first.train()
    checkpoint = tmp_path / "a" / "out" / "checkpoint-2"
    resumed = DynSDPBTrainer(
        model=tiny_model_dir,
        args=config(tmp_path / "b", dynsdpb_teacher_cache_dtype="bfloat16"),
        train_dataset=addition_rows(),
        peft_config=lora(),
    )
    resumed._restore_teacher_cache(*resumed._read_teacher_cache(str(checkpoint)))  # what a resumed first step does
    device = resumed.model.get_base_model().get_output_embeddings().weight.device
    assert resumed.teacher_cache.step == 1 and resumed.teacher_cache.current  # written by the 2nd step's forwards
    for entry in resumed.teacher_cache.current.values():
        assert entry.states.dtype == torch.bfloat16 and entry.states.device == device
        assert entry.statistics.dtype == torch.float32 and entry.statistics.device == device


def test_a_cache_of_the_other_kind_is_dropped_with_a_warning():
    logits_cache = TeacherCache(torch.float32, holds_hidden_states=False)
    logits_cache.advance_to(0)
    logits_cache.put(3, torch.randn(5, 300), torch.tensor([0.5, 0.2]))
    hidden_cache = TeacherCache(torch.bfloat16, holds_hidden_states=True)
    with CaptureLogger(teacher_cache.logger) as captured:
        hidden_cache.load_state_dict(logits_cache.state_dict(), source="checkpoint-7/cache.pt")
    assert "checkpoint-7/cache.pt holds teacher logits" in captured.out
    assert hidden_cache.current == {} and hidden_cache.step == 0


def test_fp16_trainable_weights_with_the_gradient_scaler_are_refused(tiny_model_dir):
    model = build_tiny_llama(build_tiny_tokenizer()).half()
    with pytest.raises(ValueError, match="float16 gradients"):
        check_trainable_dtypes(model, uses_grad_scaler=True)
    check_trainable_dtypes(model, uses_grad_scaler=False)  # CPU `fp16=True` has no scaler: nothing to refuse
    check_trainable_dtypes(model.float(), uses_grad_scaler=True)


def test_reuse_fraction_is_validated_by_the_config(tmp_path):
    with pytest.raises(ValueError, match="dynsdpb_reuse_fraction"):
        config(tmp_path, dynsdpb_reuse_fraction=0.75)
    with pytest.raises(ValueError, match="per_device_train_batch_size=1"):
        config(tmp_path, per_device_train_batch_size=1)
    with pytest.warns(UserWarning, match=r"effective fraction 0\.4"):
        config(tmp_path, per_device_train_batch_size=5)


def test_default_output_dir_is_named_after_the_model():
    model = build_tiny_llama(build_tiny_tokenizer())
    model.config._name_or_path = "my-org/tiny-llama"
    assert default_output_dir(model, "DynSDPB") == "tiny-llama-DynSDPB"  # not `str(model)`
    assert default_output_dir("/models/Llama-2-7b-chat-hf/", "SDFT") == "Llama-2-7b-chat-hf-SDFT"
    assert default_output_dir(BUNDLED_MODEL_NAME, "SDFT") == "SmolLM2-135M-Instruct-SDFT"
