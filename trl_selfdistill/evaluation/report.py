"""The forgetting benchmark's report: tables of means with 95 % intervals, paired differences, JSON, one chart a probe.

Written into the benchmark's output directory:

- `forgetting_benchmark.json`: every score (per seed, and the mean with its interval), the paired differences from
  vanilla SFT and from the seed model (and `vs_<arm>` for the arms compared with another arm too, such as `vs_sdft`),
  the item counts, the targets of the default run, each arm's recorded settings, train losses and distribution gap
  (with the targets' sources for the arms that choose among candidates), and the run's duration;
- `forgetting_benchmark.md`: the same as tables (one row per model, the seed model first);
- `chart_<probe>.png`: the arms side by side with their 95 % intervals, the seed model as a dashed line.

Scores of trained arms are means over training seeds with a t-interval over seeds; the seed model is one run, so its
interval is over items. Differences are paired item by item and seed by seed (`stats.paired_difference`): a
difference whose interval holds 0 is noise at this size, and the tables say so.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
from typing import Any

from . import hypotheses
from .arms import ARMS, SEED_MODEL
from .ifeval_floor import hard_subset, mean_answer_words
from .probes import PROBES, ProbeArguments, item_outcomes
from .stats import mean_over_items, mean_over_seeds, minimum_detectable_difference, paired_difference

REPORT_JSON = "forgetting_benchmark.json"
REPORT_MARKDOWN = "forgetting_benchmark.md"
CHART_FILE = "chart_{probe}.png"
DRIFT_CHART_FILE = "chart_drift_vs_task.png"
DERIVED_COLUMNS = {"ifeval": ("ifeval_hard",)}
"""Scores read from another probe's answers, reported as columns of their own: IFEval on its hard prompts (those no
constant reply passes, `ifeval_floor.py`), from the IFEval probe's results."""
COLUMN_LABELS = {"ifeval_hard": "IFEval-hard prompt strict"}
BASELINE_ARM = "sft"
TASK_PROBES = ("addition", "gsm8k")
IFEVAL_METRICS = ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc")
TASK_TARGETS = {"seed_score_low": 0.10, "seed_score_high": 0.70, "accepted_share": 0.80, "standard_errors": 2.0}
"""What the default run must show to be a miniature in which the effect can appear (printed with the report)."""


def check_chart_support() -> None:
    """The charts need matplotlib: checked before the benchmark trains anything."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "The forgetting benchmark draws its charts with matplotlib: `pip install 'trl-selfdistill[benchmark]'` "
            "(or `pip install matplotlib`)."
        ) from error


def label_of(model: str) -> str:
    return "seed" if model == SEED_MODEL else ARMS[model].label


def beside_arms(arms: list[str]) -> dict[str, str]:
    """`{arm: the arm it is compared with besides SFT}` for the arms of the run whose `Arm.beside` is in the run."""
    return {arm: ARMS[arm].beside for arm in arms if arm in ARMS and ARMS[arm].beside in arms}


def columns_of(probes: list[str]) -> list[str]:
    """The report's columns: every probe, each followed by the scores derived from it (`DERIVED_COLUMNS`)."""
    return [column for probe in probes for column in (probe, *DERIVED_COLUMNS.get(probe, ()))]


def column_label(column: str) -> str:
    return COLUMN_LABELS.get(column) or PROBES[column].label


def per_item(
    results: dict[str, dict[str, Any]], similarities: dict[str, dict[str, Any]], model: str, probe: str
) -> list[float]:
    """One model's outcome on each of the probe's items; for `general`, each prompt's similarity to the seed's; for
    `ifeval_hard`, the IFEval outcomes of the hard prompts."""
    if probe == "general":
        return list(similarities[model]["per_prompt"])
    if probe == "ifeval_hard":
        return [float(outcome) for outcome in hard_subset(results[model]["ifeval"])["outcomes"]]
    return item_outcomes(probe, results[model][probe])


def _difference(a: list[list[float]], b: list[list[float]]) -> dict[str, Any]:
    """A paired difference with the smallest difference its run could detect at 80 % power; two arms trained on
    different numbers of seeds are paired on the seeds they share (each arm's seeds start alike)."""
    if len(b) > 1:
        shared = min(len(a), len(b))
        a, b = a[:shared], b[:shared]
    estimate = paired_difference(a, b)
    return {**estimate.as_dict(), "minimum_detectable": minimum_detectable_difference(estimate)}


