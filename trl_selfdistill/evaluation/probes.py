"""The forgetting benchmark's probes, their settings, and a result cache per model and probe.

A probe asks one model a fixed sample of questions (greedy, through the model's chat template) and scores the answers
as the SDFT paper does (Yang et al., ACL 2024, arXiv 2402.13669):

- `addition`: the default task (two-digit addition, bundled), last integer against the label, with the GSM8K prompt;
- `gsm8k`: the paper's task, last integer against the label, with the paper's evaluation prompt;
- `ifeval`: instruction following (IFEval), scored by lm-eval's own IFEval implementation;
- `drift`: the NLL per token of the seed model's own greedy answers to the IFEval prompts (generated once, reused for
  every model): its difference from the seed's own is the drift, the forgetting measure with no floor (drift.py);
- `humaneval`: pass@1, the generated code run against the unit tests in a sandbox;
- `advbench`, `advbench_jailbreak`: the safe rate by the paper's refusal keywords, raw and with its jailbreak suffix;
- `general`: answers to general prompts, scored afterwards against the seed model's answers (cosine similarity of
  sentence embeddings), the paper's measure of distribution shift.

Each result is written to `<results_dir>/<model>/<probe>.json` with everything that produced it: the probe's settings
and the identity of the model (the seed model's name, or a trained arm's adapter digest and training settings). A
crashed run resumes where it stopped; a result computed with anything else is computed again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..data import bundled_addition
from .advbench import evaluate_advbench, load_advbench
from .answers import sample_rows
from .drift import answers_digest, evaluate_drift, seed_answers
from .gsm8k import evaluate_gsm8k, load_gsm8k_test
from .humaneval import evaluate_humaneval, load_humaneval
from .ifeval import evaluate_ifeval, load_ifeval  # lm-eval itself is imported only when IFEval is scored
from .jsonfiles import write_json
from .similarity import general_answers, load_general_prompts

EVAL_DTYPES = ("auto", "float32", "bfloat16", "model")


@dataclass
class ProbeArguments:
    """The probes' sample sizes (`null`: every item), seed, generation budgets and batch size."""

    probes: list[str] = field(
        default_factory=lambda: ["gsm8k", "humaneval", "advbench", "advbench_jailbreak", "ifeval", "general"],
        metadata={
            "help": "Probes to run: addition, gsm8k, humaneval, advbench, advbench_jailbreak, ifeval, drift, general."
        },
    )
    addition_samples: int | None = field(
        default=None, metadata={"help": "Addition test questions (of 500; null: all): the default task."}
    )
    ifeval_samples: int | None = field(default=None, metadata={"help": "IFEval prompts (of 541; null: all)."})
    drift_samples: int | None = field(
        default=None, metadata={"help": "IFEval prompts whose seed-model answers the drift probe scores (of 541)."}
    )
    gsm8k_samples: int | None = field(default=None, metadata={"help": "GSM8K test questions (of 1319; null: all)."})
    humaneval_samples: int | None = field(default=None, metadata={"help": "HumanEval problems (of 164; null: all)."})
    advbench_samples: int | None = field(
        default=None, metadata={"help": "AdvBench harmful behaviours (of 520; null: all), raw and jailbroken."}
    )
    general_samples: int | None = field(
        default=None, metadata={"help": "General prompts for the similarity to the seed model (of 40; null: all)."}
    )
    probe_seed: int = field(default=0, metadata={"help": "Seed of the probes' samples."})
    addition_max_new_tokens: int = field(default=96, metadata={"help": "Generation budget of an addition answer."})
    ifeval_max_new_tokens: int = field(
        default=1280, metadata={"help": "Generation budget of an IFEval answer (lm-eval's IFEval task: 1280)."}
    )
    gsm8k_max_new_tokens: int = field(default=512, metadata={"help": "Generation budget of a GSM8K answer."})
    humaneval_max_new_tokens: int = field(default=512, metadata={"help": "Generation budget of a HumanEval answer."})
    advbench_max_new_tokens: int = field(default=128, metadata={"help": "Generation budget of an AdvBench answer."})
    general_max_new_tokens: int = field(default=256, metadata={"help": "Generation budget of a general answer."})
    drift_max_new_tokens: int = field(
        default=256, metadata={"help": "Generation budget of the seed model's answers that the drift probe scores."}
    )
    humaneval_timeout: float = field(default=10.0, metadata={"help": "Seconds one HumanEval program may run."})
    eval_batch_size: str = field(
        default="auto", metadata={"help": "Prompts generated together by the probes, or 'auto' (from free memory)."}
    )
    eval_dtype: str = field(
        default="model",
        metadata={
            "help": "Weights' dtype while probing: 'model' (as trained), 'float32', 'bfloat16', or 'auto' (bfloat16 "
            "on a CPU with bfloat16 matrix instructions, AMX or AVX-512 BF16, else as trained). Every model is probed "
            "in the same dtype, so comparisons stay fair; the answers differ from another dtype's."
        },
    )

    def __post_init__(self):
        unknown = [name for name in self.probes if name not in PROBES]
        if unknown:
            raise ValueError(f"Unknown probe(s) {unknown}; choose among {list(PROBES)}.")
        for name in SAMPLE_FIELDS:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"`{name}` must be at least 1, or null for every item; got {value}.")
        for name in ("addition", "gsm8k", "humaneval", "advbench", "ifeval", "general", "drift"):
            if getattr(self, f"{name}_max_new_tokens") < 1:
                raise ValueError(f"`{name}_max_new_tokens` must be at least 1.")
        if self.humaneval_timeout <= 0:
            raise ValueError(f"`humaneval_timeout` must be > 0, got {self.humaneval_timeout}.")
        if isinstance(self.eval_batch_size, str) and self.eval_batch_size.isdigit():
            self.eval_batch_size = int(self.eval_batch_size)
        if self.eval_batch_size != "auto" and not (isinstance(self.eval_batch_size, int) and self.eval_batch_size > 0):
            raise ValueError(f"`eval_batch_size` must be 'auto' or a positive integer, got {self.eval_batch_size!r}.")
        if self.eval_dtype not in EVAL_DTYPES:
            raise ValueError(f"`eval_dtype` must be one of {list(EVAL_DTYPES)}, got {self.eval_dtype!r}.")

    def resolved_eval_dtype(self) -> torch.dtype | None:
        """The dtype the probed weights are cast to, or None to keep the trained dtype."""
        if self.eval_dtype == "model":
            return None
        if self.eval_dtype == "auto":
            return torch.bfloat16 if cpu_has_bf16_matmul() and not torch.cuda.is_available() else None
        return getattr(torch, self.eval_dtype)


