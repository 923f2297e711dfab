"""The forgetting benchmark's report: a markdown table shaped as the SDFT paper's, a JSON file, one chart per probe.

Written into the benchmark's output directory:

- `forgetting_benchmark.json`: every score, the sample sizes, the settings, and each arm's training record;
- `forgetting_benchmark.md`: the table (one row per model, the seed first) and the distribution gap of the arms that
  rewrite their data;
- `chart_<probe>.png`: the arms side by side, the seed model as a dashed reference line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
from typing import Any

from .arms import ARMS, SEED_MODEL
from .probes import PROBES, ProbeArguments

REPORT_JSON = "forgetting_benchmark.json"
REPORT_MARKDOWN = "forgetting_benchmark.md"
CHART_FILE = "chart_{probe}.png"
_TRAINING_SETTINGS = (
    "max_steps",
    "learning_rate",
    "lr_scheduler_type",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_length",
    "seed",
    "distill_template",
    "distill_checker",
    "distill_alpha",
    "distill_temperature",
    "reuse_fraction",
)


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


def scores(
    results: dict[str, dict[str, Any]], similarities: dict[str, dict[str, Any]]
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """`{model: {probe: score}}` and `{model: {probe: standard error}}`.

    `general` is the similarity to the seed (None for the seed itself). The standard error is the binomial one for a
    rate, `sqrt(p (1 - p) / n)`, and the standard deviation over prompts divided by `sqrt(n)` for the similarity: on
    a few dozen items, differences within about two of them are noise.
    """
    table, errors = {}, {}
    for model, probes in results.items():
        row, row_errors = {}, {}
        for name, result in probes.items():
            if name == "general":
                if model not in similarities:
                    row[name] = row_errors[name] = None
                    continue
                per_prompt = similarities[model]["per_prompt"]
                row[name] = similarities[model]["mean_cosine_similarity"]
                row_errors[name] = (
                    statistics.stdev(per_prompt) / math.sqrt(len(per_prompt)) if len(per_prompt) > 1 else 0.0
                )
            else:
                row[name] = result[PROBES[name].score_key]
                n = _count(result)
                row_errors[name] = math.sqrt(row[name] * (1 - row[name]) / n) if n else None
        table[model], errors[model] = row, row_errors
    return table, errors


def write_report(
    output_dir: str,
    *,
    model_name: str,
    dataset_name: str | None,
    arms: list[str],
    records: dict[str, dict[str, Any]],
    results: dict[str, dict[str, Any]],
    similarities: dict[str, dict[str, Any]],
    probe_args: ProbeArguments,
    training_args,
    peft_config=None,
) -> dict[str, Any]:
    """Writes the JSON, the markdown table and the charts; returns the report."""
    items = {name: _count(results[SEED_MODEL][name]) for name in probe_args.probes}
    table, errors = scores(results, similarities)
    report = {
        "model": model_name,
        "dataset": dataset_name,
        "models": [SEED_MODEL, *arms],
        "labels": {model: label_of(model) for model in [SEED_MODEL, *arms]},
        "scores": table,
        "standard_errors": errors,
        "items": items,
        "distribution_gap": {
            arm: {key: records[arm]["distillation"].get(key) for key in _GAP_KEYS}
            for arm in arms
            if "distillation" in records[arm]
        },
        "training": {key: getattr(training_args, key) for key in _TRAINING_SETTINGS if hasattr(training_args, key)},
        "lora": _lora_settings(peft_config),
        "train_loss": {arm: records[arm]["train"].get("train_loss") for arm in arms},
        "probes": dataclasses.asdict(probe_args),
    }
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, REPORT_JSON), "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    with open(os.path.join(output_dir, REPORT_MARKDOWN), "w", encoding="utf-8") as handle:
        handle.write(markdown_table(report))
    for probe in probe_args.probes:
        draw_chart(report, probe, os.path.join(output_dir, CHART_FILE.format(probe=probe)))
    return report


_GAP_KEYS = ("total", "accepted", "seed_nll_reference", "seed_nll_distilled")


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


def _count(result: dict[str, Any]) -> int:
    return result.get("total", len(result.get("outputs", [])))


def _cell(probe: str, value: float | None, error: float | None) -> str:
    if value is None:
        return "—"
    if probe == "general":
        return f"{value:.3f} ± {error:.3f}" if error is not None else f"{value:.3f}"
    return f"{100 * value:.1f} ± {100 * error:.1f}" if error is not None else f"{100 * value:.1f}"


def markdown_table(report: dict[str, Any]) -> str:
    """The paper-shaped table: percentages for the probes, the similarity to the seed as a fraction, ± one standard
    error (when the report has them)."""
    probes = list(report["items"])
    header = ["model", *(f"{PROBES[p].label} (n={report['items'][p]})" for p in probes)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model in report["models"]:
        model_errors = report.get("standard_errors", {}).get(model, {})
        cells = [
            report["labels"][model],
            *(_cell(p, report["scores"][model].get(p), model_errors.get(p)) for p in probes),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    if "standard_errors" in report:
        text += "\n± one standard error: differences within about two of them are noise.\n"
    gaps = report["distribution_gap"]
    if gaps:
        text += (
            "\nDistribution gap of the training targets (the seed model's mean per-token NLL, lower is closer to its "
            "own distribution):\n\n"
            "| arm | rewrites accepted | NLL of the references | NLL of the targets trained on |\n|---|---|---|---|\n"
        )
        for arm, gap in gaps.items():
            nll = [f"{gap[key]:.3f}" if gap.get(key) is not None else "—" for key in _GAP_KEYS[2:]]
            text += f"| {report['labels'][arm]} | {gap['accepted']}/{gap['total']} | {nll[0]} | {nll[1]} |\n"
    return text


def draw_chart(report: dict[str, Any], probe: str, path: str) -> None:
    """The arms' scores on one probe as bars (± one standard error), the seed model's as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    arms = [model for model in report["models"] if model != SEED_MODEL]
    percent = probe != "general"
    values = [report["scores"][arm].get(probe) or 0.0 for arm in arms]
    seed = 1.0 if probe == "general" else report["scores"][SEED_MODEL].get(probe)
    scale = 100 if percent else 1
    figure, axes = plt.subplots(figsize=(7, 4))
    errors = [(report.get("standard_errors", {}).get(arm, {}).get(probe) or 0.0) * scale for arm in arms]
    bars = axes.bar(
        [report["labels"][arm] for arm in arms], [scale * v for v in values], yerr=errors, capsize=4, color="tab:blue"
    )
    axes.bar_label(bars, fmt="%.1f" if percent else "%.3f")
    if seed is not None:
        axes.axhline(scale * seed, color="black", linestyle="--", label="seed" + (" (itself)" if not percent else ""))
        axes.legend(loc="lower right")
    axes.set_ylabel(f"{PROBES[probe].label}{' (%)' if percent else ''}")
    axes.set_title(f"{PROBES[probe].label}, n={report['items'][probe]}: {report['model'].split('/')[-1]}")
    axes.tick_params(axis="x", labelrotation=15)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