def aggregate(
    arms: list[str],
    arm_seeds: dict[str, list[int]],
    probes: list[str],
    results: dict[str, dict[str, Any]],
    similarities: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Means with intervals, per-seed scores and paired differences, as JSON values.

    `results` is keyed by model: `seed` and `<arm>/seed-<seed>`. Returns `{"scores", "per_seed", "vs_sft",
    "vs_seed"}`; `vs_sft` is present for every arm but SFT when SFT is an arm; `general` has no seed-model score.
    Columns derived from a probe (`ifeval_hard`) come with it. With both SFT arms and the drift probe, `hypotheses`
    holds the verdicts of `hypotheses.judge`.
    An arm compared with another arm too (`Arm.beside`, when that arm is in the run) adds `vs_<other arm>`, e.g.
    `vs_sdft`, with the same paired differences.
    """
    scores: dict[str, dict[str, Any]] = {SEED_MODEL: {}}
    per_seed: dict[str, dict[str, list[float]]] = {}
    vs_sft: dict[str, dict[str, Any]] = {}
    vs_seed: dict[str, dict[str, Any]] = {}
    besides = beside_arms(arms)
    vs_beside: dict[str, dict[str, dict[str, Any]]] = {f"vs_{other}": {} for other in besides.values()}
    by_probe: dict[str, dict[str, list[list[float]]]] = {}  # [probe][arm][seed][item], for the hypotheses
    for probe in columns_of(probes):
        seed_items = None if probe == "general" else per_item(results, similarities, SEED_MODEL, probe)
        scores[SEED_MODEL][probe] = None if seed_items is None else mean_over_items(seed_items).as_dict()
        items = {
            arm: [per_item(results, similarities, f"{arm}/seed-{seed}", probe) for seed in arm_seeds[arm]]
            for arm in arms
        }
        for arm in arms:
            runs = [statistics.fmean(row) if row else 0.0 for row in items[arm]]
            per_seed.setdefault(arm, {})[probe] = runs
            scores.setdefault(arm, {})[probe] = mean_over_seeds(runs).as_dict()
            if seed_items is not None:
                vs_seed.setdefault(arm, {})[probe] = _difference(items[arm], [seed_items])
            if BASELINE_ARM in arms and arm != BASELINE_ARM:
                vs_sft.setdefault(arm, {})[probe] = _difference(items[arm], items[BASELINE_ARM])
            if arm in besides:
                difference = _difference(items[arm], items[besides[arm]])
                vs_beside[f"vs_{besides[arm]}"].setdefault(arm, {})[probe] = difference
        by_probe[probe] = items
    aggregated = {"scores": scores, "per_seed": per_seed, "vs_sft": vs_sft, "vs_seed": vs_seed, **vs_beside}
    if hypotheses.applies(arms, probes):
        task_probe = next((name for name in TASK_PROBES if name in probes), None)
        aggregated["hypotheses"] = hypotheses.judge(by_probe, task_probe)
    return aggregated


def ifeval_metrics(
    results: dict[str, dict[str, Any]], arms: list[str], arm_seeds: dict[str, list[int]]
) -> dict[str, Any]:
    """lm-eval's four IFEval accuracies per model, and the answers' mean length in words (trained arms: mean over
    seeds): a terse collapse, which IFEval's checkers pass, shows in the length."""

    def measures(result: dict[str, Any]) -> dict[str, float]:
        return {**{metric: result[metric] for metric in IFEVAL_METRICS}, "answer_words": mean_answer_words(result)}

    table = {SEED_MODEL: measures(results[SEED_MODEL]["ifeval"])}
    for arm in arms:
        runs = [measures(results[f"{arm}/seed-{seed}"]["ifeval"]) for seed in arm_seeds[arm]]
        table[arm] = {key: statistics.fmean(run[key] for run in runs) for key in runs[0]}
    return table


def task_targets(report: dict[str, Any], task_probe: str) -> dict[str, Any]:
    """Whether the run is a miniature in which the effect can appear (see `TASK_TARGETS`), each check with its number.

    - the seed model's task score lies within [10 %, 70 %];
    - every trained arm beats the seed model on the task by more than two standard errors (paired difference);
    - the SDFT rewrite kept at least 80 % of the rewrites, in every seed of every arm that trains on rewrites alone
      (the arms that choose among candidates accept own answers too, so their share is another number).
    """
    seed_score = report["scores"][SEED_MODEL][task_probe]["mean"]
    checks: dict[str, Any] = {
        "seed_score": {
            "value": seed_score,
            "target": [TASK_TARGETS["seed_score_low"], TASK_TARGETS["seed_score_high"]],
            "met": TASK_TARGETS["seed_score_low"] <= seed_score <= TASK_TARGETS["seed_score_high"],
        }
    }
    gains = {}
    for arm, probes in report["vs_seed"].items():
        gain = probes[task_probe]
        ratio = gain["mean"] / gain["standard_error"] if gain["standard_error"] > 0 else math.inf * gain["mean"]
        gains[arm] = {"gain": gain["mean"], "standard_errors": ratio, "met": ratio > TASK_TARGETS["standard_errors"]}
    checks["every_arm_learns"] = {"arms": gains, "met": all(g["met"] for g in gains.values())}
    # SDFT's rewrites only: an arm that chooses among candidates counts own answers as accepted, references as not
    shares = {
        arm: [gap["accepted"] / gap["total"] for gap in by_seed.values() if gap.get("total") and _rewrites_alone(gap)]
        for arm, by_seed in report["distribution_gap"].items()
    }
    shares = {arm: values for arm, values in shares.items() if values}
    if shares:
        lowest = min(min(values) for values in shares.values())
        checks["rewrites_accepted"] = {
            "arms": sorted(shares),
            "lowest_share": lowest,
            "target": TASK_TARGETS["accepted_share"],
            "met": lowest >= TASK_TARGETS["accepted_share"],
        }
    return checks


def _rewrites_alone(gap: dict[str, Any]) -> bool:
    """Whether a run trained on the paper's SDFT targets: its rewrite where accepted, else the reference."""
    return gap.get("candidates", ["rewrite"]) == ["rewrite"] and gap.get("selection", "first") == "first"


def recorded_training_settings(records: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """The settings every trained arm recorded, shared by all (the seed aside), as they produced the numbers.

    A setting that differs between arms other than by the arm's own definition (its overrides, such as the DynSDPB
    mode; its seed; the native arms' dataset) means results of different runs were mixed: refused, naming it.
    """
    merged: dict[str, Any] = {}
    native: dict[str, Any] = {}
    for arm, by_seed in records.items():
        # what defines the arm (its overrides; the native arms' dataset, recorded beside the task's) may differ
        arm_specific = {"seed", *ARMS[arm].overrides, *(["train_dataset"] if ARMS[arm].data == "native" else [])}
        for seed, record in by_seed.items():
            run = f"{arm}/seed-{seed}"
            for key, value in record.get("settings", {}).items():
                if key == "train_dataset" and key in arm_specific:
                    native.setdefault("native_train_dataset", value)
                if key in arm_specific:
                    continue
                if key in merged and merged[key][1] != value and key in _SHARED_KEYS:
                    raise ValueError(
                        f"The arms were trained with different `{key}`: {merged[key][0]} has {merged[key][1]!r}, "
                        f"{run} has {value!r}. Rerun the benchmark: arms whose settings changed are trained again."
                    )
                merged.setdefault(key, (run, value))
    return {**{key: value for key, (_, value) in merged.items() if key in _SHARED_KEYS}, **native}


_SHARED_KEYS = (
    "model",
    "max_steps",
    "learning_rate",
    "lr_scheduler_type",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_length",
    "train_dataset",
    "peft_config",
    "quantization_config",
    "sdft_template",
    "sdft_checker",
    "sdft_generation_kwargs",
    "dynsdpb_alpha",
    "dynsdpb_temperature",
    "dynsdpb_reuse_fraction",
)


def write_report(
    output_dir: str,
    *,
    model_name: str,
    dataset_name: str | None,
    arms: list[str],
    seeds: list[int],
    records: dict[str, dict[int, dict[str, Any]]],
    results: dict[str, dict[str, Any]],
    similarities: dict[str, dict[str, Any]],
    probe_args: ProbeArguments,
    arm_seeds: dict[str, list[int]] | None = None,
    peft_config=None,
    elapsed_seconds: float | None = None,
) -> dict[str, Any]:
    """Writes the JSON, the markdown tables and the charts; returns the report. `arm_seeds` gives the arms trained
    on fewer seeds than `seeds` theirs (a prefix of `seeds`)."""
    probes = list(probe_args.probes)
    arm_seeds = {arm: (arm_seeds or {}).get(arm, seeds) for arm in arms}
    report: dict[str, Any] = {
        "model": model_name,
        "dataset": dataset_name,
        "models": [SEED_MODEL, *arms],
        "labels": {model: label_of(model) for model in [SEED_MODEL, *arms]},
        "seeds": seeds,
        "items": {
            name: len(per_item(results, similarities, f"{arms[0]}/seed-{seeds[0]}", name))
            for name in columns_of(probes)
        },
        **({"arm_seeds": arm_seeds} if any(arm_seeds[arm] != seeds for arm in arms) else {}),
        **aggregate(arms, arm_seeds, probes, results, similarities),
        "distribution_gap": {
            arm: {
                str(seed): {
                    **{key: record["distillation"].get(key) for key in _GAP_KEYS},
                    # where the targets came from, for the arms that choose among candidates (own answer, ...)
                    **{key: record["distillation"][key] for key in _CHOICE_KEYS if key in record["distillation"]},
                }
                for seed, record in by_seed.items()
            }
            for arm, by_seed in records.items()
            if any("distillation" in record for record in by_seed.values())
        },
        "training": recorded_training_settings(records),
        "lora": _lora_settings(peft_config),
        "train_loss": {
            arm: {str(seed): r["train"].get("train_loss") for seed, r in by_seed.items()}
            for arm, by_seed in records.items()
        },
        "probes": dataclasses.asdict(probe_args),
        "elapsed_seconds": elapsed_seconds,
    }
    if "ifeval" in probes:
        report["ifeval"] = ifeval_metrics(results, arms, arm_seeds)
    task_probe = next((name for name in TASK_PROBES if name in probes), None)
    if task_probe is not None and report["vs_seed"]:
        report["targets"] = {"task_probe": task_probe, **task_targets(report, task_probe)}
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, REPORT_JSON), "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    with open(os.path.join(output_dir, REPORT_MARKDOWN), "w", encoding="utf-8") as handle:
        handle.write(markdown_report(report))
    for probe in report["items"]:
        draw_chart(report, probe, os.path.join(output_dir, CHART_FILE.format(probe=probe)))
    if "drift" in probes and task_probe is not None:
        draw_drift_chart(report, task_probe, os.path.join(output_dir, DRIFT_CHART_FILE))
    return report


_NLL_KEYS = ("seed_nll_reference", "seed_nll_distilled")
_GAP_KEYS = ("total", "accepted", *_NLL_KEYS)
_TARGET_KEYS = ("target_own_answer", "target_rewrite", "target_reference")
_CHOICE_KEYS = ("candidates", "selection", *_TARGET_KEYS)  # recorded only by the runs that choose among candidates


def _lora_settings(peft_config) -> dict[str, Any] | None:
    """The adapter every arm trained (None for full fine-tuning)."""
    if peft_config is None:
        return None
    targets = peft_config.target_modules
    return {
        "r": peft_config.r,
        "lora_alpha": peft_config.lora_alpha,
        "target_modules": sorted(targets) if isinstance(targets, (set, list, tuple)) else targets,
    }


def _scale(probe: str) -> float:
    return 1.0 if probe in UNSCALED else 100.0


UNSCALED = ("general", "drift")  # a similarity and an NLL in nats per token; the others are rates, shown in %


def _estimate_cell(probe: str, estimate: dict[str, Any] | None) -> str:
    """`mean [low, high]`: percentages for rates, fractions for the similarity."""
    if estimate is None:
        return "—"
    scale, digits = _scale(probe), (3 if probe in UNSCALED else 1)
    mean, low, high = (scale * estimate[key] for key in ("mean", "low", "high"))
    if low == high:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _difference_cell(probe: str, estimate: dict[str, Any] | None) -> str:
    if estimate is None:
        return "—"
    scale, digits = _scale(probe), (3 if probe in UNSCALED else 1)
    mean, low, high = (scale * estimate[key] for key in ("mean", "low", "high"))
    bold = "**" if estimate["low"] > 0 or estimate["high"] < 0 else ""  # the interval excludes 0
    return f"{bold}{mean:+.{digits}f}{bold} [{low:+.{digits}f}, {high:+.{digits}f}]"


def _header(report: dict[str, Any], first: str) -> list[str]:
    probes = list(report["items"])
    header = [first, *(f"{column_label(p)} (n={report['items'][p]})" for p in probes)]
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]