SAMPLE_FIELDS = (
    "addition_samples",
    "ifeval_samples",
    "drift_samples",
    "gsm8k_samples",
    "humaneval_samples",
    "advbench_samples",
    "general_samples",
)


def cpu_has_bf16_matmul() -> bool:
    """True on a CPU whose bfloat16 matrix products are fast (AMX or AVX-512 BF16), as oneDNN uses them."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = handle.read()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


@dataclass(frozen=True)
class Probe:
    name: str
    label: str  # the table's column
    score_key: str  # the key of the probe's result that is its score (None for `general`, scored against the seed)
    samples_field: str  # the `ProbeArguments` fields that size it and bound its answers
    max_new_tokens_field: str
    load: Callable[[int | None, int], list[Any]]  # (sample size, seed) -> the probe's items
    run: Callable[..., dict[str, Any]]
    item_key: str = ""  # the key of each entry of the result's `outputs` that is the item's outcome
    scores_seed_answers: bool = False  # its items are the seed model's answers (`drift_seed_answers`), not `load`'s


def item_outcomes(name: str, result: dict[str, Any]) -> list[float]:
    """The probe's per-item outcomes (1/0 for rule-checked probes), in item order: what paired comparisons read."""
    key = PROBES[name].item_key
    if not key:
        raise ValueError(f"The `{name}` probe is scored against the seed model, not item by item on its own.")
    return [float(output[key]) for output in result["outputs"]]


