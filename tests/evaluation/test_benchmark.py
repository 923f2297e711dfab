"""The forgetting benchmark end to end on a tiny local model, its resume, and its parts (arms, cache, table)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from safetensors.torch import load_file
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from trl_selfdistill import SDFTDynSDPBConfig
from trl_selfdistill.dynsdpb.config import DynSDPBConfig
from trl_selfdistill.evaluation.arms import (
    ARM_RECORD_FILE,
    ARMS,
    arm_config,
    arm_record,
    check_arm_inputs,
    check_arms,
    train_arm,
    weights_digest,
)
from trl_selfdistill.evaluation.benchmark import (
    RESULTS_DIR,
    arm_dir,
    check_seeds,
    run_forgetting_benchmark,
    same_updates_for_every_arm,
)
from trl_selfdistill.evaluation.ifeval_floor import IFEVAL_HARD_KEYS
from trl_selfdistill.evaluation.probes import ProbeArguments, ResultCache, probe_items, probe_settings
from trl_selfdistill.evaluation.report import CHART_FILE, REPORT_JSON, REPORT_MARKDOWN, recorded_training_settings
from trl_selfdistill.sdft.config import SDFTConfig

PROBE_NAMES = ["gsm8k", "humaneval", "advbench", "advbench_jailbreak", "general"]


def arithmetic_dataset(n: int = 8) -> Dataset:
    return Dataset.from_list([{"prompt": f"What is {i} plus {i}?", "completion": f"It is {2 * i}."} for i in range(n)])


def shared_config(tmp_path, **overrides) -> SDFTDynSDPBConfig:
    defaults = dict(
        output_dir=str(tmp_path / "benchmark"),
        sdft_cache_dir=str(tmp_path / "rewrite-cache"),
        sdft_generation_kwargs={"max_new_tokens": 8},
        sdft_keep_truncated=True,  # a random tiny model never ends a rewrite within 8 tokens
        sdft_batch_size=4,
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
        addition_samples=2,
        ifeval_samples=3,
        addition_max_new_tokens=6,
        ifeval_max_new_tokens=6,
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
    """`{<model>/<probe>.json: mtime}` for every cached result (`seed/...` and `<arm>/seed-<seed>/...`)."""
    root = os.path.join(output_dir, RESULTS_DIR)
    return {
        os.path.relpath(os.path.join(folder, name), root): os.stat(os.path.join(folder, name)).st_mtime_ns
        for folder, _, names in os.walk(root)
        for name in names
        if name.endswith(".json")
    }


def record_mtimes(output_dir: str) -> dict[str, float]:
    return {
        path: os.stat(path).st_mtime_ns
        for path in (
            os.path.join(output_dir, arm, f"seed-{seed}", ARM_RECORD_FILE) for arm in HEADLINE_ARMS for seed in SEEDS
        )
    }


HEADLINE_ARMS = ["sft", "sdft", "dynsdpb"]
SEEDS = [3, 4]
TINY_PROBES = ["addition", "ifeval", "general"]


def runs_of(arms=HEADLINE_ARMS, seeds=SEEDS) -> list[str]:
    return [f"{arm}/seed-{seed}" for seed in seeds for arm in arms]


def test_benchmark_end_to_end_with_two_seeds_then_resumes_without_redoing_work(tmp_path, tiny_model_dir):
    args = shared_config(tmp_path)
    probes = tiny_probes(probes=TINY_PROBES)

    def run(**overrides):
        config = shared_config(tmp_path, **overrides)
        return run_forgetting_benchmark(
            tiny_model_dir, config, arithmetic_dataset(), probes, HEADLINE_ARMS, seeds=SEEDS, peft_config=lora()
        )

    report = run()
    output_dir = args.output_dir

    # Every arm trained once per seed: each adapter moved away from LoRA's identity start, and the seeds differ.
    weights = {(arm, seed): adapter_weights(arm_dir(output_dir, arm, seed)) for arm in HEADLINE_ARMS for seed in SEEDS}
    for run_key, tensors in weights.items():
        assert sum(t.norm() for name, t in tensors.items() if "lora_B" in name) > 0, f"{run_key} did not train"
    key = next(name for name in weights["sft", 3] if "lora_B" in name)
    assert not torch.equal(weights["sft", 3][key], weights["sft", 4][key])
    assert not torch.equal(weights["sft", 3][key], weights["sdft", 3][key])
    records = {(arm, seed): arm_record(arm_dir(output_dir, arm, seed)) for arm in HEADLINE_ARMS for seed in SEEDS}
    assert {record["global_step"] for record in records.values()} == {2}
    assert {record["seed"] for record in records.values()} == set(SEEDS)
    assert records["sdft", 3]["distillation"]["total"] == 8

    # The report: means over the two seeds, with intervals; differences paired with SFT and with the seed model.
    assert report["models"] == ["seed", *HEADLINE_ARMS] and report["seeds"] == SEEDS
    hard = sum(row["key"] in IFEVAL_HARD_KEYS for row in probe_items("ifeval", probes))  # IFEval's hard prompts
    assert report["items"] == {"addition": 2, "ifeval": 3, "ifeval_hard": hard, "general": 2}
    for arm in HEADLINE_ARMS:
        for probe in TINY_PROBES:
            runs = report["per_seed"][arm][probe]
            assert len(runs) == 2 and report["scores"][arm][probe]["mean"] == pytest.approx(sum(runs) / 2)
            assert report["scores"][arm][probe]["low"] <= report["scores"][arm][probe]["mean"]
    assert set(report["vs_sft"]) == {"sdft", "dynsdpb"} and set(report["vs_seed"]) == set(HEADLINE_ARMS)
    assert report["scores"]["seed"]["general"] is None and "general" not in report["vs_seed"]["sft"]
    assert set(report["ifeval"]["seed"]) == {
        "prompt_level_strict_acc",
        "inst_level_strict_acc",
        "prompt_level_loose_acc",
        "inst_level_loose_acc",
        "answer_words",
    }
    assert report["targets"]["task_probe"] == "addition"
    assert report["training"]["learning_rate"] == 1e-2 and report["elapsed_seconds"] > 0
    assert json.loads(open(os.path.join(output_dir, REPORT_JSON)).read())["scores"] == report["scores"]
    table = open(os.path.join(output_dir, REPORT_MARKDOWN)).read()
    assert "Difference from vanilla SFT" in table and "addition (task) (n=2)" in table
    for probe in [*TINY_PROBES, "ifeval_hard"]:
        assert open(os.path.join(output_dir, CHART_FILE.format(probe=probe)), "rb").read(8) == b"\x89PNG\r\n\x1a\n"

    # A rerun trains nothing and recomputes nothing.
    records_before = record_mtimes(output_dir)
    results_before = result_mtimes(output_dir)
    assert run()["scores"] == report["scores"]
    assert record_mtimes(output_dir) == records_before and result_mtimes(output_dir) == results_before

    # Another learning rate: every arm is trained again, and every result of a retrained arm is computed again;
    # the report's settings are the ones that produced its numbers.
    changed = run(learning_rate=5e-3)
    assert changed["training"]["learning_rate"] == 5e-3
    for arm in HEADLINE_ARMS:
        for seed in SEEDS:
            assert arm_record(arm_dir(output_dir, arm, seed))["settings"]["learning_rate"] == 5e-3
    after = result_mtimes(output_dir)
    assert {path for path in after if after[path] != results_before[path]} == {
        os.path.join(run_key, f"{probe}.json") for run_key in runs_of() for probe in ("addition", "ifeval")
    } | {os.path.join(run_key, "general.json") for run_key in runs_of()}


def test_a_deleted_arm_retrained_gets_new_probe_results(tmp_path, tiny_model_dir):
    """Deleting an arm's folder and rerunning with another learning rate must not reuse its old probe results."""
    probes = tiny_probes(probes=["addition"])

    def run(learning_rate):
        config = shared_config(tmp_path, learning_rate=learning_rate)
        return run_forgetting_benchmark(
            tiny_model_dir, config, arithmetic_dataset(), probes, ["sft"], seeds=[3], peft_config=lora()
        )

    run(1e-2)
    cached = os.path.join(tmp_path, "benchmark", RESULTS_DIR, "sft", "seed-3", "addition.json")
    before = json.loads(open(cached).read())["settings"]["model"]["weights_sha256"]
    shutil.rmtree(os.path.join(tmp_path, "benchmark", "sft"))
    run(5e-3)
    after = json.loads(open(cached).read())["settings"]["model"]["weights_sha256"]
    assert after != before  # recomputed for the new adapter
    assert after == weights_digest(arm_dir(str(tmp_path / "benchmark"), "sft", 3))


