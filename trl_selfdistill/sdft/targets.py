"""Which responses of a dataset SDFT rewrites, and how the rewrites are put back.

Supported formats (TRL's dataset formats):

- prompt-completion, standard (`prompt: str`, `completion: str`): the completion is rewritten.
- prompt-completion, conversational (`prompt`/`completion` as lists of messages): the completion's assistant message is
  rewritten; the instruction is the last user message of the prompt.
- conversational language modeling (`messages`): *every* assistant turn is rewritten, each with the user message just
  before it as the instruction. SFTTrainer trains on every assistant turn of a conversation, so every one of them is a
  target whose style the paper wants close to the seed model's own; each is rewritten on its own (single-turn, as in
  the paper's prompts) so that one long conversation never makes a prompt too long to generate from.

Plain `text` datasets have no separate response to rewrite and are refused.

Some responses are kept as they are, never sent to the seed model, each counted in the report under its reason
(`SKIP_REASONS`): an empty reference (a rewrite would invent a response the data does not have) and an assistant turn
that calls tools (its content is not prose; a rewrite would drop the call). `distill_dataset` adds the reasons that
need the tokenizer and the model: special-token strings in the text, and prompts too long for the model.
"""

from __future__ import annotations

from dataclasses import dataclass

from datasets import Dataset, DatasetDict, IterableDatasetDict

_FIX_HINT = (
    "SDFT needs to know which part of each row is the response to rewrite. Pass a prompt-completion dataset "
    "(`prompt` and `completion` columns, strings or lists of messages) or a conversational dataset (`messages`). "
    "For raw GSM8K (`question`/`answer`) use `trl_selfdistill.data.gsm8k_to_prompt_completion(dataset)`."
)


# Why a response is kept as it is instead of rewritten; the report counts each as `skipped_<reason>`.
SKIP_REASONS = ("empty_reference", "tool_call", "special_tokens", "too_long")


@dataclass(frozen=True)
class RewriteTarget:
    """One response to rewrite: where it lives (`row`, `turn`), what it answers and what it says."""

    row: int
    turn: int  # index of the message in `messages`/`completion`, or -1 for a standard completion string
    instruction: str
    reference: str
    skip: str | None = None  # one of SKIP_REASONS when the response is kept as it is


def _target(row: int, turn: int, instruction: str, reference: str, message: dict | None = None) -> RewriteTarget:
    """A target, marked to be skipped when the data itself says a rewrite would be wrong."""
    skip = None
    if message is not None and message.get("tool_calls"):
        skip = "tool_call"
    elif not reference.strip():
        skip = "empty_reference"
    return RewriteTarget(row, turn, instruction, reference, skip)


def dataset_format(dataset: Dataset) -> str:
    """Returns `"prompt_completion"` or `"messages"`, or raises a `ValueError` that says what to pass instead."""
    if isinstance(dataset, DatasetDict | IterableDatasetDict):
        raise TypeError(
            f"SDFT needs one split as its training set, got a {type(dataset).__name__} of splits "
            f"{sorted(dataset)}. Pass one of them, e.g. `train_dataset=dataset['train']`."
        )
    if not isinstance(dataset, Dataset):
        raise TypeError(
            f"SDFT rewrites the training set before training, so it needs a `datasets.Dataset`, got "
            f"{type(dataset).__name__}. Materialize an `IterableDataset` first (e.g. `Dataset.from_list(list(ds))`)."
        )
    columns = set(dataset.column_names)
    if "prompt" in columns and "completion" in columns:
        fmt = "prompt_completion"
    elif "messages" in columns:
        fmt = "messages"
    elif "input_ids" in columns:
        raise ValueError(f"The training dataset is already tokenized (it has `input_ids`). {_FIX_HINT}")
    else:
        raise ValueError(f"Unsupported training dataset columns {sorted(columns)}. {_FIX_HINT}")
    if len(dataset) == 0:
        raise ValueError("The training dataset is empty: SDFT has nothing to rewrite. Pass at least one row.")
    return fmt


