"""Tests of the IFEval floor: the constant replies' scores, the leaks they use, and the shipped hard subset."""

from __future__ import annotations

import json
import re

import pytest

from trl_selfdistill.data import addition_answer
from trl_selfdistill.evaluation import ifeval_floor
from trl_selfdistill.evaluation.ifeval import load_ifeval, score_ifeval_responses
from trl_selfdistill.evaluation.ifeval_floor import (
    CONSTANT_REPLIES,
    HARD_KEYS_FILE,
    IFEVAL_HARD_KEYS,
    REGENERATE_COMMAND,
    constant_reply_scores,
    floor_passed_keys,
    hard_subset,
    load_hard_keys,
    mean_answer_words,
    write_hard_keys,
)
from trl_selfdistill.paths import bundled_resource

CHAT = CONSTANT_REPLIES[5]

# Prompts passed (prompt-level strict) by each constant, as the module docstring states them.
EXPECTED_PASSED = {
    "17 + 22 = <<17+22=39>>39\n#### 39": 99,
    "39": 96,
    "#### 39": 81,
    '{"answer": 39}': 77,
    "17 + 22 = 39.\nThe answer is 39.": 62,
    CHAT: 39,
    "": 0,
    addition_answer(17, 22, "native"): 62,
    addition_answer(17, 22, "german"): 55,
    addition_answer(17, 22, "calculator"): 58,
    "the answer is 39.": 78,
    "THE ANSWER IS 39.": 83,
    '"39"': 115,
    "My answer is yes.": 71,
}
HARD_SIZE = 359


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return load_ifeval()


@pytest.fixture(scope="module")
def scores() -> dict[str, dict]:
    return constant_reply_scores()


def _passes(row: dict, reply: str) -> bool:
    return score_ifeval_responses([row], [reply])["outputs"][0]["prompt_level_strict_acc"]


def test_constants_are_the_documented_ones():
    assert set(CONSTANT_REPLIES) == set(EXPECTED_PASSED) and len(CONSTANT_REPLIES) == len(EXPECTED_PASSED)
    for style in ("native", "german", "calculator"):  # the bundled addition task's reference styles
        assert addition_answer(17, 22, style) in CONSTANT_REPLIES
    assert 40 <= len(CHAT.split()) <= 50
    for constant in CONSTANT_REPLIES:
        assert f"{EXPECTED_PASSED[constant]} (" in ifeval_floor.__doc__ or constant == ""


def test_each_constant_scores_what_the_docstring_says(scores):
    assert list(scores) == list(CONSTANT_REPLIES)
    for constant, score in scores.items():
        assert score["passed"] == len(score["passed_keys"]) == EXPECTED_PASSED[constant], constant
        assert score["prompt_level_strict_acc"] == pytest.approx(EXPECTED_PASSED[constant] / 541), constant
    assert scores["17 + 22 = <<17+22=39>>39\n#### 39"]["prompt_level_strict_acc"] == pytest.approx(0.183, abs=5e-4)
    assert max(score["passed"] for score in scores.values()) == 115  # '"39"': 21.3 %


def test_shipped_hard_keys_equal_the_recomputation_with_lm_evals_checkers(rows, scores, tmp_path):
    all_keys = frozenset(row["key"] for row in rows)
    passed = floor_passed_keys(scores)
    assert len(passed) == 541 - HARD_SIZE == 182
    assert IFEVAL_HARD_KEYS == all_keys - passed
    assert len(IFEVAL_HARD_KEYS) == HARD_SIZE
    assert ifeval_floor.IFEVAL_HARD_KEYS is IFEVAL_HARD_KEYS
    for score in scores.values():
        assert not score["passed_keys"] & IFEVAL_HARD_KEYS  # no constant passes a hard prompt
    # Regenerating the file writes the shipped one, byte for byte.
    assert write_hard_keys(tmp_path / HARD_KEYS_FILE, scores=scores) == IFEVAL_HARD_KEYS
    assert (tmp_path / HARD_KEYS_FILE).read_bytes() == bundled_resource(HARD_KEYS_FILE).read_bytes()
    document = json.loads(bundled_resource(HARD_KEYS_FILE).read_text(encoding="utf-8"))
    assert document["keys"] == sorted(document["keys"])


def test_other_replies_named_in_the_docstring(rows):
    def hard(reply: str) -> dict:
        return hard_subset(score_ifeval_responses(rows, [reply] * len(rows)))

    for reply in ("Yes.", "OK", '```json\n{"answer": 39}\n```'):  # left out: they pass no hard prompt
        subset = hard(reply)
        assert subset["total"] == HARD_SIZE and not any(subset["outcomes"]), reply
    assert sum(hard("39\nP.S. 39")["outcomes"]) == 6  # combined tricks pass a few hard prompts
    assert sum(hard(CHAT.upper())["outcomes"]) == 3


# --- the leaks, one prompt each: the reply passes, and a reply without the leaked property does not ---------------


