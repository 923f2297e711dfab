"""Stage 0 of the forgetting experiment: which reference style is far from the seed model, and what SDFT makes of it.

No training. SDFT's premise is that references far from the seed model's own distribution make fine-tuning forget,
and that the seed model's rewrites of them close that gap. Before a benchmark can test it, the references must be far
(a gap to close) and SDFT's targets must be closer while still teaching the task. For each answer style of the same
questions (`data.ADDITION_STYLES`), this measures:

- the references: the seed model's NLL per token (pooled over tokens), the share of tokens above 3 nats (the rare,
  very unlikely tokens that carry forgetting in the dose-response of arXiv 2501.14315), tokens per reference;
- for each way of making SDFT's targets (`TARGET_OPTIONS`) and each checker (`math`: the last number; `math_strict`:
  also every simple equation true): the share of responses whose target is generated (not the reference), the NLL of
  what SDFT trains on (generated targets, references elsewhere) and of the generated targets alone, how many generated
  targets hold a false equation, and how many still carry the reference's style (`STYLE_MARKERS`).

Every generation goes through `distill_dataset` and its cache, so a rerun, or a benchmark with the same model,
prompts and decoding, reuses it; the checker runs after the cache, so the strict checker costs nothing more.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from datasets import Dataset

from ..data import ADDITION_STYLES, bundled_addition, gsm8k_to_prompt_completion
from ..generation import TransformersEngine
from ..sdft.checkers import false_equations
from ..sdft.gap import response_rows
from ..sdft.rewrite import distill_dataset

HIGH_NLL = 3.0  # nats: a token the model gives less than 5 % probability
GREEDY = {"do_sample": False, "max_new_tokens": 256}
SAMPLED = {"max_new_tokens": 256}  # the paper's sampling: temperature 0.95, top-p 0.7, top-k 50
SCREENED_CHECKERS = ("math", "math_strict")
STYLE_MARKERS = {
    "native": re.compile(r"\(\d+ \+ \d+\) \+ \(\d+ \+ \d+\)"),
    "german": re.compile(r"\b(?:Zuerst|Zehner|Einer|Zusammen|ergibt|Antwort|lautet|addieren)\b"),
    "calculator": re.compile(r"\{\{|####"),
}
"""What marks a text as written in a style: a target that holds it copies the reference's style."""


@dataclass(frozen=True)
class TargetOption:
    """One way of making SDFT's training targets: `distill_dataset` keyword arguments besides template and checker."""

    name: str
    description: str
    options: dict[str, Any] = field(default_factory=dict)


TARGET_OPTIONS = (
    TargetOption("greedy", "one greedy rewrite", {"generation_kwargs": GREEDY}),
    TargetOption("sampled", "one rewrite with the paper's sampling", {"generation_kwargs": SAMPLED}),
    TargetOption(
        "sampled_x4_first",
        "4 sampled rewrites, the first that passes",
        {"generation_kwargs": SAMPLED, "rewrite_samples": 4},
    ),
    TargetOption(
        "sampled_x4_lowest_nll",
        "4 sampled rewrites, the least surprising that passes",
        {"generation_kwargs": SAMPLED, "rewrite_samples": 4, "selection": "lowest_nll"},
    ),
    TargetOption(
        "own_answer_greedy",
        "the seed model's own greedy answer first, then the greedy rewrite",
        {"generation_kwargs": GREEDY, "candidates": ["own_answer", "rewrite"]},
    ),
)


def reference_statistics(engine: TransformersEngine, tokenizer: Any, dataset: Dataset) -> dict[str, float]:
    """The seed model's NLL per token of the references (pooled), the share of their tokens above `HIGH_NLL`, and
    their mean length in tokens (end token included, as SFT trains it)."""
    losses = token_nlls(engine, tokenizer, dataset["prompt"], dataset["completion"])
    pooled = [loss for row in losses for loss in row]
    return {
        "seed_nll": statistics.fmean(pooled),
        "share_above_3_nats": sum(loss > HIGH_NLL for loss in pooled) / len(pooled),
        "tokens": len(pooled) / len(losses),
    }


def token_nlls(engine: TransformersEngine, tokenizer: Any, prompts: Sequence, responses: Sequence) -> list:
    """Per-token NLL of each response after its instruction, as `sdft.gap` scores it (chat format, end token)."""
    pairs = [
        (_text(prompt, "user"), _text(response, "assistant"))
        for prompt, response in zip(prompts, responses, strict=True)
    ]
    return engine.token_nlls(response_rows(tokenizer, pairs))


def _text(part: Any, role: str) -> str:
    """A prompt-completion row's instruction or response: the string, or the last message of that role."""
    if isinstance(part, str):
        return part
    return next(message["content"] for message in reversed(part) if message["role"] == role)