def markdown_report(report: dict[str, Any]) -> str:
    """The scores, the paired differences from vanilla SFT and from the seed model, the targets and the gaps."""
    probes = list(report["items"])
    seeds = report["seeds"]
    lines = [*_hypotheses_lines(report), ""] if "hypotheses" in report else []
    lines += [
        f"Scores: mean over {len(seeds)} training seed(s) {seeds}{_fewer_seeds(report)} with its 95 % interval over "
        "seeds; the seed model "
        "is one run, its interval over items. Rates in %, the similarity to the seed model's answers as a fraction, "
        "the NLL of the seed's IFEval answers in nats per token (a model's drift is its NLL minus the seed's).",
        "",
        *_header(report, "model"),
    ]
    for model in report["models"]:
        cells = [report["labels"][model], *(_estimate_cell(p, report["scores"][model].get(p)) for p in probes)]
        lines.append("| " + " | ".join(cells) + " |")
    besides = dict.fromkeys(beside_arms([m for m in report["models"] if m != SEED_MODEL]).values())
    for key, title in (
        ("vs_sft", "Difference from vanilla SFT"),
        *((f"vs_{other}", f"Difference from {report['labels'][other]}") for other in besides),
        ("vs_seed", "Difference from the seed model"),
    ):
        if not report.get(key):
            continue
        lines += [
            "",
            f"{title}, paired item by item and seed by seed, with its 95 % interval (seeds and items); **bold**: "
            "the interval excludes 0. Otherwise the difference is within the noise of this run.",
            "",
            *_header(report, "arm"),
        ]
        for arm, by_probe in report[key].items():
            cells = [report["labels"][arm], *(_difference_cell(p, by_probe.get(p)) for p in probes)]
            lines.append("| " + " | ".join(cells) + " |")
        detectable = [_detectable_cell(p, [d.get(p) for d in report[key].values()]) for p in probes]
        lines.append("| *smallest detectable at 80 % power (mean over arms)* | " + " | ".join(detectable) + " |")
    if any(d.get("item_share") is not None for by_probe in report["vs_sft"].values() for d in by_probe.values()):
        lines += ["", _sample_size_line(report)]
    if "ifeval" in report:
        lines += [
            "",
            "IFEval, lm-eval's four accuracies (%) and the answers' mean length in words (trained arms: mean over "
            "seeds):",
            "",
        ]
        lines += [
            "| model | " + " | ".join(IFEVAL_METRICS) + " | answer words |",
            "|" + "---|" * (len(IFEVAL_METRICS) + 2),
        ]
        for model in report["models"]:
            values = report["ifeval"][model]
            cells = [f"{100 * values[m]:.1f}" for m in IFEVAL_METRICS]
            words = values.get("answer_words")
            cells.append("—" if words is None else f"{words:.0f}")
            lines.append(f"| {report['labels'][model]} | " + " | ".join(cells) + " |")
    if "targets" in report:
        lines += ["", *_targets_lines(report)]
    if report["distribution_gap"]:
        lines += [
            "",
            "Distribution gap of the training targets (the seed model's mean per-token NLL, lower is closer to its "
            "own distribution), per seed:",
            "",
            "| arm | seed | rewrites accepted | NLL of the references | NLL of the targets trained on |",
            "|---|---|---|---|---|",
        ]
        for arm, by_seed in report["distribution_gap"].items():
            for seed, gap in by_seed.items():
                nll = [f"{gap[key]:.3f}" if gap.get(key) is not None else "—" for key in _NLL_KEYS]
                lines.append(
                    f"| {report['labels'][arm]} | {seed} | {gap['accepted']}/{gap['total']} | {nll[0]} | {nll[1]} |"
                )
        chosen = {
            arm: by_seed
            for arm, by_seed in report["distribution_gap"].items()
            if any(_TARGET_KEYS[0] in gap for gap in by_seed.values())
        }
        if chosen:
            lines += [
                "",
                "Targets trained on, by source, per seed:",
                "",
                "| arm | seed | own answers | rewrites | references |",
                "|---|---|---|---|---|",
            ]
            for arm, by_seed in chosen.items():
                for seed, gap in by_seed.items():
                    counts = " | ".join(str(gap.get(key, "—")) for key in _TARGET_KEYS)
                    lines.append(f"| {report['labels'][arm]} | {seed} | {counts} |")
    if report.get("elapsed_seconds") is not None:
        minutes, seconds = divmod(round(report["elapsed_seconds"]), 60)
        lines += ["", f"This run took {minutes} min {seconds} s (resumed work not counted again)."]
    return "\n".join(lines) + "\n"