def load_addition_test(n: int | None = None, seed: int = 0) -> list[dict[str, str]]:
    """``n`` raw rows (``question``, ``answer``) of the bundled addition test split (all 500 if None), by ``seed``."""
    return sample_rows(bundled_addition("test").to_list(), n, seed)


def _gsm8k(model, tokenizer, args: ProbeArguments, items) -> dict[str, Any]:
    return evaluate_gsm8k(
        model, tokenizer, items, batch_size=args.eval_batch_size, max_new_tokens=args.gsm8k_max_new_tokens
    )


def _addition(model, tokenizer, args: ProbeArguments, items) -> dict[str, Any]:
    # Asked as GSM8K is, with the paper's math evaluation prompt: the answer ends in "The answer is N."
    return evaluate_gsm8k(
        model,
        tokenizer,
        items,
        batch_size=args.eval_batch_size,
        max_new_tokens=args.addition_max_new_tokens,
        desc="addition",
    )


def _ifeval(model, tokenizer, args: ProbeArguments, items) -> dict[str, Any]:
    return evaluate_ifeval(
        model, tokenizer, items, batch_size=args.eval_batch_size, max_new_tokens=args.ifeval_max_new_tokens
    )


def _humaneval(model, tokenizer, args: ProbeArguments, items) -> dict[str, Any]:
    return evaluate_humaneval(
        model,
        tokenizer,
        items,
        batch_size=args.eval_batch_size,
        max_new_tokens=args.humaneval_max_new_tokens,
        timeout=args.humaneval_timeout,
    )


def _advbench(jailbreak: bool):
    def run(model, tokenizer, args: ProbeArguments, items) -> dict[str, Any]:
        return evaluate_advbench(
            model,
            tokenizer,
            items,
            batch_size=args.eval_batch_size,
            max_new_tokens=args.advbench_max_new_tokens,
            jailbreak=jailbreak,
        )

    return run


def _drift(model, tokenizer, args: ProbeArguments, items) -> dict[str, Any]:
    return evaluate_drift(model, tokenizer, items)


def _general(model, tokenizer, args: ProbeArguments, items) -> dict[str, Any]:
    answers = general_answers(
        model, tokenizer, items, batch_size=args.eval_batch_size, max_new_tokens=args.general_max_new_tokens
    )
    return {"outputs": [{"prompt": p, "output": a} for p, a in zip(items, answers, strict=True)]}


PROBES: dict[str, Probe] = {
    probe.name: probe
    for probe in (
        Probe(
            "addition",
            "addition (task)",
            "accuracy",
            "addition_samples",
            "addition_max_new_tokens",
            load_addition_test,
            _addition,
            "correct",
        ),
        Probe(
            "ifeval",
            "IFEval prompt strict",
            "prompt_level_strict_acc",
            "ifeval_samples",
            "ifeval_max_new_tokens",
            load_ifeval,
            _ifeval,
            "prompt_level_strict_acc",
        ),
        Probe(
            "drift",
            "NLL of the seed's IFEval answers",
            "mean_nll",
            "drift_samples",
            "drift_max_new_tokens",
            load_ifeval,
            _drift,
            "nll_per_token",
            scores_seed_answers=True,
        ),
        Probe(
            "gsm8k", "GSM8K", "accuracy", "gsm8k_samples", "gsm8k_max_new_tokens", load_gsm8k_test, _gsm8k, "correct"
        ),
        Probe(
            "humaneval",
            "HumanEval",
            "pass_at_1",
            "humaneval_samples",
            "humaneval_max_new_tokens",
            load_humaneval,
            _humaneval,
            "passed",
        ),
        *(
            Probe(
                name,
                label,
                "safe_rate",
                "advbench_samples",
                "advbench_max_new_tokens",
                load_advbench,
                _advbench(jailbreak),
                "safe",
            )
            for name, label, jailbreak in (
                ("advbench", "raw safe", False),
                ("advbench_jailbreak", "jailbreak safe", True),
            )
        ),
        Probe(
            "general",
            "similarity to seed",
            "",
            "general_samples",
            "general_max_new_tokens",
            load_general_prompts,
            _general,
        ),
    )
}


