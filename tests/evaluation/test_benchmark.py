"""The forgetting benchmark end to end on a tiny local model, its resume, and its parts (arms, cache, table)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from safetensors.torch import load_file
from trl import SFTConfig

from trl_selfdistill import SDFTDynSDPBConfig
from trl_selfdistill.dynsdpb.config import DynSDPBConfig
from trl_selfdistill.evaluation.arms import ARM_RECORD_FILE, ARMS, arm_config, check_arms
from trl_selfdistill.evaluation.benchmark import RESULTS_DIR, run_forgetting_benchmark, same_updates_for_every_arm
from trl_selfdistill.evaluation.probes import ProbeArguments, ResultCache, probe_items, probe_settings
from trl_selfdistill.evaluation.report import CHART_FILE, REPORT_JSON, REPORT_MARKDOWN, markdown_table

PROBE_NAMES = ["gsm8k", "humaneval", "advbench", "advbench_jailbreak", "general"]


def arithmetic_dataset(n: int = 8) -> Dataset:
    return Dataset.from_list([{"prompt": f"What is {i} plus {i}?", "completion": f"It is {2 * i}."} for i in range(n)])


def shared_config(tmp_path, **overrides) -> SDFTDynSDPBConfig:
    defaults = dict(
        output_dir=str(tmp_path / "benchmark"),
        distill_cache_dir=str(tmp_path / "rewrite-cache"),
        distill_generation_kwargs={"max_new_tokens": 8},
        distill_keep_truncated=True,  # a random tiny model never ends a rewrite within 8 tokens
        distill_batch_size=4,
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        bf16=False,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        seed=3,
    )
    return SDFTDynSDPBConfig(**{**defaults, **overrides})


def tiny_probes(**overrides) -> ProbeArguments:
    defaults = dict(
        gsm8k_samples=2,
        humaneval_samples=2,
        advbench_samples=2,
        general_samples=2,
        gsm8k_max_new_tokens=6,
        humaneval_max_new_tokens=6,
        advbench_max_new_tokens=6,
        general_max_new_tokens=6,
        humaneval_timeout=5.0,
        eval_batch_size=4,
    )
    return ProbeArguments(**{**defaults, **overrides})


def lora() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def adapter_weights(arm_dir: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(arm_dir, "adapter_model.safetensors"))


def result_mtimes(output_dir: str) -> dict[str, float]:
    root = os.path.join(output_dir, RESULTS_DIR)
    return {
        os.path.join(model, name): os.stat(os.path.join(root, model, name)).st_mtime_ns
        for model in os.listdir(root)
        for name in os.listdir(os.path.join(root, model))
    }


def test_benchmark_end_to_end_then_resumes_without_redoing_work(tmp_path, tiny_model_dir):
    args = shared_config(tmp_path)
    report = run_forgetting_benchmark(tiny_model_dir, args, arithmetic_dataset(), tiny_probes(), peft_config=lora())
    output_dir = args.output_dir

    # Every arm trained: its adapter moved away from LoRA's identity start (B = 0), and the arms differ.
    weights = {arm: adapter_weights(os.path.join(output_dir, arm)) for arm in ARMS}
    for arm, tensors in weights.items():
        b_norm = sum(t.norm() for name, t in tensors.items() if "lora_B" in name)
        assert b_norm > 0, f"{arm} did not train"
    key = next(name for name in weights["sft"] if "lora_B" in name)
    assert not torch.equal(weights["sft"][key], weights["sdft"][key])
    assert not torch.equal(weights["dynsdpb"][key], weights["dlb"][key])  # dynamic vs constant weighting

    # The arms that rewrite recorded the rewrite and its distribution gap; both rewrote the same rows.
    records = {arm: json.loads(open(os.path.join(output_dir, arm, ARM_RECORD_FILE)).read()) for arm in ARMS}
    for arm in ("sdft", "sdft_dynsdpb"):
        assert records[arm]["distillation"]["total"] == 8
        assert records[arm]["distillation"]["seed_nll_reference"] > 0
    assert records["sdft"]["distillation"]["accepted"] == records["sdft_dynsdpb"]["distillation"]["accepted"]
    assert {records[arm]["global_step"] for arm in ARMS} == {2}  # the same updates for every arm

    # The report: every model and probe scored, as fractions; the similarity is to the seed model.
    assert report["models"] == ["seed", *ARMS]
    assert report["items"] == {"gsm8k": 2, "humaneval": 2, "advbench": 2, "advbench_jailbreak": 2, "general": 2}
    for model, row in report["scores"].items():
        for probe in ("gsm8k", "humaneval", "advbench", "advbench_jailbreak"):
            assert 0.0 <= row[probe] <= 1.0
        assert (row["general"] is None) == (model == "seed")
        if model != "seed":
            assert -1.0 <= row["general"] <= 1.0
    for model, errors in report["standard_errors"].items():  # binomial for the rates, over the 2 items
        rate = report["scores"][model]["advbench"]
        assert errors["advbench"] == pytest.approx((rate * (1 - rate) / 2) ** 0.5)
        assert (errors["general"] is None) == (model == "seed")
    assert report["lora"] == {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    saved = json.loads(open(os.path.join(output_dir, REPORT_JSON)).read())
    assert saved["scores"] == report["scores"]
    table = open(os.path.join(output_dir, REPORT_MARKDOWN)).read()
    assert table.count("\n| ") >= 6 and "SDFT data + DynSDPB loss" in table and "GSM8K (n=2)" in table
    for probe in PROBE_NAMES:
        chart = os.path.join(output_dir, CHART_FILE.format(probe=probe))
        assert open(chart, "rb").read(8) == b"\x89PNG\r\n\x1a\n"

    # The cached answers are the ones scored: the seed's GSM8K rate is its per-row outcomes.
    seed_gsm8k = json.loads(open(os.path.join(output_dir, RESULTS_DIR, "seed", "gsm8k.json")).read())["result"]
    assert report["scores"]["seed"]["gsm8k"] == sum(o["correct"] for o in seed_gsm8k["outputs"]) / 2

    # A rerun trains nothing and recomputes nothing; a changed probe setting recomputes only that probe.
    records_before = {arm: os.stat(os.path.join(output_dir, arm, ARM_RECORD_FILE)).st_mtime_ns for arm in ARMS}
    results_before = result_mtimes(output_dir)
    again = run_forgetting_benchmark(tiny_model_dir, args, arithmetic_dataset(), tiny_probes(), peft_config=lora())
    assert again["scores"] == report["scores"]
    assert {arm: os.stat(os.path.join(output_dir, arm, ARM_RECORD_FILE)).st_mtime_ns for arm in ARMS} == records_before
    assert result_mtimes(output_dir) == results_before

    more_gsm8k = tiny_probes(gsm8k_samples=3)
    run_forgetting_benchmark(tiny_model_dir, args, arithmetic_dataset(), more_gsm8k, peft_config=lora())
    after = result_mtimes(output_dir)
    changed = {path for path in after if after[path] != results_before[path]}
    assert changed == {os.path.join(model, "gsm8k.json") for model in ["seed", *ARMS]}


def test_a_dataset_one_arm_refuses_fails_before_any_arm_trains(tmp_path, tiny_model_dir):
    args = shared_config(tmp_path)
    # One row cannot fill DynSDPB's batches of new and re-used samples; vanilla SFT, listed first, could train on it.
    with pytest.raises(ValueError, match="The training dataset has 1 rows"):
        run_forgetting_benchmark(tiny_model_dir, args, arithmetic_dataset(1), tiny_probes(), peft_config=lora())
    assert not os.path.exists(args.output_dir)  # refused before the first arm trained


def test_arm_configs_share_the_settings_and_differ_in_the_mode(tmp_path):
    shared = shared_config(tmp_path, learning_rate=3e-4, distill_temperature=2.0)
    sft = arm_config(ARMS["sft"], shared, str(tmp_path / "sft"))
    dlb = arm_config(ARMS["dlb"], shared, str(tmp_path / "dlb"))
    dynamic = arm_config(ARMS["dynsdpb"], shared, str(tmp_path / "dynsdpb"))
    assert type(sft) is SFTConfig and type(dlb) is DynSDPBConfig
    assert sft.learning_rate == dlb.learning_rate == 3e-4 and sft.max_steps == dlb.max_steps == 2
    assert dlb.distill_mode == "constant" and dynamic.distill_mode == "dynamic"
    assert dlb.distill_temperature == 2.0 and dlb.output_dir == str(tmp_path / "dlb")


def test_every_arm_gets_vanilla_sft_updates_when_max_steps_is_unset(tmp_path):
    args = shared_config(tmp_path, max_steps=-1, num_train_epochs=3, gradient_accumulation_steps=2)
    assert same_updates_for_every_arm(args, 20).max_steps == 3 * 3  # ceil(20 / (4 x 2)) updates per epoch
    assert args.max_steps == -1  # the caller's config is left alone
    assert same_updates_for_every_arm(shared_config(tmp_path), 20).max_steps == 2


def test_bad_arms_and_probe_settings_fail_early():
    with pytest.raises(ValueError, match=r"Unknown benchmark arm\(s\) \['sfdt'\]"):
        check_arms(["sft", "sfdt"])
    with pytest.raises(ValueError, match="listed twice"):
        check_arms(["sft", "sft"])
    with pytest.raises(ValueError, match=r"Unknown probe\(s\) \['mmlu'\]"):
        ProbeArguments(probes=["gsm8k", "mmlu"])
    with pytest.raises(ValueError, match="`advbench_samples` must be at least 1"):
        ProbeArguments(advbench_samples=0)
    with pytest.raises(ValueError, match="eval_batch_size"):
        ProbeArguments(eval_batch_size="big")
    assert ProbeArguments(eval_batch_size="8").eval_batch_size == 8


def test_probe_samples_are_the_same_for_a_seed_and_change_with_it():
    args = tiny_probes(gsm8k_samples=5, advbench_samples=4)
    assert probe_items("gsm8k", args) == probe_items("gsm8k", tiny_probes(gsm8k_samples=5))
    assert probe_items("gsm8k", args) != probe_items("gsm8k", tiny_probes(gsm8k_samples=5, probe_seed=1))
    assert probe_items("advbench", args) == probe_items("advbench_jailbreak", args)  # the same behaviours, both ways
    assert len(probe_items("humaneval", tiny_probes(humaneval_samples=None))) == 164


def test_result_cache_reuses_only_results_of_the_same_settings(tmp_path):
    cache = ResultCache(str(tmp_path))
    settings = probe_settings("humaneval", tiny_probes())
    cache.put("sft", "humaneval", settings, {"pass_at_1": 0.5})
    assert cache.get("sft", "humaneval", settings) == {"pass_at_1": 0.5}
    assert cache.get("sft", "humaneval", probe_settings("humaneval", tiny_probes(humaneval_timeout=9.0))) is None
    assert cache.get("sdft", "humaneval", settings) is None
    with open(cache.path("sft", "gsm8k"), "w") as handle:
        handle.write('{"probe": "gsm8k", "sett')  # cut off by a crash
    assert cache.get("sft", "gsm8k", settings) is None


def test_markdown_table_in_the_papers_shape():
    report = {
        "models": ["seed", "sft", "sdft"],
        "labels": {"seed": "seed", "sft": "vanilla SFT", "sdft": "SDFT"},
        "items": {"gsm8k": 50, "advbench": 20, "general": 10},
        "scores": {
            "seed": {"gsm8k": 0.02, "advbench": 0.95, "general": None},
            "sft": {"gsm8k": 0.04, "advbench": 0.8, "general": 0.75},
            "sdft": {"gsm8k": 0.06, "advbench": 0.9, "general": 0.8512},
        },
        "distribution_gap": {
            "sdft": {"total": 64, "accepted": 20, "seed_nll_reference": 1.4471, "seed_nll_distilled": 1.3111}
        },
    }
    assert markdown_table(report) == (
        "| model | GSM8K (n=50) | raw safe (n=20) | similarity to seed (n=10) |\n"
        "|---|---|---|---|\n"
        "| seed | 2.0 | 95.0 | — |\n"
        "| vanilla SFT | 4.0 | 80.0 | 0.750 |\n"
        "| SDFT | 6.0 | 90.0 | 0.851 |\n"
        "\nDistribution gap of the training targets (the seed model's mean per-token NLL, lower is closer to its "
        "own distribution):\n\n| arm | rewrites accepted | NLL of the references | NLL of the targets trained on |\n"
        "|---|---|---|---|\n"
        "| SDFT | 20/64 | 1.447 | 1.311 |\n"
    )
    report["standard_errors"] = {
        "seed": {"gsm8k": 0.0198, "advbench": 0.0487, "general": None},
        "sft": {"gsm8k": 0.0277, "advbench": 0.0894, "general": 0.021},
        "sdft": {"gsm8k": 0.0336, "advbench": 0.0671, "general": 0.0104},
    }
    table = markdown_table(report)
    assert "| vanilla SFT | 4.0 ± 2.8 | 80.0 ± 8.9 | 0.750 ± 0.021 |\n" in table
    assert "| seed | 2.0 ± 2.0 | 95.0 ± 4.9 | — |\n" in table
    assert "± one standard error" in table