def _fewer_seeds(report: dict[str, Any]) -> str:
    fewer = {arm: seeds for arm, seeds in report.get("arm_seeds", {}).items() if seeds != report["seeds"]}
    if not fewer:
        return ""
    return " (" + "; ".join(f"{report['labels'][arm]}: {seeds}" for arm, seeds in fewer.items()) + ")"


def _detectable_cell(probe: str, differences: list[dict[str, Any] | None]) -> str:
    values = [d["minimum_detectable"] for d in differences if d is not None and "minimum_detectable" in d]
    if not values:
        return "—"
    scale, digits = _scale(probe), (3 if probe in UNSCALED else 1)
    return f"±{scale * statistics.fmean(values):.{digits}f}"


def _hypotheses_lines(report: dict[str, Any]) -> list[str]:
    """The verdicts of the hypotheses fixed before the run (`hypotheses.py`), one row per hypothesis and method."""
    judged = report["hypotheses"]
    labels = report["labels"]
    premise = judged["premise"]
    lines = [
        "## Verdict",
        "",
        "Hypotheses and rules fixed before the run (`trl_selfdistill.evaluation.hypotheses`). SFT-foreign: "
        f"{labels['sft']} on the task's references (`sft`); SFT-native: {labels['sft_native']} (`sft_native`). 95 % "
        "intervals paired by seed and item; *detectable*: the smallest difference the run could detect at 80 % power "
        "(for R: the smallest recovery it could tell from none).",
        "",
        "| hypothesis | endpoint | estimate [95 % interval] | detectable | verdict |",
        "|---|---|---|---|---|",
        f"| H1, the premise | drift, SFT-foreign - SFT-native (nats/token) | {_plain(premise['estimate'], 1, 3)} | "
        f"±{premise['minimum_detectable']:.3f} | **{premise['verdict']}** |",
    ]
    for method, verdicts in judged["methods"].items():
        recovery = verdicts["recovery"]
        bounds = f"[{recovery['low']:.2f}, {recovery['high']:.2f}]" if recovery["bounded"] else "(unbounded)"
        lines.append(
            f"| H2, {labels[method]} closes the gap | recovery R of the drift | {recovery['ratio']:.2f} {bounds} | "
            f"{recovery['minimum_detectable']:.2f} | **{recovery['verdict']}** |"
        )
        for key, name in (("field", "H3"), ("guard", "guard")):
            if key in verdicts:
                entry = verdicts[key]
                lines.append(
                    f"| {name}, {labels[method]} | {column_label(entry['probe'])}, method - SFT-foreign (points) | "
                    f"{_plain(entry['estimate'], 100, 1)} | ±{100 * entry['minimum_detectable']:.1f} | "
                    f"**{entry['verdict']}** |"
                )
    lines += [""]
    lines += [f"- **{labels[method]}**: {verdicts['conclusion']}." for method, verdicts in judged["methods"].items()]
    return lines


