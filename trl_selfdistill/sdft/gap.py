"""The distribution gap SDFT is named after, measured: how unlikely the seed model finds what it is trained on.

Yang et al. (2024) argue that fine-tuning on responses far from the seed model's own distribution is what makes it
forget, and that rewriting them in its own words closes that gap. The measure here is the seed model's mean negative
log-likelihood per response token, given the instruction in the model's chat format: over the reference responses,
and over what is trained on after the rewrite (accepted rewrites, references elsewhere). A lower number after the
rewrite is the gap closing. It costs one forward pass per response, plus one per accepted rewrite.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from ..generation.local import TransformersEngine

SCORE_BATCH_SIZE = 4  # rows per forward pass: the full logits of a batch are held at once


def response_nll(
    engine: TransformersEngine,
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[tuple[str, str]],
    max_positions: int | None = None,
) -> list[tuple[float, int]]:
    """For each `(instruction, response)`: the seed model's summed NLL of the response tokens, and their number.

    The response is followed by the end token, as SFT trains it; the instruction is a single user turn rendered by the
    tokenizer's chat template (plain text plus a blank line when it has none). A row longer than `max_positions` is
    scored on its first `max_positions` tokens.
    """
    rows = [_encode(tokenizer, instruction, response) for instruction, response in pairs]
    rows = [(ids[:max_positions] if max_positions else ids, first) for ids, first in rows]
    results: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths share a batch
    with engine.inference() as model:
        device = next(model.parameters()).device
        for start in range(0, len(order), SCORE_BATCH_SIZE):
            batch = order[start : start + SCORE_BATCH_SIZE]
            width = max(len(rows[i][0]) for i in batch)
            input_ids = torch.full((len(batch), width), engine.pad_token_id, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            for position, i in enumerate(batch):
                ids, first_target = rows[i]
                input_ids[position, : len(ids)] = torch.tensor(ids)
                labels[position, first_target : len(ids)] = torch.tensor(ids[first_target:])
            attention_mask = torch.arange(width)[None, :] < torch.tensor([len(rows[i][0]) for i in batch])[:, None]
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.long().to(device)).logits
            # Token t is predicted from position t - 1; summed per row, in float32.
            losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), labels[:, 1:].to(device), reduction="none", ignore_index=-100
            )
            for position, i in enumerate(batch):
                results[i] = (losses[position].sum().item(), int((labels[position, 1:] != -100).sum()))
    return results


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