@pytest.mark.parametrize(
    ("key", "instruction", "leaking", "control"),
    [
        (1322, "detectable_format:title", "17 + 22 = <<17+22=39>>39\n#### 39", "17 + 22 = 39\n#### 39"),
        (13, "detectable_format:json_format", "39", "the answer is 39"),
        (240, "language:response_language", "39", "The answer is thirty-nine."),  # Russian asked
        (32, "punctuation:no_comma", "17 + 22 = 39.\nThe answer is 39.", "Yes, 39."),
        (122, "startend:quotation", '"39"', "39"),
        (202, "change_case:english_lowercase", "the answer is 39.", "The answer is 39."),
        (24, "change_case:english_capital", "THE ANSWER IS 39.", "The answer is 39."),
        (227, "detectable_format:constrained_response", "My answer is yes.", "Yes."),
        (301, "keywords:forbidden_words", "39", "like a kid"),
        (164, "length_constraints:number_words", "39", " ".join(["word"] * 300)),  # "less than 300 words"
        (1268, "length_constraints:number_sentences", "39", "Yes. " * 6),  # "less than 6 sentences"
    ],
)
def test_named_leak_on_one_prompt(rows, key, instruction, leaking, control):
    (row,) = [row for row in rows if row["key"] == key]
    assert row["instruction_id_list"] == [instruction]
    assert _passes(row, leaking)
    assert not _passes(row, control)
    assert key not in IFEVAL_HARD_KEYS


def test_an_empty_reply_passes_nothing(rows):
    row = next(row for row in rows if row["instruction_id_list"] == ["punctuation:no_comma"])
    assert not _passes(row, "") and not _passes(row, "  \n")


# --- hard_subset and mean_answer_words on hand-made results ---------------------------------------------------------


def _output(key: int, passed: bool, output: str = "x") -> dict:
    return {
        "key": key,
        "output": output,
        "prompt_level_strict_acc": passed,
        "inst_level_strict_acc": [passed],
        "prompt_level_loose_acc": passed,
        "inst_level_loose_acc": [passed],
    }


def test_hard_subset_counts_and_scores_the_hard_prompts_only():
    hard_a, hard_b, hard_c = sorted(IFEVAL_HARD_KEYS)[:3]
    assert 32 not in IFEVAL_HARD_KEYS and 13 not in IFEVAL_HARD_KEYS
    result = {
        "outputs": [
            _output(hard_c, True),
            _output(32, True),  # passed by a constant: not counted
            _output(hard_a, False),
            _output(13, False),
            _output(hard_b, True),
        ]
    }
    subset = hard_subset(result)
    assert subset == {
        "prompt_level_strict_acc": pytest.approx(2 / 3),
        "total": 3,
        "keys": [hard_c, hard_a, hard_b],  # the result's order, for paired comparisons
        "outcomes": [True, False, True],
    }
    assert hard_subset(result, hard_keys=frozenset({32, 13})) == {
        "prompt_level_strict_acc": 0.5,
        "total": 2,
        "keys": [32, 13],
        "outcomes": [True, False],
    }
    assert hard_subset({"outputs": [_output(32, True)]}) == {
        "prompt_level_strict_acc": 0.0,
        "total": 0,
        "keys": [],
        "outcomes": [],
    }


def test_mean_answer_words():
    result = {"outputs": [_output(1, True, "one two three"), _output(2, False, ""), _output(3, True, " a\n\nb  ")]}
    assert mean_answer_words(result) == pytest.approx(5 / 3)
    assert mean_answer_words({"outputs": []}) == 0.0


# --- the stale-file check -------------------------------------------------------------------------------------------


def test_hard_keys_computed_from_other_constants_are_refused(tmp_path):
    assert load_hard_keys() == IFEVAL_HARD_KEYS
    with pytest.raises(ValueError, match=f"other constant replies.*`{re.escape(REGENERATE_COMMAND)}`"):
        load_hard_keys(constants=(*CONSTANT_REPLIES, "a new constant"))

    document = json.loads(bundled_resource(HARD_KEYS_FILE).read_text(encoding="utf-8"))
    document["constants"][1] = "40"
    stale = tmp_path / HARD_KEYS_FILE
    stale.write_text(json.dumps(document), encoding="utf-8")
    with pytest.raises(
        ValueError, match=f"{re.escape(str(stale))}.*regenerate the file with `{re.escape(REGENERATE_COMMAND)}`"
    ):
        load_hard_keys(stale)
    document["constants"][1] = "39"
    stale.write_text(json.dumps(document), encoding="utf-8")
    assert load_hard_keys(stale) == IFEVAL_HARD_KEYS


def test_write_hard_keys_refuses_scores_of_other_constants(tmp_path):
    with pytest.raises(ValueError, match="CONSTANT_REPLIES"):
        write_hard_keys(tmp_path / HARD_KEYS_FILE, scores={"39": {"passed_keys": frozenset()}})
    assert not (tmp_path / HARD_KEYS_FILE).exists()