def screen_option(
    engine: TransformersEngine,
    tokenizer: Any,
    dataset: Dataset,
    style: str,
    option: TargetOption,
    checker: str,
    *,
    seed: int,
    cache_dir: str | None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """What SDFT makes of `dataset` with one target option and checker (see the module docstring)."""
    result = distill_dataset(
        engine.model,
        tokenizer,
        dataset,
        engine=engine,
        template="gsm8k",
        checker=checker,
        seed=seed,
        cache_dir=cache_dir,
        show_progress=show_progress,
        **option.options,
    )
    report, total = result.report, result.report["total"]
    generated = [i for i, entry in enumerate(result.rows) if entry["accepted"]]
    targets = [_text(result.dataset["completion"][i], "assistant") for i in generated]
    nlls = token_nlls(engine, tokenizer, [dataset["prompt"][i] for i in generated], targets) if generated else []
    pooled = [loss for row in nlls for loss in row]
    marker = STYLE_MARKERS[style]
    screened = {
        "accepted": report["accepted"],
        "total": total,
        "accepted_share": report["accepted"] / total,
        "seed_nll_reference": report.get("seed_nll_reference"),
        "seed_nll_trained_on": report.get("seed_nll_distilled"),
        "seed_nll_generated_targets": statistics.fmean(pooled) if pooled else None,
        "generated_with_false_equation": sum(bool(false_equations(text)) for text in targets),
        "generated_in_reference_style": sum(bool(marker.search(text)) for text in targets),
        "rejected": {key[len("rejected_") :]: value for key, value in report.items() if key.startswith("rejected_")},
    }
    for source in ("target_own_answer", "target_rewrite", "target_reference"):
        if source in report:
            screened[source] = report[source]
    screened["generated"] = [{"row": i, "text": text} for i, text in zip(generated, targets, strict=True)]
    return screened


def screen_styles(
    model: Any,
    tokenizer: Any,
    *,
    rows: int,
    styles: Sequence[str] = ADDITION_STYLES,
    options: Sequence[TargetOption] = TARGET_OPTIONS,
    checkers: Sequence[str] = SCREENED_CHECKERS,
    several_samples_for: Sequence[str] | None = None,
    seed: int = 42,
    batch_size: int | str = "auto",
    cache_dir: str | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Every style's reference statistics and every target option x checker on the first `rows` training questions
    of the bundled addition task: `{style: {"references": {...}, "options": {option: {checker: {...}}}}}`.

    The options that sample several rewrites per response (a generation pass each) run only for the styles in
    `several_samples_for` (default: every style).
    """
    engine = TransformersEngine(model, tokenizer, batch_size)
    screened: dict[str, Any] = {}
    for style in styles:
        dataset = gsm8k_to_prompt_completion(bundled_addition("train", n=rows, style=style))
        by_option = {}
        for option in options:
            if option.options.get("rewrite_samples", 1) > 1 and several_samples_for is not None:
                if style not in several_samples_for:
                    continue
            by_option[option.name] = {
                checker: screen_option(
                    engine, tokenizer, dataset, style, option, checker,
                    seed=seed, cache_dir=cache_dir, show_progress=show_progress,
                )  # fmt: skip
                for checker in checkers
            }
        screened[style] = {"references": reference_statistics(engine, tokenizer, dataset), "options": by_option}
    return screened


QUALIFYING = {"reference_nll": 2.0, "accepted_share": 0.7, "gap_closed": 0.5}
"""A foreign style qualifies for the benchmark when its references are at least 2 nats/token under the seed model, and
some target option generates at least 70 % of the targets while what SDFT trains on is at least 0.5 nat/token closer to
the seed model than the references (the issue's rule, fixed before the screening ran)."""


def qualifying_options(screened: dict[str, Any]) -> dict[str, list[tuple[str, str]]]:
    """`{style: [(option, checker), ...]}`: the options that meet `QUALIFYING`, for the styles whose references do."""
    qualifying = {}
    for style, entry in screened.items():
        reference_nll = entry["references"]["seed_nll"]
        if reference_nll < QUALIFYING["reference_nll"]:
            continue
        qualifying[style] = [
            (option, checker)
            for option, by_checker in entry["options"].items()
            for checker, row in by_checker.items()
            if row["accepted_share"] >= QUALIFYING["accepted_share"]
            and reference_nll - row["seed_nll_trained_on"] >= QUALIFYING["gap_closed"]
        ]
    return qualifying


def markdown_table(screened: dict[str, Any]) -> str:
    """One row per style, option and checker: the numbers the style is chosen by."""
    lines = [
        "| style | ref. tokens | ref. NLL/token | ref. tokens > 3 nats | targets | checker | generated targets | "
        "NLL trained on | NLL generated alone | false equation | reference's style |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for style, entry in screened.items():
        references = entry["references"]
        for option, by_checker in entry["options"].items():
            for checker, row in by_checker.items():
                generated_nll = row["seed_nll_generated_targets"]
                lines.append(
                    f"| {style} | {references['tokens']:.0f} | {references['seed_nll']:.3f} | "
                    f"{100 * references['share_above_3_nats']:.0f} % | {option} | {checker} | "
                    f"{row['accepted']}/{row['total']} ({100 * row['accepted_share']:.0f} %) | "
                    f"{row['seed_nll_trained_on']:.3f} | "
                    f"{'—' if generated_nll is None else f'{generated_nll:.3f}'} | "
                    f"{row['generated_with_false_equation']} | {row['generated_in_reference_style']} |"
                )
    return "\n".join(lines) + "\n"