def _plain(estimate: dict[str, Any], scale: float, digits: int) -> str:
    mean, low, high = (scale * estimate[key] for key in ("mean", "low", "high"))
    return f"{mean:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


def _sample_size_line(report: dict[str, Any]) -> str:
    """Where the differences from SFT get their noise: the probe's items or the training seeds (choosing sizes)."""
    shares = []
    for probe in report["items"]:
        values = [
            d[probe]["item_share"] for d in report["vs_sft"].values() if d.get(probe, {}).get("item_share") is not None
        ]
        if values:
            shares.append(f"{column_label(probe)} {statistics.fmean(values):.2f}")
    return (
        "Share of the variance of the differences from SFT that comes from the probe items (mean over arms; the rest "
        "comes from the seeds): " + ", ".join(shares) + ". Near 1, more items would narrow the intervals; near 0, "
        "more seeds would."
    )


def _targets_lines(report: dict[str, Any]) -> list[str]:
    targets = report["targets"]
    probe = targets["task_probe"]

    def mark(met: bool) -> str:
        return "met" if met else "NOT met"

    seed = targets["seed_score"]
    lines = [
        f"Targets of a miniature in which the effect can appear ({PROBES[probe].label}):",
        "",
        f"- seed model's task score {100 * seed['value']:.1f} %, target 10-70 %: {mark(seed['met'])};",
    ]
    gains = ", ".join(
        f"{report['labels'][arm]} {100 * g['gain']:+.1f} points ({g['standard_errors']:.1f} SE)"
        for arm, g in targets["every_arm_learns"]["arms"].items()
    )
    lines.append(
        f"- every arm beats the seed model by more than 2 standard errors ({gains}): "
        f"{mark(targets['every_arm_learns']['met'])};"
    )
    if "rewrites_accepted" in targets:
        accepted = targets["rewrites_accepted"]
        arms = ", ".join(report["labels"][arm] for arm in accepted["arms"])
        lines.append(
            f"- SDFT rewrites accepted, lowest over seeds and the arms that train on rewrites alone ({arms}) "
            f"{100 * accepted['lowest_share']:.1f} %, target at least 80 %: {mark(accepted['met'])}."
        )
    return lines


