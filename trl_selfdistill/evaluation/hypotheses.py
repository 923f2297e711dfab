"""The forgetting experiment's hypotheses, endpoints and verdict rules, fixed here before any run.

SDFT's premise (Yang et al., ACL 2024) is that fine-tuning on references far from the seed model's own distribution
makes it forget, and that training on the seed model's rewrites of them closes that gap. The benchmark tests it with
two datasets of the same questions and answers: references in a foreign style (`sft`, `sdft`, ... train on them) and
in the seed model's own style (`sft_native`). The run prints these rules before it trains and applies them to its
results; nothing in them depends on what a run measured.

| hypothesis | endpoint, paired by seed and item | supported when | refuted when |
|---|---|---|---|
| H1, the premise holds here | drift, SFT-f - SFT-n | interval above 0 | interval below 0 |
| H2, it closes the gap | R = (drift SFT-f - drift method) / (drift SFT-f - drift SFT-n) | above 0.5 | below 0.5 |
| H3, in the field's measure | IFEval prompt strict, method - SFT-f | interval above 0 | interval below 0 |
| guard, it learned as much | task accuracy, method - SFT-f | met: above -5 points | not met otherwise |

(SFT-f: SFT on the foreign references, `sft`; SFT-n: on the native ones, `sft_native`.)

Drift is the `drift` probe (NLL per token of the seed model's own answers, minus the seed's own). Intervals are 95 %
(two-way seed x item variance, `stats.py`); R's is Fieller's, by inverting the paired test of the contrast
`(SFT-f - method) - r (SFT-f - SFT-n)`. The conclusion per method follows the table of outcomes of the experiment's
design: no premise, nothing is said; a failed guard (the method learned less) leaves the question open, since less
learning alone forgets less; otherwise H2 decides, H3 reported beside it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .stats import minimum_detectable_difference, paired_difference, paired_ratio

FOREIGN_SFT = "sft"
NATIVE_SFT = "sft_native"
METHOD_ARMS = ("sdft", "sdft_own_answer", "sdft_lowest_nll", "dynsdpb", "dlb", "sdft_dynsdpb")
"""The arms judged against SFT on the foreign references, when they are in the run."""
DRIFT_PROBE = "drift"
FIELD_PROBE = "ifeval"
RECOVERY_TARGET = 0.5
GUARD_MARGIN = 0.05  # 5 points of task accuracy
POWER = 0.8

SUPPORTED, REFUTED, UNDECIDED = "supported", "refuted", "not decided"


@dataclass(frozen=True)
class Hypothesis:
    name: str
    claim: str
    endpoint: str
    supported_when: str
    refuted_when: str


HYPOTHESES = (
    Hypothesis(
        "H1",
        "the premise holds here: SFT on foreign references drifts more than SFT on native ones",
        "drift (nats/token), SFT-foreign - SFT-native",
        "its 95 % interval lies above 0",
        "its 95 % interval lies below 0",
    ),
    Hypothesis(
        "H2",
        "the method closes the gap",
        "recovery R = (drift SFT-foreign - drift method) / (drift SFT-foreign - drift SFT-native)",
        f"its 95 % interval lies above {RECOVERY_TARGET}",
        f"its 95 % interval lies below {RECOVERY_TARGET}",
    ),
    Hypothesis(
        "H3",
        "the method forgets less in the field's measure",
        "IFEval prompt-level strict (points), method - SFT-foreign",
        "its 95 % interval lies above 0",
        "its 95 % interval lies below 0",
    ),
    Hypothesis(
        "guard",
        "the method learned the task as well as SFT",
        "task accuracy (points), method - SFT-foreign",
        f"met when its 95 % interval lies above -{100 * GUARD_MARGIN:.0f} points",
        "not met otherwise: the method's smaller drift may come from learning less",
    ),
)


def describe_hypotheses() -> str:
    """The rules as a markdown table, printed by the run before it trains."""
    lines = [
        "Hypotheses, endpoints and verdict rules, fixed before the run (trl_selfdistill.evaluation.hypotheses):",
        "",
        "| hypothesis | claim | endpoint (paired by seed and item) | supported when | refuted when |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {h.name} | {h.claim} | {h.endpoint} | {h.supported_when} | {h.refuted_when} |" for h in HYPOTHESES]
    lines += [
        "",
        "Per method: no premise (H1 not supported), nothing is said; guard not met, not decided; otherwise H2 decides "
        "(supports or refutes the claim at this scale), with H3 beside it. Every endpoint reports the smallest "
        f"difference it could detect at {POWER:.0%} power.",
    ]
    return "\n".join(lines)


def applies(arms: Sequence[str], probes: Sequence[str]) -> bool:
    """Whether a run can judge the hypotheses: both SFT arms and the drift probe."""
    return FOREIGN_SFT in arms and NATIVE_SFT in arms and DRIFT_PROBE in probes


def interval_verdict(low: float, high: float, threshold: float) -> str:
    """`supported` when the interval lies above `threshold`, `refuted` when below, else `not decided`."""
    if low > threshold:
        return SUPPORTED
    if high < threshold:
        return REFUTED
    return UNDECIDED


Items = Mapping[str, Mapping[str, Sequence[Sequence[float]]]]
"""`items[probe][arm][seed][item]`: each trained arm's per-item outcomes, seeds in the same order for every arm."""


