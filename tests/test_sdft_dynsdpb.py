"""SDFTDynSDPBTrainer on a tiny local Llama: the SDFT rewrite, then DynSDPB training on it; its config."""

from __future__ import annotations

import json
import math
import textwrap

import pytest
from datasets import Dataset
from huggingface_hub import ModelCard
from peft import LoraConfig
from recipes import changed, snapshot, tiny_training_args
from tiny_models import addition_rows, build_tiny_llama, build_tiny_tokenizer
from trl import TrlParser

from trl_selfdistill import (
    DynSDPBConfig,
    DynSDPBTrainer,
    SDFTConfig,
    SDFTDynSDPBConfig,
    SDFTDynSDPBTrainer,
    SDFTTrainer,
    sdft_dynsdpb,
)
from trl_selfdistill.dynsdpb import sampler
from trl_selfdistill.dynsdpb import trainer as dynsdpb_trainer
from trl_selfdistill.dynsdpb.trainer import TEACHER_CACHE_FILE
from trl_selfdistill.sdft.outputs import DISTILLED_DATASET_FILE, REPORT_FILE, ROWS_FILE


def config(tmp_path, **overrides) -> SDFTDynSDPBConfig:
    rewrite = dict(
        sdft_cache_dir=str(tmp_path / "cache"),
        sdft_generation_kwargs={"max_new_tokens": 8},
        sdft_keep_truncated=True,  # a random tiny model never ends a rewrite within 8 tokens
        sdft_batch_size=8,
    )
    return SDFTDynSDPBConfig(
        **tiny_training_args(tmp_path, learning_rate=5e-3, max_steps=4, **{**rewrite, **overrides})
    )


