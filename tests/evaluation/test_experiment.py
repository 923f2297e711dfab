"""The forgetting experiment end to end on a tiny model: SFT on native and on foreign references, SDFT, an arm
variant, the drift probe, the hypotheses printed before training and judged in the report."""

from __future__ import annotations

import json
import os

import pytest
from datasets import Dataset
from test_benchmark import lora, shared_config, tiny_probes

from trl_selfdistill.evaluation.arms import ARM_RECORD_FILE, ARMS, register_variants
from trl_selfdistill.evaluation.benchmark import HYPOTHESES_FILE, arm_dir, run_forgetting_benchmark
from trl_selfdistill.evaluation.hypotheses import REFUTED, SUPPORTED, UNDECIDED
from trl_selfdistill.evaluation.report import DRIFT_CHART_FILE, REPORT_JSON, REPORT_MARKDOWN

ARMS_RUN = ["sft_native", "sft", "sdft", "sdft_tiny_variant"]
SEEDS = [3, 4]


def rows(style: str, n: int = 8) -> Dataset:
    def answer(i: int) -> str:
        return f"It is {2 * i}." if style == "native" else f"Die Antwort lautet {2 * i}."

    return Dataset.from_list([{"prompt": f"What is {i} plus {i}?", "completion": answer(i)} for i in range(n)])


@pytest.fixture
def registered():
    """Arms registered by a test are removed after it."""
    before = set(ARMS)
    yield
    for name in set(ARMS) - before:
        del ARMS[name]


@pytest.fixture
def variant(registered):
    (name,) = register_variants(
        {"sdft_tiny_variant": {"of": "sdft", "label": "SDFT, a variant", "overrides": {"sdft_checker": "math"}}}
    )
    return ARMS[name]


def test_the_experiment_end_to_end_with_two_seeds(tmp_path, tiny_model_dir, variant, monkeypatch):
    args = shared_config(tmp_path, sdft_checker="none")
    probes = tiny_probes(probes=["addition", "drift"], drift_samples=4, drift_max_new_tokens=5)
    seen_rules = []
    import trl_selfdistill.evaluation.arms as arms_module

    real_train = arms_module.train_arm

    def train_after_checking_the_rules(*positional, **keywords):
        seen_rules.append(os.path.isfile(os.path.join(args.output_dir, HYPOTHESES_FILE)))
        return real_train(*positional, **keywords)

    monkeypatch.setattr("trl_selfdistill.evaluation.benchmark.train_arm", train_after_checking_the_rules)
    report = run_forgetting_benchmark(
        tiny_model_dir, args, rows("foreign"), probes, ARMS_RUN, seeds=SEEDS, peft_config=lora(),
        native_dataset=rows("native"), seeds_per_arm={"sdft_tiny_variant": 1},
    )  # fmt: skip
    assert seen_rules == [True] * 7  # the rules were on disk before the first training
    assert report["arm_seeds"]["sdft_tiny_variant"] == [3] and report["arm_seeds"]["sft"] == SEEDS
    assert len(report["per_seed"]["sdft_tiny_variant"]["drift"]) == 1  # the variant trained on the first seed only

    # the native arm trained on the native references, every other arm on the foreign ones
    records = {arm: os.path.join(arm_dir(args.output_dir, arm, 3), ARM_RECORD_FILE) for arm in ARMS_RUN}
    fingerprints = {arm: json.load(open(path))["settings"]["train_dataset"] for arm, path in records.items()}
    assert fingerprints["sft_native"] == rows("native")._fingerprint
    assert {fingerprints[arm] for arm in ARMS_RUN[1:]} == {rows("foreign")._fingerprint}
    assert report["training"]["native_train_dataset"] == rows("native")._fingerprint
    assert report["training"]["train_dataset"] == rows("foreign")._fingerprint

    # drift: the seed model's own score is its NLL of its own answers, each arm's difference from it is its drift
    assert report["items"]["drift"] == 4
    for arm in ARMS_RUN:
        drift, scores = report["vs_seed"][arm]["drift"], report["scores"]
        assert drift["mean"] == pytest.approx(scores[arm]["drift"]["mean"] - scores["seed"]["drift"]["mean"])
        assert drift["minimum_detectable"] > 0
    # the variant is compared with the arm it varies, and its checker is its own setting, not a mixed-up run
    assert set(report["vs_sdft"]) == {"sdft_tiny_variant"}
    assert report["labels"]["sdft_tiny_variant"] == "SDFT, a variant"
    # the hypotheses, judged by their fixed rules
    judged = report["hypotheses"]
    assert judged["premise"]["verdict"] in (SUPPORTED, REFUTED, UNDECIDED)
    assert set(judged["methods"]) == {"sdft"}  # a variant is not one of the judged methods
    assert {"recovery", "guard", "conclusion"} <= set(judged["methods"]["sdft"])
    table = open(os.path.join(args.output_dir, REPORT_MARKDOWN)).read()
    assert table.startswith("## Verdict") and "H1, the premise" in table and "smallest detectable" in table
    assert open(os.path.join(args.output_dir, DRIFT_CHART_FILE), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert json.load(open(os.path.join(args.output_dir, REPORT_JSON)))["hypotheses"] == json.loads(json.dumps(judged))


def test_native_arms_need_the_same_questions(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match="seeds_per_arm"):
        run_forgetting_benchmark(tiny_model_dir, shared_config(tmp_path), rows("foreign"), tiny_probes(), ["sft"],
                                 seeds=[3, 4], seeds_per_arm={"sft": 3})  # fmt: skip
    args = shared_config(tmp_path)
    probes = tiny_probes(probes=["addition"])
    with pytest.raises(ValueError, match="native_dataset"):
        run_forgetting_benchmark(tiny_model_dir, args, rows("foreign"), probes, ["sft_native", "sft"], seeds=[3])
    with pytest.raises(ValueError, match="same questions"):
        run_forgetting_benchmark(tiny_model_dir, args, rows("foreign"), probes, ["sft_native"], seeds=[3],
                                 native_dataset=rows("native", n=6))  # fmt: skip
    other = Dataset.from_list([{"prompt": f"What is {i} times {i}?", "completion": "x"} for i in range(8)])
    with pytest.raises(ValueError, match="other questions"):
        run_forgetting_benchmark(tiny_model_dir, args, rows("foreign"), probes, ["sft_native"], seeds=[3],
                                 native_dataset=other)  # fmt: skip


def test_arm_variants_are_checked(registered):
    with pytest.raises(ValueError, match="not an arm"):
        register_variants({"x": {"of": "nope"}})
    with pytest.raises(ValueError, match="does not have"):
        register_variants({"x": {"of": "sft", "overrides": {"sdft_checker": "math"}}})
    with pytest.raises(ValueError, match="give `of`"):
        register_variants({"x": {"label": "no base"}})
    with pytest.raises(ValueError, match="exists already"):
        register_variants({"sdft": {"of": "sft"}})
    definition = {"x": {"of": "sdft", "overrides": {"sdft_rewrite_samples": 2}}}
    assert register_variants(definition) == register_variants(definition) == ["x"]  # again: the same arm
