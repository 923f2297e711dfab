"""The distribution gap SDFT is named after, measured: how unlikely the seed model finds what it is trained on.

Yang et al. (2024) argue that fine-tuning on responses far from the seed model's own distribution is what makes it
forget, and that rewriting them in its own words closes that gap. The measure here is the seed model's mean negative
log-likelihood per response token, given the instruction in the model's chat format: over the reference responses,
and over what is trained on after the rewrite (accepted rewrites, references elsewhere). A lower number after the
rewrite is the gap closing. It costs one forward pass per response, plus one per accepted rewrite, in process or
on a server that returns prompt log-probabilities (vLLM).
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from ..generation.base import ScoringEngine, ScoringRow


def response_nll(
    engine: ScoringEngine,
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[tuple[str, str]],
    max_positions: int | None = None,
) -> list[tuple[float, int]]:
    """For each `(instruction, response)`: the seed model's summed NLL of the response tokens, and their number.

    The response is followed by the end token, as SFT trains it; the instruction is a single user turn rendered by the
    tokenizer's chat template (plain text plus a blank line when it has none). A row longer than `max_positions` is
    scored on its first `max_positions` tokens. The engine scores these token ids, in process or on a server alike.
    """
    rows = response_rows(tokenizer, pairs)
    return engine.score([ScoringRow(ids[:max_positions] if max_positions else ids, first) for ids, first in rows])


def response_rows(tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]]) -> list[ScoringRow]:
    """Each `(instruction, response)` as the token ids `response_nll` scores: instruction, response, end token."""
    return [ScoringRow(*_encode(tokenizer, instruction, response)) for instruction, response in pairs]


def instruction_prompt(tokenizer: PreTrainedTokenizerBase, instruction: str) -> str:
    """The instruction as a single user turn of the tokenizer's chat template, generation prompt added (plain text
    plus a blank line when it has none): what responses are scored after, and what the seed model answers alone."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
        )
    return instruction + "\n\n"


def _encode(tokenizer: PreTrainedTokenizerBase, instruction: str, response: str) -> tuple[list[int], int]:
    """The token ids of instruction + response + end token, and the index of the first response token."""
    prompt = instruction_prompt(tokenizer, instruction)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return prompt_ids + response_ids + end, len(prompt_ids)
