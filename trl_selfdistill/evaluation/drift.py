"""Drift: how much less likely a fine-tuned model finds the seed model's own answers (forgetting with no floor).

The seed model answers every IFEval prompt once, greedily, through its chat template (no system prompt), as the IFEval
probe asks them; those answers are generated once and reused for every model. A model's score is the mean, over the
prompts, of its negative log-likelihood per token of the seed's answer (the answer's end token included when the seed
ended it, not when it was cut at the length limit). Its **drift** is that score minus the seed model's own, paired
prompt by prompt (`vs_seed` in the benchmark's report).

One forward pass per model, no judge and no floor: a model that collapses to terse replies, which IFEval's checkers
still pass, moves far from the seed's answers and shows it here. On the seed's own answers this is a Monte-Carlo
estimate of the cross-entropy part of KL(seed || model) on general prompts, the quantity forgetting is found to follow
(Shenfeld et al., "RL's Razor", arXiv 2509.04259; the forgetting metric of Kalajdzievski, arXiv 2401.05605, is of the
same kind).
"""

from __future__ import annotations

import hashlib
import json
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from tqdm.auto import tqdm

from ..generation import TransformersEngine
from ..generation.base import ScoringRow
from .answers import chat_prompt

GREEDY = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


def seed_answers(
    model: Any,
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    *,
    max_new_tokens: int,
    batch_size: int | str = "auto",
    show_progress: bool = True,
) -> list[dict[str, Any]]:
    """The seed model's greedy answer to each IFEval row (`key`, `prompt`), in order: `{"key", "prompt", "answer",
    "ended"}`, `ended` False when the answer was cut at `max_new_tokens`."""
    engine = TransformersEngine(model, tokenizer, batch_size, disable_adapter=False)
    prompts = [chat_prompt(tokenizer, row["prompt"]) for row in rows]
    answers: list[dict[str, Any]] = [{} for _ in rows]
    decoding = {**GREEDY, "max_new_tokens": max_new_tokens}
    with tqdm(total=len(rows), desc="drift: the seed model's answers", disable=not show_progress) as progress:
        for group in engine.generate(prompts, decoding, seeds=[0] * len(prompts)):
            for completion in group:
                row = rows[completion.index]
                answers[completion.index] = {
                    "key": row["key"],
                    "prompt": row["prompt"],
                    "answer": completion.text,
                    "ended": not completion.truncated,
                }
            progress.update(len(group))
    return answers


def answers_digest(answers: Sequence[Mapping[str, Any]]) -> str:
    """The SHA-256 of the seed's answers: a drift result is reused only for the answers it scored."""
    return hashlib.sha256(json.dumps(list(answers), sort_keys=True).encode()).hexdigest()


def scoring_rows(tokenizer: Any, answers: Sequence[Mapping[str, Any]]) -> list[ScoringRow]:
    """Each answer's token ids after its rendered prompt, with the end token where the seed ended it."""
    prompts = [chat_prompt(tokenizer, answer["prompt"]) for answer in answers]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer([answer["answer"] for answer in answers], add_special_tokens=False)["input_ids"]
    end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return [
        ScoringRow(prompt + response + (end if answer["ended"] else []), len(prompt))
        for prompt, response, answer in zip(prompt_ids, answer_ids, answers, strict=True)
    ]


def evaluate_drift(
    model: Any, tokenizer: Any, answers: Sequence[Mapping[str, Any]], *, show_progress: bool = True
) -> dict[str, Any]:
    """`model`'s (adapter enabled) NLL per token of each of the seed's `answers` (from `seed_answers`).

    Returns `{"mean_nll", "tokens", "total", "outputs"}`: `mean_nll` is the mean over answers of their per-token NLL
    (each answer weighs the same, as each prompt does in a paired comparison), `tokens` the tokens scored, and
    `outputs` per answer `{"key", "nll_per_token", "tokens"}`. An answer with no token to score (empty, cut at once)
    counts as 0.
    """
    engine = TransformersEngine(model, tokenizer, disable_adapter=False)
    rows = scoring_rows(tokenizer, answers)
    scores: list[tuple[float, int]] = []
    chunk = 64  # progress a chunk at a time; the engine batches within it
    with tqdm(total=len(rows), desc="drift: NLL of the seed's answers", disable=not show_progress) as progress:
        for start in range(0, len(rows), chunk):
            scores += engine.score(rows[start : start + chunk])
            progress.update(len(rows[start : start + chunk]))
    outputs = [
        {"key": answer["key"], "nll_per_token": total / count if count else 0.0, "tokens": count}
        for answer, (total, count) in zip(answers, scores, strict=True)
    ]
    return {
        "mean_nll": statistics.fmean(output["nll_per_token"] for output in outputs) if outputs else 0.0,
        "tokens": sum(output["tokens"] for output in outputs),
        "total": len(outputs),
        "outputs": outputs,
    }