def judge(items: Items, task_probe: str | None) -> dict[str, Any]:
    """Every hypothesis that the run's arms and probes allow, with its estimate, smallest detectable difference and
    verdict, and a conclusion per method arm present (see the module docstring)."""
    drift = items[DRIFT_PROBE]
    premise = paired_difference(drift[FOREIGN_SFT], drift[NATIVE_SFT])
    result: dict[str, Any] = {
        "premise": {
            "estimate": premise.as_dict(),
            "minimum_detectable": minimum_detectable_difference(premise, POWER),
            "verdict": interval_verdict(premise.low, premise.high, 0.0),
        },
        "methods": {},
    }
    for method in (arm for arm in METHOD_ARMS if arm in drift):
        result["methods"][method] = _judge_method(items, method, task_probe, result["premise"]["verdict"])
    return result


def _judge_method(items: Items, method: str, task_probe: str | None, premise: str) -> dict[str, Any]:
    # an arm trained on fewer seeds is judged on those seeds: every arm's seeds start alike
    shared = len(items[DRIFT_PROBE][method])
    items = {probe: {arm: rows[:shared] for arm, rows in by_arm.items()} for probe, by_arm in items.items()}
    drift = items[DRIFT_PROBE]
    recovery = paired_ratio((drift[FOREIGN_SFT], drift[method]), (drift[FOREIGN_SFT], drift[NATIVE_SFT]))
    closed = paired_difference(drift[FOREIGN_SFT], drift[method])  # R's numerator: the drift the method saves
    gap = paired_difference(drift[FOREIGN_SFT], drift[NATIVE_SFT]).mean
    saved_detectable = minimum_detectable_difference(closed, POWER)
    judged: dict[str, Any] = {
        "recovery": {
            **recovery.as_dict(),
            "verdict": interval_verdict(recovery.low, recovery.high, RECOVERY_TARGET)
            if recovery.bounded
            else UNDECIDED,
            "drift_saved": closed.as_dict(),
            "minimum_detectable_drift_saved": saved_detectable,
            # the same as a share of the gap: the smallest recovery the run could tell from none
            "minimum_detectable": saved_detectable / gap if gap > 0 else math.inf,
        }
    }
    for key, probe, threshold in (("field", FIELD_PROBE, 0.0), ("guard", task_probe, -GUARD_MARGIN)):
        if probe is not None and probe in items and method in items[probe]:
            estimate = paired_difference(items[probe][method], items[probe][FOREIGN_SFT])
            verdict = interval_verdict(estimate.low, estimate.high, threshold)
            judged[key] = {
                "probe": probe,
                "estimate": estimate.as_dict(),
                "minimum_detectable": minimum_detectable_difference(estimate, POWER),
                "verdict": verdict if key == "field" else ("met" if verdict == SUPPORTED else "not met"),
            }
    judged["conclusion"] = _conclusion(premise, judged)
    return judged


def _conclusion(premise: str, judged: Mapping[str, Any]) -> str:
    if premise != SUPPORTED:
        return "no premise: SFT on foreign references did not drift more here, so nothing is said of the method"
    if "guard" in judged and judged["guard"]["verdict"] != "met":
        return "not decided: the method may have learned the task less than SFT, and less learning alone drifts less"
    verdict = judged["recovery"]["verdict"]
    if verdict == SUPPORTED:
        return "supports the claim at this scale: the method closes at least half of the drift gap"
    if verdict == REFUTED:
        return "refutes the claim at this scale: the method closes less than half of the drift gap"
    return "not decided: the recovery's interval holds 0.5"
