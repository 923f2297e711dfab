"""The verdicts of the forgetting experiment's hypotheses, on hand-made results with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from trl_selfdistill.evaluation import hypotheses
from trl_selfdistill.evaluation.hypotheses import REFUTED, SUPPORTED, UNDECIDED, applies, describe_hypotheses, judge

SEEDS, ITEMS = 3, 200


def outcomes(mean: float, noise: float, seed: int) -> list[list[float]]:
    """`[seed][item]` outcomes around `mean`: an item effect shared by every arm, plus each arm's own noise."""
    shared = np.random.default_rng(0).normal(0, 0.5, ITEMS)
    own = np.random.default_rng(seed).normal(0, noise, (SEEDS, ITEMS))
    return (mean + shared + own).tolist()


def results(sdft_drift: float, sdft_task=0.6, sft_native_drift=0.0, sdft_noise=0.05) -> dict:
    drift = {
        "sft": outcomes(0.2, 0.05, 1),
        "sft_native": outcomes(sft_native_drift, 0.05, 2),
        "sdft": outcomes(sdft_drift, sdft_noise, 3),
    }
    task = {"sft": outcomes(0.6, 0.05, 4), "sdft": outcomes(sdft_task, 0.05, 5)}
    ifeval = {"sft": outcomes(0.2, 0.05, 6), "sdft": outcomes(0.25, 0.05, 7)}
    return {"drift": drift, "addition": task, "ifeval": ifeval}


def test_sdft_that_closes_most_of_the_gap_supports_the_claim():
    judged = judge(results(sdft_drift=0.03), "addition")
    assert judged["premise"]["verdict"] == SUPPORTED
    sdft = judged["methods"]["sdft"]
    assert sdft["recovery"]["ratio"] == pytest.approx(0.85, abs=0.05)
    assert sdft["recovery"]["low"] > 0.5 and sdft["recovery"]["verdict"] == SUPPORTED
    assert sdft["guard"]["verdict"] == "met" and sdft["field"]["verdict"] == SUPPORTED
    assert sdft["conclusion"].startswith("supports")
    assert 0 < sdft["recovery"]["minimum_detectable"] < 0.5  # the run could tell a smaller recovery from none
    assert judged["premise"]["minimum_detectable"] > 0


def test_sdft_that_closes_little_of_the_gap_refutes_it():
    sdft = judge(results(sdft_drift=0.17), "addition")["methods"]["sdft"]
    assert sdft["recovery"]["high"] < 0.5 and sdft["recovery"]["verdict"] == REFUTED
    assert sdft["conclusion"].startswith("refutes")


def test_noise_leaves_it_undecided():
    sdft = judge(results(sdft_drift=0.1, sdft_noise=2.0), "addition")["methods"]["sdft"]
    assert sdft["recovery"]["verdict"] == UNDECIDED and sdft["conclusion"].startswith("not decided")


def test_learning_less_voids_the_verdict():
    sdft = judge(results(sdft_drift=0.03, sdft_task=0.4), "addition")["methods"]["sdft"]
    assert sdft["recovery"]["verdict"] == SUPPORTED  # the drift alone would support it...
    assert sdft["guard"]["verdict"] == "not met"
    assert sdft["conclusion"].startswith("not decided: the method may have learned the task less")


def test_no_premise_says_nothing_of_the_method():
    judged = judge(results(sdft_drift=0.03, sft_native_drift=0.2), "addition")
    assert judged["premise"]["verdict"] == UNDECIDED
    assert judged["methods"]["sdft"]["conclusion"].startswith("no premise")
    judged = judge(results(sdft_drift=0.03, sft_native_drift=0.4), "addition")
    assert judged["premise"]["verdict"] == REFUTED


def test_the_rules_are_printed_and_apply_only_with_both_sft_arms_and_drift():
    text = describe_hypotheses()
    for hypothesis in hypotheses.HYPOTHESES:
        assert hypothesis.name in text and hypothesis.supported_when in text
    assert applies(["sft", "sft_native", "sdft"], ["addition", "drift"])
    assert not applies(["sft", "sdft"], ["addition", "drift"])
    assert not applies(["sft", "sft_native"], ["addition", "ifeval"])


def test_an_arm_with_fewer_seeds_is_judged_on_those_seeds():
    full = results(sdft_drift=0.03)
    fewer = {p: {arm: rows[:2] if arm == "sdft" else rows for arm, rows in arms.items()} for p, arms in full.items()}
    sliced = {probe: {arm: rows[:2] for arm, rows in arms.items()} for probe, arms in full.items()}
    assert judge(fewer, "addition")["methods"] == judge(sliced, "addition")["methods"]
    assert judge(fewer, "addition")["premise"] == judge(full, "addition")["premise"]  # both SFT arms: every seed
