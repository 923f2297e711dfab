# Copyright 2026 The trl_selfdistill developers. Licensed under the Apache License, Version 2.0.
"""Stage 0 of the forgetting experiment: how far each style of the addition task's references is from the seed model,
and what SDFT makes of it, before any training (`trl_selfdistill.evaluation.screening`).

For each answer style (native, German, calculator log) of the same training questions: the seed model's NLL per
reference token and the share of tokens above 3 nats; for each way of making SDFT's targets (greedy or sampled
rewrites, several samples with the first or least surprising passing one, own answer first) and each checker (`math`,
`math_strict`): how many targets are generated, the NLL of what SDFT trains on and of the generated targets alone,
how many hold a false equation, how many copy the reference's style. Writes `screening.json` and `screening.md`.

    python examples/screen_reference_styles.py --several_samples_for german \
        --output_dir benchmarks/results/reference-styles-smollm2-cpu

About 40 minutes on 2 CPU cores for 160 rows in bfloat16 (10 generation passes); a rerun reuses the rewrite cache,
and so does a forgetting benchmark with the same model, rows and decoding.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field

import _common  # noqa: F401  first: its warning filters
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import TrlParser

from trl_selfdistill import BUNDLED_MODEL_NAME, resolve_model_name
from trl_selfdistill.data import ADDITION_STYLES
from trl_selfdistill.evaluation.screening import (
    QUALIFYING,
    SCREENED_CHECKERS,
    TARGET_OPTIONS,
    markdown_table,
    qualifying_options,
    screen_styles,
)


@dataclass
class ScreeningArguments:
    model_name_or_path: str = field(default=BUNDLED_MODEL_NAME, metadata={"help": "The seed model."})
    dtype: str = field(default="bfloat16", metadata={"help": "The seed model's dtype (as the benchmark loads it)."})
    rows: int = field(default=160, metadata={"help": "Training questions of the bundled addition task screened."})
    styles: list[str] = field(default_factory=lambda: list(ADDITION_STYLES), metadata={"help": "Answer styles."})
    options: list[str] = field(
        default_factory=lambda: [option.name for option in TARGET_OPTIONS],
        metadata={"help": f"Target options: {', '.join(option.name for option in TARGET_OPTIONS)}."},
    )
    checkers: list[str] = field(default_factory=lambda: list(SCREENED_CHECKERS), metadata={"help": "Checkers."})
    several_samples_for: list[str] | None = field(
        default=None,
        metadata={"help": "Styles screened with the options that sample several rewrites (default: every style)."},
    )
    seed: int = field(default=42, metadata={"help": "Seed of the sampled rewrites (the benchmark's first seed)."})
    batch_size: int = field(default=16, metadata={"help": "Prompts generated together."})
    cache_dir: str | None = field(default=None, metadata={"help": "Root of the rewrite cache (default: shared)."})
    output_dir: str = field(
        default="outputs/reference-styles", metadata={"help": "Where screening.json and screening.md are written."}
    )


def main(args: ScreeningArguments) -> dict:
    unknown = sorted(set(args.options) - {option.name for option in TARGET_OPTIONS})
    if unknown:
        raise SystemExit(f"Unknown target option(s) {unknown}; choose among {[o.name for o in TARGET_OPTIONS]}.")
    started = time.monotonic()
    path = resolve_model_name(args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype))
    screened = screen_styles(
        model,
        tokenizer,
        rows=args.rows,
        styles=args.styles,
        options=[option for option in TARGET_OPTIONS if option.name in args.options],
        checkers=args.checkers,
        several_samples_for=args.several_samples_for,
        seed=args.seed,
        batch_size=args.batch_size,
        cache_dir=args.cache_dir,
    )
    qualifying = qualifying_options(screened)
    record = {
        "model": args.model_name_or_path,
        "dtype": args.dtype,
        "rows": args.rows,
        "seed": args.seed,
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}",
        "seconds": round(time.monotonic() - started),
        "options": {option.name: option.description for option in TARGET_OPTIONS if option.name in args.options},
        "qualifying_rule": QUALIFYING,
        "qualifying": qualifying,
        "styles": screened,
    }
    table = markdown_table(screened)
    summary = "\n".join(
        f"- {style}: " + (", ".join(f"{option} ({checker})" for option, checker in found) or "no option qualifies")
        for style, found in qualifying.items()
    ) or "- no style's references are 2 nats/token or more from the seed model"
    text = (
        f"Reference styles screened on {args.rows} training questions, {args.model_name_or_path} ({args.dtype}), "
        f"{record['date']}, {record['machine']}, {record['seconds']} s.\n\n{table}\n"
        "Qualifying (references >= 2 nats/token; >= 70 % targets generated; trained-on NLL >= 0.5 nat/token below "
        f"the references):\n\n{summary}\n"
    )
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "screening.json"), "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=1)
    with open(os.path.join(args.output_dir, "screening.md"), "w", encoding="utf-8") as handle:
        handle.write(text)
    print(text)
    return record


if __name__ == "__main__":
    (script_args,) = TrlParser((ScreeningArguments,)).parse_args_and_config()
    main(script_args)
