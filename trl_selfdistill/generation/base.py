"""The interface between the rewrite and whatever generates: an in-process model or a server."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class Completion(NamedTuple):
    """One finished prompt: its index in the prompts, the text, and whether `max_new_tokens` cut it."""

    index: int
    text: str
    truncated: bool  # stopped at `max_new_tokens` instead of at an end token


class GenerationEngine(Protocol):
    """Turns fully rendered prompts (special tokens already in the text) into completions.

    Batching, concurrency and retries are the engine's business; which rows to generate, caching and progress are
    the caller's (see `trl_selfdistill.sdft.rewrite`).
    """

    def generate(
        self, prompts: list[str], decoding: Mapping[str, Any], seeds: list[int]
    ) -> Iterator[list[Completion]]:
        """Yields groups of [`Completion`] as they finish, in any order.

        The caller saves each group before asking for the next, so a group is what a failure may lose.

        A completion is decoded without special tokens and stripped. `seeds[i]` seeds prompt `i` (engines that
        sample a whole batch at once seed it with its first row's seed), so a rerun with the same seeds repeats.
        """
        ...

    def identity(self) -> dict[str, Any]:
        """What identifies the generator in the rewrite cache's key (the seed model's name and weights, or server)."""
        ...


def bos_added_on_encoding(tokenizer: PreTrainedTokenizerBase | None) -> str:
    """The BOS token text if the tokenizer puts one in front when encoding with special tokens, else `""`.

    Llama-2 adds `<s>`; SmolLM2 (whose `bos_token` is `<|im_start|>`, never added) adds nothing.
    """
    bos = getattr(tokenizer, "bos_token", None)
    if tokenizer is None or not bos or tokenizer.bos_token_id is None:
        return ""
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == tokenizer.bos_token_id else ""