def draw_drift_chart(report: dict[str, Any], task_probe: str, path: str) -> None:
    """Each trained arm's drift (NLL of the seed's answers, minus the seed's) against its task gain over the seed
    model, both paired with the seed model, with their 95 % intervals: forgetting against learning."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for number, (arm, by_probe) in enumerate(report["vs_seed"].items()):
        gain, drift = by_probe[task_probe], by_probe["drift"]
        axes.errorbar(
            100 * gain["mean"],
            drift["mean"],
            xerr=[[100 * (gain["mean"] - gain["low"])], [100 * (gain["high"] - gain["mean"])]],
            yerr=[[drift["mean"] - drift["low"]], [drift["high"] - drift["mean"]]],
            fmt="o",
            capsize=4,
            color=f"C{number}",
            label=report["labels"][arm],
        )
    axes.axhline(0, color="black", linestyle="--", linewidth=1)
    axes.axvline(0, color="black", linestyle="--", linewidth=1)
    axes.set_xlabel(f"{column_label(task_probe)} gain over the seed model (points)")
    axes.set_ylabel("drift (nats/token)")
    axes.set_title(
        f"Forgetting against learning: {len(report['seeds'])} seeds (95 % CI), {report['model'].split('/')[-1]}"
    )
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def draw_chart(report: dict[str, Any], probe: str, path: str) -> None:
    """The arms' mean scores on one probe as bars with their 95 % intervals (over seeds), the seed model's as a dashed
    line in its own interval (over items)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    arms = [model for model in report["models"] if model != SEED_MODEL]
    scale = _scale(probe)
    estimates = [report["scores"][arm][probe] for arm in arms]
    means = [scale * e["mean"] for e in estimates]
    errors = [
        [scale * (e["mean"] - e["low"]) for e in estimates],
        [scale * (e["high"] - e["mean"]) for e in estimates],
    ]
    seed = report["scores"][SEED_MODEL].get(probe)
    figure, axes = plt.subplots(figsize=(7, 4))
    labels = [report["labels"][arm] for arm in arms]
    axes.bar(labels, means, yerr=errors, capsize=4, color="tab:blue")
    for x, (mean, high) in enumerate(zip(means, (scale * e["high"] for e in estimates), strict=True)):
        # above the interval's cap, where the error bar does not cross it
        axes.annotate(f"{mean:.3f}" if probe == "general" else f"{mean:.1f}", (x, high), xytext=(0, 3),
                      textcoords="offset points", ha="center", va="bottom")  # fmt: skip
    reference = 1.0 if probe == "general" else (seed["mean"] if seed is not None else None)
    if reference is not None:
        axes.axhline(
            scale * reference,
            color="black",
            linestyle="--",
            label="seed" + (" (itself)" if probe == "general" else ""),
        )
        if seed is not None and seed["low"] < seed["high"]:
            axes.axhspan(scale * seed["low"], scale * seed["high"], color="gray", alpha=0.2, label="seed, 95 % CI")
        axes.legend(loc="lower right")
    axes.margins(y=0.12)
    axes.set_ylabel(f"{column_label(probe)}{' (%)' if scale == 100 else ''}")
    axes.set_title(
        f"{column_label(probe)}, n={report['items'][probe]}, {len(report['seeds'])} seeds (95 % CI): "
        f"{report['model'].split('/')[-1]}"
    )
    axes.tick_params(axis="x", labelrotation=15)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