def test_lora_run_rewrites_then_trains_with_the_dynsdpb_loss(tmp_path):
    tokenizer = build_tiny_tokenizer()
    dataset = addition_rows(8)
    trainer = SDFTDynSDPBTrainer(
        model=build_tiny_llama(tokenizer),
        args=config(tmp_path, save_strategy="steps", save_steps=2),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    out = tmp_path / "out"

    # The SDFT rewrite, as SDFTTrainer does it.
    report = trainer.distillation_report
    assert report["total"] == report["rows"] == len(dataset)
    assert report["accepted"] + report["fallback"] == report["total"]
    assert json.loads((out / REPORT_FILE).read_text())["total"] == len(dataset)
    assert len((out / ROWS_FILE).read_text().splitlines()) == len(dataset)
    distilled = [json.loads(line) for line in (out / DISTILLED_DATASET_FILE).read_text().splitlines()]
    assert [row["prompt"] for row in distilled] == dataset["prompt"]
    trained_on = [text.removesuffix(tokenizer.eos_token) for text in trainer.train_dataset["completion"]]
    assert trained_on == [row["completion"] for row in distilled] != dataset["completion"]
    logged = next(entry for entry in trainer.state.log_history if "distill/total" in entry)
    assert logged["distill/accepted"] == report["accepted"]

    # DynSDPB's overlapping batches are drawn from the tokenized distilled training set.
    batch = next(iter(trainer.get_train_dataloader()))
    assert not batch["dynsdpb_reused"].any()  # the first step has nothing to re-use
    for row, index in enumerate(batch["dynsdpb_index"].tolist()):
        served = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        assert served == trainer.train_dataset[index]["input_ids"]

    before = snapshot(trainer.model)
    trainer.train()
    trained, frozen = changed(before, trainer.model)
    assert trained and all("lora_" in name for name in trained) and not frozen

    # DynSDPB's loss and metrics: re-used samples, distilled, from the second step on.
    steps = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(steps) == 4 and steps[0]["distill/reused_fraction"] == 0
    for entry in steps[1:]:
        assert entry["distill/reused_fraction"] == pytest.approx(0.5)
        assert entry["distill/loss"] > 0 and entry["loss"] == pytest.approx(entry["ce_loss"] + entry["distill/loss"])
        assert all(math.isfinite(entry[f"distill/mean_{name}"]) for name in ("alpha", "temperature", "uncertainty"))
    # SDFT's counts and DynSDPB's training metrics share the `distill/` prefix, never a name.
    dynsdpb_names = {key for entry in steps for key in entry if key.startswith("distill/")}
    assert {f"distill/{key}" for key in report} & dynsdpb_names == set()
    assert (out / "checkpoint-2" / TEACHER_CACHE_FILE.format(rank=0)).is_file()

    # One card, written once per save: both methods, both papers, the report and the DynSDPB settings.
    trainer.save_model()
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "with SDFT + DynSDPB: `SDFTDynSDPBTrainer`" in card and "combines the methods of" in card
    for paper in (SDFTTrainer._paper, DynSDPBTrainer._paper):
        assert f"https://huggingface.co/papers/{paper['id']}" in card and paper["citation"] in card
    assert card.count("## SDFT distillation report") == card.count("## DynSDPB settings") == 1
    assert card.index("## SDFT distillation report") < card.index("## DynSDPB settings")
    assert f"rewrote {report['total'] - report['skipped']} of the {report['total']} responses" in card
    assert "In each per-device batch of 4 samples, 2 repeat" in card and "| `dynsdpb_alpha` | `1.0` |" in card
    assert "| `sdft_cache_dir`" not in card and report["cache_dir"] not in card  # SDFT's fields stay out of it
    metadata = ModelCard.load(out / "README.md").data
    assert {"sdft", "dynsdpb", "lora"} <= set(metadata.tags) and metadata.library_name == "peft"
    trainer.create_model_card()
    assert (out / "README.md").read_text(encoding="utf-8") == card


def test_max_length_drops_leaving_too_few_rows_for_a_step_are_refused(tmp_path):
    tokenizer = build_tiny_tokenizer()
    long_prompt = "Add these numbers: " + " + ".join(str(i) for i in range(40))
    rows = [{"prompt": long_prompt, "completion": "A lot."}] * 3 + [{"prompt": "Add 1 and 2.", "completion": "3."}]
    with pytest.raises(ValueError, match=r"After the SDFT rewrite, `max_length=24` dropped 3 rows"):
        SDFTDynSDPBTrainer(
            model=build_tiny_llama(tokenizer),
            args=config(tmp_path, max_length=24),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )
    assert json.loads((tmp_path / "out" / REPORT_FILE).read_text())["dropped_by_max_length"] == 3


def test_config_parses_from_yaml_with_the_fields_of_both_methods(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            output_dir: {tmp_path / "out"}
            use_cpu: true
            per_device_train_batch_size: 4
            sdft_template: general
            sdft_checker: math
            sdft_generation_kwargs: {{max_new_tokens: 16, temperature: 0.7}}
            sdft_batch_size: 2
            dynsdpb_mode: constant
            dynsdpb_alpha: 0.5
            dynsdpb_reuse_fraction: 0.25
            dynsdpb_loss_chunk_size: 128
            """
        )
    )
    (args,) = TrlParser((SDFTDynSDPBConfig,)).parse_args_and_config(
        ["--config", str(path), "--dynsdpb_temperature", "2.0"]
    )
    assert isinstance(args, SDFTConfig) and isinstance(args, DynSDPBConfig)
    assert (args.sdft_template, args.sdft_checker, args.sdft_batch_size) == ("general", "math", 2)
    assert args.sdft_generation_kwargs == {"max_new_tokens": 16, "temperature": 0.7}
    assert (args.dynsdpb_mode, args.dynsdpb_alpha, args.dynsdpb_temperature) == ("constant", 0.5, 2.0)
    assert (args.reuse_count, args.dynsdpb_loss_chunk_size) == (1, 128)
    assert args.activation_checkpointing is True  # `CheckpointingByItsNewName` ran once, under both configs


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sdft_batch_size": 0}, "sdft_batch_size"),  # SDFTConfig's checks
        ({"sdft_engine": "server"}, "sdft_server_url"),
        ({"sdft_template": "no placeholders"}, "instruction"),
        ({"dynsdpb_alpha": -1.0}, "dynsdpb_alpha"),  # DynSDPBConfig's checks
        ({"dynsdpb_reuse_fraction": 0.75}, "dynsdpb_reuse_fraction"),
        ({"dynsdpb_teacher_cache_dtype": "int8"}, "dynsdpb_teacher_cache_dtype"),
    ],
)
def test_a_bad_value_of_either_method_fails_at_construction(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        config(tmp_path, **overrides)


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "message"),
    [
        (lambda path: SDFTConfig(**tiny_training_args(path)), {}, TypeError, "SDFTDynSDPBConfig"),
        (lambda path: DynSDPBConfig(**tiny_training_args(path)), {}, TypeError, "SDFTDynSDPBConfig"),
        (lambda path: config(path, packing=True), {}, ValueError, "packing=False"),  # DynSDPB's checks
        (lambda path: config(path), {"compute_loss_func": lambda *a, **k: 0}, ValueError, "compute_loss_func"),
        (lambda path: config(path), {"formatting_func": str}, ValueError, "formatting_func"),  # SDFT's checks
    ],
)
def test_bad_input_fails_before_loading_anything(tmp_path, args, kwargs, error, message):
    with pytest.raises(error, match=message):  # a model that does not exist: nothing was loaded
        SDFTDynSDPBTrainer(model="no-such/model", args=args(tmp_path), train_dataset=addition_rows(8), **kwargs)


def test_an_iterable_dataset_is_refused_by_dynsdpb_before_sdft_reads_it(tmp_path):
    dataset = addition_rows(8).to_iterable_dataset()
    with pytest.raises(TypeError, match="map-style"):
        SDFTDynSDPBTrainer(model="no-such/model", args=config(tmp_path), train_dataset=dataset)


def test_each_check_runs_once_per_construction(tmp_path, monkeypatch):
    """One rewrite step in front of one trainer: DynSDPB's pre-load checks and its dataset size check run once."""
    calls = {"check_inputs": 0, "check_dataset_size": 0}
    check_inputs, check_dataset_size = DynSDPBTrainer.check_inputs, sampler.check_dataset_size

    def counting_check_inputs(*args, **kwargs):
        calls["check_inputs"] += 1
        return check_inputs(*args, **kwargs)

    def counting_check_dataset_size(*args, **kwargs):
        calls["check_dataset_size"] += 1
        return check_dataset_size(*args, **kwargs)

    monkeypatch.setattr(DynSDPBTrainer, "check_inputs", staticmethod(counting_check_inputs))
    for module in (dynsdpb_trainer, sdft_dynsdpb):
        monkeypatch.setattr(module, "check_dataset_size", counting_check_dataset_size)
    tokenizer = build_tiny_tokenizer()
    SDFTDynSDPBTrainer(
        model=build_tiny_llama(tokenizer),
        args=config(tmp_path),
        train_dataset=addition_rows(8),
        processing_class=tokenizer,
    )
    assert calls == {"check_inputs": 1, "check_dataset_size": 1}
