"""The IFEval floor: what one constant reply scores, and the prompts that no such reply passes.

A collapsed model that answers every prompt with the same short text still scores on IFEval, because several of
lm-eval's (0.4.13) checkers pass a reply that merely does not break them. Measured with
:func:`~trl_selfdistill.evaluation.ifeval.score_ifeval_responses` (lm-eval's own code, langdetect seeded), one
constant reply sent to all 541 prompts passes, prompt-level strict:

- 115 (21.3 %): ``"39"``, a number in double quotes;
- 99 (18.3 %): ``17 + 22 = <<17+22=39>>39\\n#### 39``, GSM8K's reference style;
- 96 (17.7 %): ``39``;
- 83 (15.3 %): ``THE ANSWER IS 39.``;
- 81 (15.0 %): ``#### 39``;
- 78 (14.4 %): ``the answer is 39.``;
- 77 (14.2 %): ``{"answer": 39}``;
- 71 (13.1 %): ``My answer is yes.``;
- 62 (11.5 %): ``17 + 22 = 39.\\nThe answer is 39.``, and as many the addition task's native reference answer;
- 58 (10.7 %): its calculator reference answer; 55 (10.2 %): its German one;
- 39 (7.2 %): a generic 48-word chat paragraph;
- 0: the empty reply,

against the 22.5 % of the 135M seed model's own answers. The leaks, by instruction type:

- ``detectable_format:title``: any non-blank ``<<…>>`` on one line is a title, so GSM8K's calculator annotation
  ``<<17+22=39>>`` passes all 37 title instructions.
- ``detectable_format:json_format``: anything ``json.loads`` accepts is "JSON", a bare number (``39``) or a quoted
  one (``"39"``) included: 17 of 17.
- ``language:response_language``: langdetect raises on text without letters (``39``, ``#### 39``, ``17 + 22 = 39``)
  and lm-eval counts the error as the language followed: 31 of 31, whatever the language asked.
- ``punctuation:no_comma``: any reply without a comma passes (66 of 66).
- ``keywords:forbidden_words``: a short reply avoids the words (49 of 49).
- ``length_constraints:number_words`` / ``number_sentences`` with "less than", and the "less than" forms of
  ``keywords:frequency``, ``keywords:letter_frequency`` and ``change_case:capital_word_frequency``: a short reply is
  under every upper bound (18 of 52, 29 of 52, 11 of 42, 11 of 33, 7 of 25).
- ``startend:quotation``: a quoted number is "wrapped in double quotation marks" (41 of 41).
- ``change_case:english_lowercase`` / ``english_capital``: one short English sentence in lower or upper case passes
  them all (39 of 39, 25 of 25).
- ``detectable_format:constrained_response``: ``My answer is yes.`` is one of the three options (10 of 10).

The empty reply passes nothing: lm-eval fails every instruction of a blank reply.

So a model that collapses to a terse reply loses little on the full score. :data:`IFEVAL_HARD_KEYS` holds the
prompts that no reply of :data:`CONSTANT_REPLIES` passes: 359 of 541 (the constants together pass 182, 33.6 %). On
them every constant scores 0, so a collapse shows as a drop there; :func:`hard_subset` scores a result on them, and
:func:`mean_answer_words`, reported beside, shows a terse collapse directly.

The constants are replies a collapsed model could plausibly give, one style each, not tricks combined against
particular prompts: such combinations pass a few hard prompts (a short reply ending in a ``P.S.`` line passes 6 of
them, an all-caps chat paragraph 3). Single words (``Yes.``, ``OK``) and a fenced JSON block were tried and pass no
prompt that the constants above miss, so they are left out.

The hard keys are shipped (``resources/ifeval_hard_keys.json``, beside the constants they were computed from) so
that scoring needs no 7,574 extra checks; :func:`load_hard_keys` refuses a file whose constants differ from
:data:`CONSTANT_REPLIES`. ``python -m trl_selfdistill.evaluation.ifeval_floor`` regenerates it.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..paths import bundled_resource
from .ifeval import load_ifeval, score_ifeval_responses

CONSTANT_REPLIES: tuple[str, ...] = (
    # GSM8K's reference style, with its calculator annotation: the `<<…>>` is a "title".
    "17 + 22 = <<17+22=39>>39\n#### 39",
    # The bare number: valid JSON, and no language to detect.
    "39",
    # GSM8K's final-answer line alone.
    "#### 39",
    # The answer as a JSON object.
    '{"answer": 39}',
    # A short worked answer in plain English.
    "17 + 22 = 39.\nThe answer is 39.",
    # A generic, friendly chat reply that answers nothing: passes the length bounds a terse reply misses.
    "Thank you for your question! I am happy to help. Here is a short overview of the topic, with the main points "
    "explained in simple words. If you would like more details, examples or a different format, just let me know and "
    "I will gladly adjust my answer.",
    # Nothing at all (a model that emits EOS at once).
    "",
    # The three reference styles of the bundled addition task (`trl_selfdistill.data.addition_answer(17, 22, style)`):
    # native,
    "17 + 22 = (10 + 20) + (7 + 2) = 30 + 9 = 39.\nThe answer is 39.",
    # German,
    "Zuerst addieren wir die Zehner: 10 + 20 = 30. Dann die Einer: 7 + 2 = 9. Zusammen ergibt das 30 + 9 = 39.\n"
    "Die Antwort lautet 39.",
    # and calculator.
    "Tens: 10+20={{10+20=30}}30. Ones: 7+2={{7+2=9}}9. Total: 30+9={{30+9=39}}39.\n#### 39",
    # One short sentence in lowercase: passes every "all lowercase" instruction.
    "the answer is 39.",
    # The same in capitals: passes every "all capital letters" instruction.
    "THE ANSWER IS 39.",
    # A quoted number: "wrapped in double quotes", valid JSON, and no language to detect (the highest floor).
    '"39"',
    # One of the options that every constrained-response prompt offers.
    "My answer is yes.",
)
"""Constant replies a collapsed model could give to every prompt; see the module docstring for their scores."""

HARD_KEYS_FILE = "ifeval_hard_keys.json"
REGENERATE_COMMAND = "python -m trl_selfdistill.evaluation.ifeval_floor"


def constant_reply_scores(constants: Sequence[str] = CONSTANT_REPLIES) -> dict[str, dict[str, Any]]:
    """Score each constant, sent to all 541 IFEval prompts, with lm-eval's checkers.

    Returns, per constant text, ``{"prompt_level_strict_acc": float, "passed": int, "passed_keys": frozenset}``:
    the prompt-level strict accuracy and the keys of the prompts it passes (prompt-level strict).
    """
    rows = load_ifeval()
    scores = {}
    for constant in constants:
        result = score_ifeval_responses(rows, [constant] * len(rows))
        passed = frozenset(o["key"] for o in result["outputs"] if o["prompt_level_strict_acc"])
        scores[constant] = {
            "prompt_level_strict_acc": result["prompt_level_strict_acc"],
            "passed": len(passed),
            "passed_keys": passed,
        }
    return scores


def floor_passed_keys(scores: Mapping[str, Mapping[str, Any]] | None = None) -> frozenset[int]:
    """The keys of the prompts that at least one constant passes, recomputed (or taken from ``scores``).

    ``scores`` is a result of :func:`constant_reply_scores`, given to avoid scoring the constants twice.
    """
    if scores is None:
        scores = constant_reply_scores()
    return frozenset().union(*(score["passed_keys"] for score in scores.values()))


def _hard_keys_path() -> Path:
    return Path(str(bundled_resource(HARD_KEYS_FILE)))


def write_hard_keys(
    path: str | os.PathLike[str] | None = None, scores: Mapping[str, Mapping[str, Any]] | None = None
) -> frozenset[int]:
    """Recompute the hard keys of :data:`CONSTANT_REPLIES` and write them, beside the constants, to ``path``.

    ``path`` defaults to the shipped resource; ``scores`` (of :func:`constant_reply_scores` for
    :data:`CONSTANT_REPLIES`) spares the scoring. Returns the keys written.
    """
    if scores is None:
        scores = constant_reply_scores()
    if list(scores) != list(CONSTANT_REPLIES):
        raise ValueError("`scores` must be those of CONSTANT_REPLIES, in order.")
    keys = frozenset(row["key"] for row in load_ifeval()) - floor_passed_keys(scores)
    document = {"constants": list(CONSTANT_REPLIES), "keys": sorted(keys)}
    target = Path(path) if path is not None else _hard_keys_path()
    target.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return keys


def load_hard_keys(
    path: str | os.PathLike[str] | None = None, constants: Sequence[str] = CONSTANT_REPLIES
) -> frozenset[int]:
    """The hard keys stored in ``path`` (default: the shipped resource), checked to be those of ``constants``.

    A file computed from other constants is stale: the subset would silently not be what the docstring says.
    """
    source = Path(path) if path is not None else bundled_resource(HARD_KEYS_FILE)
    document = json.loads(source.read_text(encoding="utf-8"))
    if document.get("constants") != list(constants):
        raise ValueError(
            f"The IFEval hard keys in {source} were computed from other constant replies than CONSTANT_REPLIES; "
            f"regenerate the file with `{REGENERATE_COMMAND}`."
        )
    return frozenset(int(key) for key in document["keys"])


@functools.cache
def _shipped_hard_keys() -> frozenset[int]:
    return load_hard_keys()


def __getattr__(name: str) -> Any:
    # IFEVAL_HARD_KEYS is read on first use, so that a stale file does not stop the module (and its regeneration
    # command) from importing.
    if name == "IFEVAL_HARD_KEYS":
        return _shipped_hard_keys()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


IFEVAL_HARD_KEYS: frozenset[int]
"""The keys of the IFEval prompts that no reply of :data:`CONSTANT_REPLIES` passes (prompt-level strict), shipped."""


def hard_subset(result: Mapping[str, Any], hard_keys: frozenset[int] | None = None) -> dict[str, Any]:
    """Prompt-level strict accuracy of ``result`` (of :func:`score_ifeval_responses`) on its hard prompts.

    ``hard_keys`` defaults to :data:`IFEVAL_HARD_KEYS`. Returns ``{"prompt_level_strict_acc", "total", "keys",
    "outcomes"}``: the accuracy (0.0 with no hard prompt), how many of the result's prompts are hard, and their keys
    and strict outcomes in the result's order, so that two results on the same prompts can be compared pairwise.
    """
    if hard_keys is None:
        hard_keys = _shipped_hard_keys()
    hard = [output for output in result["outputs"] if output["key"] in hard_keys]
    outcomes = [bool(output["prompt_level_strict_acc"]) for output in hard]
    return {
        "prompt_level_strict_acc": sum(outcomes) / len(outcomes) if outcomes else 0.0,
        "total": len(outcomes),
        "keys": [output["key"] for output in hard],
        "outcomes": outcomes,
    }


def mean_answer_words(result: Mapping[str, Any]) -> float:
    """Mean number of whitespace-separated words of the answers in ``result`` (0.0 with none).

    Reported beside IFEval because a collapse to terse answers barely moves the full score.
    """
    outputs = result["outputs"]
    return sum(len(output["output"].split()) for output in outputs) / len(outputs) if outputs else 0.0


if __name__ == "__main__":  # regenerate the shipped hard keys
    scores = constant_reply_scores()
    keys = write_hard_keys(scores=scores)
    for constant, score in scores.items():
        print(f"{score['passed']:4d}  {score['prompt_level_strict_acc']:6.1%}  {constant!r}")
    print(f"passed by a constant {len(floor_passed_keys(scores))}, hard {len(keys)}: written to {_hard_keys_path()}")
