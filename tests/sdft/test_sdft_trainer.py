"""SDFTTrainer end to end on a tiny local Llama: rewrite, then a few SFT steps (LoRA and 4-bit QLoRA)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from datasets import Dataset, DatasetDict
from peft import LoraConfig
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from trl_selfdistill import SDFTConfig, SDFTTrainer, distill_dataset
from trl_selfdistill.sdft.outputs import DISTILLED_DATASET_FILE, REPORT_FILE
from trl_selfdistill.sdft.rewrite import engine_from_config
from trl_selfdistill.sdft.spec import DistillSpec


def arithmetic_dataset(n: int = 6) -> Dataset:
    return Dataset.from_list([{"prompt": f"What is {i} plus {i}?", "completion": f"It is {2 * i}."} for i in range(n)])


def sdft_config(tmp_path, **overrides) -> SDFTConfig:
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        sdft_cache_dir=str(tmp_path / "cache"),
        sdft_generation_kwargs={"max_new_tokens": 8},
        sdft_keep_truncated=True,  # a random tiny model never ends a rewrite within 8 tokens
        sdft_batch_size=4,
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        bf16=False,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
    )
    return SDFTConfig(**{**defaults, **overrides})


def lora() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def split_parameters(model) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    params = {name: p.detach().clone().float() for name, p in model.named_parameters()}
    adapter = {n: p for n, p in params.items() if "lora_" in n}
    base = {n: p for n, p in params.items() if "lora_" not in n}
    return adapter, base


def test_lora_trains_on_the_distilled_targets(tmp_path, tiny_tokenizer, make_tiny_llama):
    dataset = arithmetic_dataset()
    trainer = SDFTTrainer(
        model=make_tiny_llama(tiny_tokenizer),
        args=sdft_config(tmp_path),
        train_dataset=dataset,
        processing_class=tiny_tokenizer,
        peft_config=lora(),
    )
    report = trainer.distillation_report
    assert report["total"] == report["rows"] == len(dataset)
    assert report["accepted"] + report["fallback"] == report["total"]

    # The trained-on targets are the distilled responses, not the references.
    distilled = [json.loads(line) for line in open(tmp_path / "out" / DISTILLED_DATASET_FILE)]
    assert [row["prompt"] for row in distilled] == dataset["prompt"]
    trained_on = [text.removesuffix(tiny_tokenizer.eos_token) for text in trainer.train_dataset["completion"]]
    assert trained_on == [row["completion"] for row in distilled]
    assert trained_on != dataset["completion"]
    for row in trainer.train_dataset:
        target_ids = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100]
        expected = tiny_tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
        assert target_ids[: len(expected)] == expected
    assert json.load(open(tmp_path / "out" / REPORT_FILE))["total"] == len(dataset)
    logged = next(entry for entry in trainer.state.log_history if "distill/total" in entry)
    assert logged["distill/accepted"] == report["accepted"]

    adapter_before, base_before = split_parameters(trainer.model)
    trainer.train()
    adapter_after, base_after = split_parameters(trainer.model)
    assert any(not torch.equal(adapter_before[n], adapter_after[n]) for n in adapter_before)
    assert all(torch.equal(base_before[n], base_after[n]) for n in base_before)

    trainer.create_model_card()  # also what `push_to_hub` and every checkpoint do
    card = (tmp_path / "out" / "README.md").read_text()
    assert "SDFT distillation report" in card and f"rewrote {len(dataset)} of the {len(dataset)} responses" in card


def test_rejected_rewrites_fall_back_to_the_reference(tmp_path, tiny_tokenizer, make_tiny_llama):
    dataset = arithmetic_dataset(4)

    def reject_all(rewrite, reference, row):
        return False

    trainer = SDFTTrainer(
        model=make_tiny_llama(tiny_tokenizer),
        args=sdft_config(tmp_path, sdft_checker=reject_all),
        train_dataset=dataset,
        processing_class=tiny_tokenizer,
    )
    assert trainer.distillation_report["fallback"] == 4
    assert trainer.distillation_report["rejected_checker"] == 4
    trained_on = [text.removesuffix(tiny_tokenizer.eos_token) for text in trainer.train_dataset["completion"]]
    assert trained_on == dataset["completion"]


def test_messages_rewrite_every_assistant_turn(tmp_path, tiny_tokenizer, make_tiny_llama):
    conversation = [
        {"role": "user", "content": "Say one."},
        {"role": "assistant", "content": "one"},
        {"role": "user", "content": "Say two."},
        {"role": "assistant", "content": "two"},
    ]
    dataset = Dataset.from_list([{"messages": conversation}] * 2)
    result = distill_dataset(
        make_tiny_llama(tiny_tokenizer),
        tiny_tokenizer,
        dataset,
        generation_kwargs={"max_new_tokens": 6},
        keep_truncated=True,  # a random tiny model never ends a rewrite within 6 tokens
        cache_dir=tmp_path,
        show_progress=False,
    )
    assert result.report["total"] == 4 and result.report["rows"] == 2
    for row in result.dataset["messages"]:
        assert [m["role"] for m in row] == ["user", "assistant", "user", "assistant"]
        assert [m["content"] for m in row[::2]] == ["Say one.", "Say two."]
        assert [m["content"] for m in row[1::2]] != ["one", "two"]


def test_same_seed_same_rewrites_and_adapter_is_disabled(tmp_path, tiny_tokenizer, make_tiny_llama):
    from peft import get_peft_model

    dataset = arithmetic_dataset(4)
    kwargs = dict(generation_kwargs={"max_new_tokens": 8}, batch_size=2, show_progress=False)
    base = make_tiny_llama(tiny_tokenizer)
    first = distill_dataset(base, tiny_tokenizer, dataset, cache_dir=tmp_path / "a", **kwargs)
    second = distill_dataset(base, tiny_tokenizer, dataset, cache_dir=tmp_path / "b", **kwargs)
    assert second.report["generated"] == 4
    assert first.dataset["completion"] == second.dataset["completion"]

    # A PEFT model with a non-trivial adapter still rewrites as the seed model does.
    peft_model = get_peft_model(make_tiny_llama(tiny_tokenizer), lora())
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 1.0)
    third = distill_dataset(peft_model, tiny_tokenizer, dataset, cache_dir=tmp_path / "c", **kwargs)
    assert third.dataset["completion"] == first.dataset["completion"]
    # ... while the adapter really does change the model's outputs.
    ids = tiny_tokenizer("What is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        with_adapter = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            without_adapter = peft_model(input_ids=ids).logits
    assert not torch.allclose(with_adapter, without_adapter)


@pytest.mark.parametrize("reentrant", [True, False])
def test_rewrite_from_a_model_in_training_mode_with_gradient_checkpointing(
    tmp_path, tiny_tokenizer, make_tiny_llama, reentrant
):
    """A model handed over mid-training (train mode, checkpointing on) rewrites as in eval mode, then trains on."""

    def distilled(directory):
        return [json.loads(line)["completion"] for line in open(directory / "out" / DISTILLED_DATASET_FILE)]

    reference = tmp_path / "eval-mode"
    SDFTTrainer(
        model=make_tiny_llama(tiny_tokenizer).eval(),
        args=sdft_config(reference, gradient_checkpointing=False),
        train_dataset=arithmetic_dataset(4),
        processing_class=tiny_tokenizer,
    )
    model = make_tiny_llama(tiny_tokenizer)
    model.gradient_checkpointing_enable({"use_reentrant": reentrant})
    model.train()
    trainer = SDFTTrainer(
        model=model,
        args=sdft_config(tmp_path, gradient_checkpointing_kwargs={"use_reentrant": reentrant}),
        train_dataset=arithmetic_dataset(4),
        processing_class=tiny_tokenizer,
        peft_config=lora(),
    )
    assert trainer.distillation_report["generated"] == 4
    assert distilled(tmp_path) == distilled(reference)
    base = trainer.model.get_base_model()
    assert base.training and base.is_gradient_checkpointing  # left as it was handed over
    adapter_before, _ = split_parameters(trainer.model)
    trainer.train()
    adapter_after, _ = split_parameters(trainer.model)
    assert any(not torch.equal(adapter_before[n], adapter_after[n]) for n in adapter_before)


def test_qlora_4bit_path(tmp_path, tiny_tokenizer, make_tiny_llama):
    model_dir = tmp_path / "tiny-llama"
    make_tiny_llama(tiny_tokenizer).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    trainer = SDFTTrainer(
        model=str(model_dir),
        args=sdft_config(tmp_path),
        train_dataset=arithmetic_dataset(4),
        peft_config=lora(),
        quantization_config=quantization,
    )
    assert trainer.model.get_base_model().is_loaded_in_4bit
    assert trainer.distillation_report["generated"] == 4
    adapter_before, base_before = split_parameters(trainer.model)
    trainer.train()
    adapter_after, base_after = split_parameters(trainer.model)
    assert any(not torch.equal(adapter_before[n], adapter_after[n]) for n in adapter_before)
    assert all(torch.equal(base_before[n], base_after[n]) for n in base_before)


@pytest.mark.parametrize(
    ("dataset", "overrides", "message"),
    [
        (Dataset.from_list([{"question": "q", "answer": "a"}]), {}, "gsm8k_to_prompt_completion"),
        (Dataset.from_list([{"text": "a whole document"}]), {}, "prompt-completion"),
        (Dataset.from_dict({"prompt": [], "completion": []}), {}, "empty"),
        (arithmetic_dataset(2), {"sdft_checker": "maths"}, "maths"),
        (arithmetic_dataset(2), {"sdft_template": "mathematics"}, "mathematics"),
        (arithmetic_dataset(2), {"sdft_generation_kwargs": {"temprature": 0.5}}, "temprature"),
    ],
)
def test_bad_input_fails_at_construction_before_loading(tmp_path, tiny_tokenizer, dataset, overrides, message):
    # The model path does not exist: the error must come from validation, before any loading or generation.
    with pytest.raises(ValueError, match=message):
        SDFTTrainer(
            model=str(tmp_path / "never-loaded"),
            args=sdft_config(tmp_path, **overrides),
            train_dataset=dataset,
            processing_class=tiny_tokenizer,
        )
    assert not os.path.exists(tmp_path / "out")


def test_no_chat_template_fails_at_construction(tmp_path, make_tiny_tokenizer):
    (tmp_path / "never-loaded").mkdir()  # an existing directory with no weights: the error must come before loading
    with pytest.raises(ValueError, match="chat template"):
        SDFTTrainer(
            model=str(tmp_path / "never-loaded"),
            args=sdft_config(tmp_path),
            train_dataset=arithmetic_dataset(2),
            processing_class=make_tiny_tokenizer(chat_template=None),
        )


def test_qlora_can_rewrite_with_the_unquantized_seed_weights(tmp_path, tiny_tokenizer, make_tiny_llama):
    model_dir = tmp_path / "tiny-llama"
    make_tiny_llama(tiny_tokenizer).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    dataset = arithmetic_dataset(4)
    args = sdft_config(tmp_path, sdft_unquantized_seed=True, bf16=True, use_cpu=True)
    # The cache filled by the original weights in the compute dtype: the trainer must find all of it there.
    original = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    expected = distill_dataset(
        original, tiny_tokenizer, dataset, DistillSpec.from_config(args), batch_size=4, seed=args.seed,
        cache_dir=args.sdft_cache_dir, show_progress=False,
    )  # fmt: skip
    assert expected.report["generated"] == 4

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype="bfloat16")
    trainer = SDFTTrainer(
        model=str(model_dir), args=args, train_dataset=dataset, peft_config=lora(), quantization_config=quantization
    )
    assert (trainer.distillation_report["generated"], trainer.distillation_report["from_cache"]) == (0, 4)
    assert trainer.model.get_base_model().is_loaded_in_4bit  # training itself stays QLoRA

    args.sdft_cache_dir = str(tmp_path / "other-cache")  # without the option, the 4-bit weights rewrite
    args.sdft_unquantized_seed = False
    quantized = SDFTTrainer(
        model=str(model_dir), args=args, train_dataset=dataset, peft_config=lora(), quantization_config=quantization
    )
    assert quantized.distillation_report["generated"] == 4


def test_decoding_options_are_resolved_once_and_engine_keys_refused(tiny_tokenizer, make_tiny_llama):
    assert SDFTConfig(use_cpu=True, sdft_generation_kwargs='{"max_new_tokens": 7}').sdft_generation_kwargs == {
        "max_new_tokens": 7
    }
    with pytest.raises(ValueError, match="pad_token_id"):
        SDFTConfig(use_cpu=True, sdft_generation_kwargs={"pad_token_id": 0})
    with pytest.raises(ValueError, match="`sdft_batch_size` must be an integer >= 1, got 'many'"):
        SDFTConfig(use_cpu=True, sdft_batch_size="many")
    with pytest.raises(ValueError, match="`sdft_batch_size` must be an integer >= 1, got 0"):
        SDFTConfig(use_cpu=True, sdft_batch_size=0)
    with pytest.raises(ValueError, match="sdft_server_url"):
        SDFTConfig(use_cpu=True, sdft_engine="server")
    with pytest.raises(ValueError, match="sdft_keep_truncated` must be True or False"):
        SDFTConfig(use_cpu=True, sdft_keep_truncated="maybe")
    with pytest.raises(ValueError, match="disable_compile"):
        SDFTConfig(use_cpu=True, sdft_generation_kwargs={"disable_compile": False})
    args = SDFTConfig(use_cpu=True, sdft_compile=True, sdft_batch_size=3)
    engine = engine_from_config(args, make_tiny_llama(tiny_tokenizer), tiny_tokenizer)
    assert (engine.compile, engine.batch_size, engine.static_cache) == (True, 3, False)  # no static cache on a CPU
    default = engine_from_config(SDFTConfig(use_cpu=True), make_tiny_llama(tiny_tokenizer), tiny_tokenizer)
    assert default.batch_size == "auto"  # `sdft_batch_size=None`: sized from free memory


def test_a_dataset_dict_or_nested_messages_are_named_at_construction(tmp_path, tiny_tokenizer):
    def construct(dataset):
        SDFTTrainer(model=str(tmp_path / "never-loaded"), args=sdft_config(tmp_path), train_dataset=dataset,
                    processing_class=tiny_tokenizer)  # fmt: skip

    with pytest.raises(TypeError, match=r"DatasetDict of splits \['test', 'train'\].*dataset\['train'\]"):
        construct(DatasetDict({"train": arithmetic_dataset(2), "test": arithmetic_dataset(2)}))
    user, assistant = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}
    with pytest.raises(ValueError, match=r"Row 0, `messages`, message 0: .* nested list"):
        construct(Dataset.from_list([{"messages": [[user, assistant]]}]))
    with pytest.raises(ValueError, match=r"Row 0, `completion`, message 0: .* got str"):
        construct(Dataset.from_list([{"prompt": [user], "completion": ["Hello"]}]))
    assert not os.path.exists(tmp_path / "out")