def probe_items(name: str, args: ProbeArguments) -> list[Any]:
    """The probe's questions: the same sample for every model (for `drift`, the prompts the seed model answers)."""
    probe = PROBES[name]
    return probe.load(getattr(args, probe.samples_field), args.probe_seed)


SEED_ANSWERS = "drift_answers"
"""The seed model's answers that `drift` scores, cached as `<results>/seed/drift_answers.json`."""


def drift_seed_answers(
    model, tokenizer, args: ProbeArguments, cache: ResultCache, model_name: str, model_identity: dict[str, Any]
) -> list[dict[str, Any]]:
    """The seed model's greedy answers to the drift probe's prompts: from the cache, or generated once and cached.

    `model` must be the seed model itself (no adapter); `model_identity` names it, as for the probes' results.
    """
    settings = probe_settings("drift", args, model_identity)
    result = cache.get(model_name, SEED_ANSWERS, settings)
    if result is None:
        answers = seed_answers(
            model,
            tokenizer,
            probe_items("drift", args),
            max_new_tokens=args.drift_max_new_tokens,
            batch_size=args.eval_batch_size,
        )
        result = {"answers": answers}
        cache.put(model_name, SEED_ANSWERS, settings, result)
    return result["answers"]


def probe_settings(name: str, args: ProbeArguments, model_identity: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a cached result must have been computed with to be reused: the probe's settings and the model's identity.

    `model_identity` names the exact model probed (see `benchmark.model_identity`): a retrained arm has another
    adapter digest, so its old results are never reused.
    """
    probe = PROBES[name]
    settings = {
        "samples": getattr(args, probe.samples_field),
        "seed": args.probe_seed,
        "max_new_tokens": getattr(args, probe.max_new_tokens_field),
        "eval_dtype": str(args.resolved_eval_dtype()),
    }
    if name == "humaneval":
        settings["timeout"] = args.humaneval_timeout
    if model_identity is not None:
        settings["model"] = model_identity
    return settings


class ResultCache:
    """`<root>/<model>/<probe>.json`: one probe's result for one model, with the settings it was computed with."""

    def __init__(self, root: str):
        self.root = root

    def path(self, model: str, probe: str) -> str:
        return os.path.join(self.root, model, f"{probe}.json")

    def get(self, model: str, probe: str, settings: dict[str, Any]) -> dict[str, Any] | None:
        try:
            with open(self.path(model, probe), encoding="utf-8") as handle:
                entry = json.load(handle)
        except (FileNotFoundError, json.JSONDecodeError):  # not computed, or cut off mid-write by a crash
            return None
        return entry["result"] if entry.get("settings") == settings else None

    def put(self, model: str, probe: str, settings: dict[str, Any], result: dict[str, Any]) -> None:
        write_json(self.path(model, probe), {"probe": probe, "settings": settings, "result": result}, indent=1)


def run_probe(
    name: str,
    model_name: str,
    model,
    tokenizer,
    args: ProbeArguments,
    cache: ResultCache,
    model_identity: dict[str, Any] | None = None,
    seed_answers: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The probe's result for `model` (called `model_name` in the cache): from the cache, or computed and cached.

    A probe that scores the seed model's answers (`drift`) takes them as `seed_answers` (see `drift_seed_answers`);
    its result is tied to their digest.
    """
    probe = PROBES[name]
    if probe.scores_seed_answers and seed_answers is None:
        raise ValueError(f"The `{name}` probe scores the seed model's answers: pass `seed_answers`.")
    settings = probe_settings(name, args, model_identity)
    if probe.scores_seed_answers:
        settings["seed_answers"] = answers_digest(seed_answers)
    result = cache.get(model_name, name, settings)
    if result is None:
        items = seed_answers if probe.scores_seed_answers else probe_items(name, args)
        result = probe.run(model, tokenizer, args, items)
        cache.put(model_name, name, settings, result)
    return result
