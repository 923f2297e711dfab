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

from .arms import ARMS, SEED_MODEL
from .probes import PROBES, ProbeArguments, item_outcomes
from .stats import Estimate, mean_over_items, mean_over_seeds, paired_difference

REPORT_JSON = "forgetting_benchmark.json"
REPORT_MARKDOWN = "forgetting_benchmark.md"
CHART_FILE = "chart_{probe}.png"
BASELINE_ARM = "sft"
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


def per_item(
    results: dict[str, dict[str, Any]], similarities: dict[str, dict[str, Any]], model: str, probe: str
) -> list[float]:
    """One model's outcome on each of the probe's items; for `general`, each prompt's similarity to the seed's."""
    if probe == "general":
        return list(similarities[model]["per_prompt"])
    return item_outcomes(probe, results[model][probe])


def aggregate(
    arms: list[str],
    seeds: list[int],
    probes: list[str],
    results: dict[str, dict[str, Any]],
    similarities: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Means with intervals, per-seed scores and paired differences, as JSON values.

    `results` is keyed by model: `seed` and `<arm>/seed-<seed>`. Returns `{"scores", "per_seed", "vs_sft",
    "vs_seed"}`; `vs_sft` is present for every arm but SFT when SFT is an arm; `general` has no seed-model score.
    An arm compared with another arm too (`Arm.beside`, when that arm is in the run) adds `vs_<other arm>`, e.g.
    `vs_sdft`, with the same paired differences.
    """
    scores: dict[str, dict[str, Any]] = {SEED_MODEL: {}}
    per_seed: dict[str, dict[str, list[float]]] = {}
    vs_sft: dict[str, dict[str, Any]] = {}
    vs_seed: dict[str, dict[str, Any]] = {}
    besides = beside_arms(arms)
    vs_beside: dict[str, dict[str, dict[str, Any]]] = {f"vs_{other}": {} for other in besides.values()}
    for probe in probes:
        seed_items = None if probe == "general" else per_item(results, similarities, SEED_MODEL, probe)
        scores[SEED_MODEL][probe] = None if seed_items is None else mean_over_items(seed_items).as_dict()
        items = {arm: [per_item(results, similarities, f"{arm}/seed-{seed}", probe) for seed in seeds] for arm in arms}
        for arm in arms:
            runs = [statistics.fmean(row) for row in items[arm]]
            per_seed.setdefault(arm, {})[probe] = runs
            scores.setdefault(arm, {})[probe] = mean_over_seeds(runs).as_dict()
            if seed_items is not None:
                vs_seed.setdefault(arm, {})[probe] = paired_difference(items[arm], [seed_items]).as_dict()
            if BASELINE_ARM in arms and arm != BASELINE_ARM:
                vs_sft.setdefault(arm, {})[probe] = paired_difference(items[arm], items[BASELINE_ARM]).as_dict()
            if arm in besides:
                difference = paired_difference(items[arm], items[besides[arm]]).as_dict()
                vs_beside[f"vs_{besides[arm]}"].setdefault(arm, {})[probe] = difference
    return {"scores": scores, "per_seed": per_seed, "vs_sft": vs_sft, "vs_seed": vs_seed, **vs_beside}


def ifeval_metrics(results: dict[str, dict[str, Any]], arms: list[str], seeds: list[int]) -> dict[str, Any]:
    """lm-eval's four IFEval accuracies per model (trained arms: mean over seeds)."""
    table = {SEED_MODEL: {metric: results[SEED_MODEL]["ifeval"][metric] for metric in IFEVAL_METRICS}}
    for arm in arms:
        table[arm] = {
            metric: statistics.fmean(results[f"{arm}/seed-{seed}"]["ifeval"][metric] for seed in seeds)
            for metric in IFEVAL_METRICS
        }
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

    A setting that differs between arms other than by the arm's own definition (its DynSDPB mode, its seed) means
    results of different runs were mixed: refused, naming the setting.
    """
    arm_specific = {"seed", "dynsdpb_mode"}
    merged: dict[str, Any] = {}
    for arm, by_seed in records.items():
        for seed, record in by_seed.items():
            run = f"{arm}/seed-{seed}"
            for key, value in record.get("settings", {}).items():
                if key in arm_specific:
                    continue
                if key in merged and merged[key][1] != value and key in _SHARED_KEYS:
                    raise ValueError(
                        f"The arms were trained with different `{key}`: {merged[key][0]} has {merged[key][1]!r}, "
                        f"{run} has {value!r}. Rerun the benchmark: arms whose settings changed are trained again."
                    )
                merged.setdefault(key, (run, value))
    return {key: value for key, (_, value) in merged.items() if key in _SHARED_KEYS}


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
    peft_config=None,
    elapsed_seconds: float | None = None,
) -> dict[str, Any]:
    """Writes the JSON, the markdown tables and the charts; returns the report."""
    probes = list(probe_args.probes)
    report: dict[str, Any] = {
        "model": model_name,
        "dataset": dataset_name,
        "models": [SEED_MODEL, *arms],
        "labels": {model: label_of(model) for model in [SEED_MODEL, *arms]},
        "seeds": seeds,
        "items": {name: len(per_item(results, similarities, f"{arms[0]}/seed-{seeds[0]}", name)) for name in probes},
        **aggregate(arms, seeds, probes, results, similarities),
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
        report["ifeval"] = ifeval_metrics(results, arms, seeds)
    task_probe = next((name for name in ("addition", "gsm8k") if name in probes), None)
    if task_probe is not None and report["vs_seed"]:
        report["targets"] = {"task_probe": task_probe, **task_targets(report, task_probe)}
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, REPORT_JSON), "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    with open(os.path.join(output_dir, REPORT_MARKDOWN), "w", encoding="utf-8") as handle:
        handle.write(markdown_report(report))
    for probe in probes:
        draw_chart(report, probe, os.path.join(output_dir, CHART_FILE.format(probe=probe)))
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
    return 1.0 if probe == "general" else 100.0


def _estimate_cell(probe: str, estimate: dict[str, Any] | None) -> str:
    """`mean [low, high]`: percentages for rates, fractions for the similarity."""
    if estimate is None:
        return "—"
    scale, digits = _scale(probe), (3 if probe == "general" else 1)
    mean, low, high = (scale * estimate[key] for key in ("mean", "low", "high"))
    if low == high:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _difference_cell(probe: str, estimate: dict[str, Any] | None) -> str:
    if estimate is None:
        return "—"
    scale, digits = _scale(probe), (3 if probe == "general" else 1)
    mean, low, high = (scale * estimate[key] for key in ("mean", "low", "high"))
    bold = "**" if Estimate(**estimate).excludes_zero() else ""
    return f"{bold}{mean:+.{digits}f}{bold} [{low:+.{digits}f}, {high:+.{digits}f}]"


def _header(report: dict[str, Any], first: str) -> list[str]:
    probes = list(report["items"])
    header = [first, *(f"{PROBES[p].label} (n={report['items'][p]})" for p in probes)]
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]


def markdown_report(report: dict[str, Any]) -> str:
    """The scores, the paired differences from vanilla SFT and from the seed model, the targets and the gaps."""
    probes = list(report["items"])
    seeds = report["seeds"]
    lines = [
        f"Scores: mean over {len(seeds)} training seed(s) {seeds} with its 95 % interval over seeds; the seed model "
        "is one run, its interval over items. Rates in %, the similarity to the seed model's answers as a fraction.",
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
    if any(d.get("item_share") is not None for by_probe in report["vs_sft"].values() for d in by_probe.values()):
        lines += ["", _sample_size_line(report)]
    if "ifeval" in report:
        lines += ["", "IFEval, lm-eval's four accuracies (%; trained arms: mean over seeds):", ""]
        lines += ["| model | " + " | ".join(IFEVAL_METRICS) + " |", "|" + "---|" * (len(IFEVAL_METRICS) + 1)]
        for model in report["models"]:
            values = report["ifeval"][model]
            lines.append(
                f"| {report['labels'][model]} | " + " | ".join(f"{100 * values[m]:.1f}" for m in IFEVAL_METRICS) + " |"
            )
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


def _sample_size_line(report: dict[str, Any]) -> str:
    """Where the differences from SFT get their noise: the probe's items or the training seeds (choosing sizes)."""
    shares = []
    for probe in report["items"]:
        values = [
            d[probe]["item_share"] for d in report["vs_sft"].values() if d.get(probe, {}).get("item_share") is not None
        ]
        if values:
            shares.append(f"{PROBES[probe].label} {statistics.fmean(values):.2f}")
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
    axes.set_ylabel(f"{PROBES[probe].label}{' (%)' if scale == 100 else ''}")
    axes.set_title(
        f"{PROBES[probe].label}, n={report['items'][probe]}, {len(report['seeds'])} seeds (95 % CI): "
        f"{report['model'].split('/')[-1]}"
    )
    axes.tick_params(axis="x", labelrotation=15)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