def collect_targets(dataset: Dataset) -> list[RewriteTarget]:
    """Lists every response to rewrite, validating each row (fails before any generation)."""
    fmt = dataset_format(dataset)
    targets = []
    for index, row in enumerate(dataset):
        if fmt == "prompt_completion":
            targets.append(_prompt_completion_target(index, row["prompt"], row["completion"]))
        else:
            targets.extend(_messages_targets(index, row["messages"]))
    return targets


def apply_rewrites(dataset: Dataset, responses: dict[tuple[int, int], str]) -> Dataset:
    """Returns a copy of `dataset` whose targeted responses are replaced by `responses[(row, turn)]`."""
    fmt = dataset_format(dataset)
    column = "completion" if fmt == "prompt_completion" else "messages"

    def replace(row: dict, index: int) -> dict:
        value = row[column]
        if isinstance(value, str):
            return {column: responses.get((index, -1), value)}
        value = [dict(message) for message in value]
        for turn, message in enumerate(value):
            if (index, turn) in responses:
                message["content"] = responses[(index, turn)]
        return {column: value}

    return dataset.map(replace, with_indices=True, desc="Applying rewrites")


def _text(content: object, where: str) -> str:
    if not isinstance(content, str):
        raise ValueError(f"{where}: SDFT rewrites text-only messages, got content of type {type(content).__name__}.")
    return content


def _response(message: dict, where: str) -> str:
    """An assistant message's text; a tool call's content may be missing (it is skipped, not rewritten)."""
    if message.get("tool_calls") and message.get("content") is None:
        return ""
    return _text(message.get("content"), where)


def _messages(value: object, where: str) -> list[dict]:
    """`value` checked to be a list of message dicts (not, say, a list of lists)."""
    if not isinstance(value, list):
        raise ValueError(f"{where}: expected a list of messages, got {type(value).__name__}.")
    for turn, message in enumerate(value):
        if not isinstance(message, dict):
            nested = (
                " (a nested list: flatten it into one list of messages per row)" if isinstance(message, list) else ""
            )
            raise ValueError(
                f"{where}, message {turn}: each message must be a dict with `role` and `content`, got "
                f"{type(message).__name__}{nested}."
            )
    return value


def _prompt_completion_target(index: int, prompt: object, completion: object) -> RewriteTarget:
    where = f"Row {index}"
    if isinstance(prompt, str) and isinstance(completion, str):
        return _target(index, -1, prompt, completion)
    if not (isinstance(prompt, list) and isinstance(completion, list)):
        raise ValueError(
            f"{where}: `prompt` and `completion` must both be strings or both be lists of messages, got "
            f"{type(prompt).__name__} and {type(completion).__name__}."
        )
    user_turns = [m for m in _messages(prompt, f"{where}, `prompt`") if m.get("role") == "user"]
    assistant_turns = [
        i for i, m in enumerate(_messages(completion, f"{where}, `completion`")) if m.get("role") == "assistant"
    ]
    if not user_turns or len(assistant_turns) != 1:
        raise ValueError(
            f"{where}: a conversational prompt-completion row needs a user message in `prompt` and exactly one "
            f"assistant message in `completion` (got {len(user_turns)} user, {len(assistant_turns)} assistant)."
        )
    turn = assistant_turns[0]
    instruction = _text(user_turns[-1]["content"], where)
    return _target(index, turn, instruction, _response(completion[turn], where), completion[turn])


def _messages_targets(index: int, messages: list[dict]) -> list[RewriteTarget]:
    where = f"Row {index}"
    targets = []
    last_user = None
    for turn, message in enumerate(_messages(messages, f"{where}, `messages`")):
        if message.get("role") == "user":
            last_user = _text(message["content"], where)
        elif message.get("role") == "assistant" and last_user is not None:
            targets.append(_target(index, turn, last_user, _response(message, where), message))
    if not targets:
        raise ValueError(f"{where}: `messages` has no assistant turn that follows a user turn, so nothing to rewrite.")
    return targets
