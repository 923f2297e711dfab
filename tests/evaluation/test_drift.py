"""The drift probe: the NLL per token of the seed model's own answers, checked against a hand computation."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import build_tiny_llama, build_tiny_tokenizer

from trl_selfdistill.evaluation.answers import chat_prompt
from trl_selfdistill.evaluation.drift import answers_digest, evaluate_drift, seed_answers
from trl_selfdistill.evaluation.probes import ProbeArguments, ResultCache, drift_seed_answers, run_probe

ROWS = [
    {"key": 1, "prompt": "Write a haiku about rain."},
    {"key": 2, "prompt": "List three colours."},
    {"key": 3, "prompt": "Say hello in a long and winding sentence, please."},
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def hand_nll_per_token(model, tokenizer, prompt: str, answer: str, ended: bool) -> float:
    """The mean of -log p(token | everything before it) over the answer's tokens, computed one sequence at a time."""
    prompt_ids = tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if ended else [])
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    losses = [-log_probs[position - 1, ids[0, position]].item() for position in range(len(prompt_ids), ids.shape[1])]
    return sum(losses) / len(losses)


def test_drift_scores_equal_a_hand_computation(tokenizer):
    seed, tuned = build_tiny_llama(tokenizer, seed=0), build_tiny_llama(tokenizer, seed=1)
    answers = seed_answers(seed, tokenizer, ROWS, max_new_tokens=5, batch_size=2, show_progress=False)
    assert [a["key"] for a in answers] == [1, 2, 3] and all(not a["ended"] for a in answers)  # random: never ends
    answers[1] = {**answers[1], "answer": "Red, green and blue.", "ended": True}  # ended: its end token is scored
    for model in (seed, tuned):
        result = evaluate_drift(model, tokenizer, answers, show_progress=False)
        expected = [hand_nll_per_token(model, tokenizer, a["prompt"], a["answer"], a["ended"]) for a in answers]
        assert [o["nll_per_token"] for o in result["outputs"]] == pytest.approx(expected, abs=1e-4)
        assert result["mean_nll"] == pytest.approx(sum(expected) / 3, abs=1e-4)
        assert [o["key"] for o in result["outputs"]] == [1, 2, 3] and result["total"] == 3
        ended = tokenizer("Red, green and blue.", add_special_tokens=False)["input_ids"]
        assert result["outputs"][1]["tokens"] == len(ended) + 1


def test_greedy_answers_are_the_seed_models_own(tokenizer):
    seed = build_tiny_llama(tokenizer, seed=0)
    answers = seed_answers(seed, tokenizer, ROWS, max_new_tokens=4, batch_size=3, show_progress=False)
    for row, answer in zip(ROWS, answers, strict=True):
        ids = tokenizer(chat_prompt(tokenizer, row["prompt"]), add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            greedy = seed.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert answer["answer"] == tokenizer.decode(greedy[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        assert answer["answer"].strip() == answer["answer"]


def test_the_seed_answers_are_made_once_and_results_tied_to_them(tmp_path, tokenizer):
    seed, tuned = build_tiny_llama(tokenizer, seed=0), build_tiny_llama(tokenizer, seed=1)
    args = ProbeArguments(probes=["drift"], drift_samples=3, drift_max_new_tokens=4, eval_batch_size=3)
    cache = ResultCache(str(tmp_path))
    identity = {"model": "tiny"}
    answers = drift_seed_answers(seed, tokenizer, args, cache, "seed", identity)
    assert len(answers) == 3 and (tmp_path / "seed" / "drift_answers.json").is_file()
    assert drift_seed_answers(tuned, tokenizer, args, cache, "seed", identity) == answers  # cached, not regenerated
    first = run_probe("drift", "tuned", tuned, tokenizer, args, cache, identity, answers)
    edited = [{**answers[0], "answer": answers[0]["answer"] + " more"}, *answers[1:]]
    assert answers_digest(edited) != answers_digest(answers)
    second = run_probe("drift", "tuned", tuned, tokenizer, args, cache, identity, edited)
    assert second["outputs"][0]["nll_per_token"] != first["outputs"][0]["nll_per_token"]  # other answers: recomputed
    own = run_probe("drift", "seed", seed, tokenizer, args, cache, identity, answers)
    assert math.isfinite(own["mean_nll"]) and own["mean_nll"] != first["mean_nll"]
    with pytest.raises(ValueError, match="seed_answers"):
        run_probe("drift", "tuned", tuned, tokenizer, args, cache, identity)