def test_a_resumed_arm_reports_the_uninterrupted_train_loss(tmp_path, tiny_model_dir):
    """A run killed after a checkpoint and resumed reports the whole run's train loss, as an uninterrupted one does."""
    dataset = arithmetic_dataset()
    straight = train_arm(
        ARMS["sft"],
        tiny_model_dir,
        shared_config(tmp_path, max_steps=4),
        dataset,
        str(tmp_path / "straight"),
        peft_config=lora(),
    )

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt  # as a kill would, after checkpoint-2 was saved

    interrupted = str(tmp_path / "interrupted")
    config = shared_config(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    original = SFTTrainer.__init__

    def crashing_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.add_callback(Crash())

    SFTTrainer.__init__ = crashing_init
    try:
        with pytest.raises(KeyboardInterrupt):
            train_arm(ARMS["sft"], tiny_model_dir, config, dataset, interrupted, peft_config=lora())
    finally:
        SFTTrainer.__init__ = original
    resumed = train_arm(ARMS["sft"], tiny_model_dir, config, dataset, interrupted, peft_config=lora())
    assert resumed["resumed_from"].endswith("checkpoint-2")
    assert resumed["train"]["train_loss"] == pytest.approx(straight["train"]["train_loss"], rel=1e-6)


def test_a_dataset_one_arm_refuses_fails_before_any_arm_trains(tmp_path, tiny_model_dir):
    args = shared_config(tmp_path)
    # One row cannot fill DynSDPB's batches of new and re-used samples; vanilla SFT, listed first, could train on it.
    with pytest.raises(ValueError, match="The training dataset has 1 rows"):
        run_forgetting_benchmark(tiny_model_dir, args, arithmetic_dataset(1), tiny_probes(), peft_config=lora())
    assert not os.path.exists(args.output_dir)  # refused before the first arm trained


def test_arm_configs_share_the_settings_and_differ_in_the_mode(tmp_path):
    shared = shared_config(tmp_path, learning_rate=3e-4, dynsdpb_temperature=2.0)
    sft = arm_config(ARMS["sft"], shared, str(tmp_path / "sft"))
    dlb = arm_config(ARMS["dlb"], shared, str(tmp_path / "dlb"))
    dynamic = arm_config(ARMS["dynsdpb"], shared, str(tmp_path / "dynsdpb"))
    assert type(sft) is SFTConfig and type(dlb) is DynSDPBConfig
    assert sft.learning_rate == dlb.learning_rate == 3e-4 and sft.max_steps == dlb.max_steps == 2
    assert dlb.dynsdpb_mode == "constant" and dynamic.dynsdpb_mode == "dynamic"
    assert dlb.dynsdpb_temperature == 2.0 and dlb.output_dir == str(tmp_path / "dlb")


def test_the_own_answer_arms_are_compared_with_sdft(tmp_path, tiny_model_dir):
    """The arms that may train on the seed model's own answer get their own paired differences from SDFT."""
    config = shared_config(tmp_path, sdft_checker="math")  # an own answer needs a checker that can refuse it
    own = arm_config(ARMS["sdft_own_answer"], config, str(tmp_path / "own"))
    lowest = arm_config(ARMS["sdft_lowest_nll"], config, str(tmp_path / "lowest"))
    assert type(own) is SDFTConfig and own.sdft_candidates == ["own_answer", "rewrite"]
    assert own.sdft_selection == "first" and lowest.sdft_selection == "lowest_nll"
    assert arm_config(ARMS["sdft"], config, str(tmp_path / "sdft")).sdft_candidates == ["rewrite"]
    with pytest.raises(ValueError, match="Benchmark arm `sdft_own_answer`.*needs a checker"):
        check_arm_inputs(["sdft", "sdft_own_answer"], shared_config(tmp_path), arithmetic_dataset())

    arms = ["sdft", "sdft_own_answer", "sdft_lowest_nll"]
    probes = tiny_probes(probes=["addition"])
    report = run_forgetting_benchmark(
        tiny_model_dir, config, arithmetic_dataset(), probes, arms, seeds=[3], peft_config=lora()
    )
    assert set(report["vs_sdft"]) == {"sdft_own_answer", "sdft_lowest_nll"} and report["vs_sft"] == {}
    assert set(report["vs_sdft"]["sdft_own_answer"]["addition"]) >= {"mean", "low", "high"}
    record = arm_record(arm_dir(config.output_dir, "sdft_own_answer", 3))
    assert record["settings"]["sdft_candidates"] == ["own_answer", "rewrite"]
    distillation = record["distillation"]
    assert "target_own_answer" in distillation
    assert sum(distillation[f"target_{kind}"] for kind in ("own_answer", "rewrite", "reference")) == 8
    assert "target_own_answer" not in arm_record(arm_dir(config.output_dir, "sdft", 3))["distillation"]
    assert "target_own_answer" in report["distribution_gap"]["sdft_own_answer"]["3"]
    # the share of rewrites kept is SDFT's own: the arms that choose count own answers as accepted too
    sdft_gap = report["distribution_gap"]["sdft"]["3"]
    assert report["targets"]["rewrites_accepted"]["arms"] == ["sdft"]
    assert report["targets"]["rewrites_accepted"]["lowest_share"] == sdft_gap["accepted"] / sdft_gap["total"]
    table = open(os.path.join(config.output_dir, REPORT_MARKDOWN)).read()
    assert "Difference from SDFT," in table and "| SDFT, own answer first | 3 |" in table


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
    with pytest.raises(ValueError, match="seed is listed twice"):
        check_seeds([1, 1])
    with pytest.raises(ValueError, match="at least one training seed"):
        check_seeds([])
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
    other_weights = probe_settings("humaneval", tiny_probes(), {"weights_sha256": "another adapter"})
    assert cache.get("sft", "humaneval", other_weights) is None
    assert cache.get("sdft", "humaneval", settings) is None
    with open(cache.path("sft", "gsm8k"), "w") as handle:
        handle.write('{"probe": "gsm8k", "sett')  # cut off by a crash
    assert cache.get("sft", "gsm8k", settings) is None


def test_the_report_refuses_arms_trained_with_different_settings():
    def record(seed, learning_rate, mode="dynamic"):
        return {"settings": {"seed": seed, "learning_rate": learning_rate, "max_steps": 2, "dynsdpb_mode": mode}}

    same = {"sft": {3: record(3, 1e-3), 4: record(4, 1e-3)}, "dlb": {3: record(3, 1e-3, "constant")}}
    assert recorded_training_settings(same) == {"learning_rate": 1e-3, "max_steps": 2}
    mixed = {"sft": {3: record(3, 1e-3)}, "sdft": {3: record(3, 5e-3)}}
    with pytest.raises(ValueError, match=r"different `learning_rate`: sft/seed-3 has 0.001, sdft/seed-3 has 0.005"):
        recorded_training_settings(mixed)
