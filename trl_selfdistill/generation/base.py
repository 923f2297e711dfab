"""The interface between the rewrite and whatever generates: an in-process model or a server."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class Prompt(NamedTuple):
    """One fully rendered prompt (special tokens already in the text), the caller's index for it, and its seed."""

    index: int
    text: str
    seed: int


class Completion(NamedTuple):
    """One finished prompt: the caller's index for it, the text, and whether `max_new_tokens` cut it."""

    index: int
    text: str
    truncated: bool  # stopped at `max_new_tokens` instead of at an end token


@runtime_checkable
class GenerationEngine(Protocol):
    """Turns fully rendered prompts into completions: what the evaluation probes need of an engine.

    Batching, concurrency and retries are the engine's business; which rows to generate, caching and progress are
    the caller's.
    """

    def generate(
        self, prompts: list[str], decoding: Mapping[str, Any], seeds: list[int]
    ) -> Iterator[list[Completion]]:
        """Yields groups of [`Completion`] (indexed by position in `prompts`) as they finish, in any order.

        A completion is decoded without special tokens and stripped. `seeds[i]` seeds prompt `i` (engines that
        sample a whole batch at once seed it with its first row's seed), so a rerun with the same seeds repeats.
        """
        ...

    def identity(self) -> dict[str, Any]:
        """What identifies the generator in the rewrite cache's key (the seed model's name and weights, or server)."""
        ...


@runtime_checkable
class RewriteEngine(GenerationEngine, Protocol):
    """What the SDFT rewrite (`trl_selfdistill.sdft.rewrite`) reads of an engine, beyond `generate`.

    The rewrite hands prompts over in blocks, claimed from other runs sharing the cache just before the engine takes
    them, and saves each group of completions before asking for the next, so a group is what a failure may lose.
    """

    position_limit: int | None
    """Positions (prompt + new tokens) the model has, if the engine knows; prompts that do not fit are skipped."""

    deal_size: int
    """Rows dealt to a process at a time when sharding, so that batches (their samples) match a single process's."""

    def check(self, decoding: Mapping[str, Any]) -> None:
        """Fails now, with a message saying what to change, if the engine cannot generate with `decoding`.

        Checks once per decoding: calling it again costs nothing.
        """
        ...

    def block_size(self, longest_prompt: int, decoding: Mapping[str, Any], rows: int) -> int:
        """Rows to hand over (and claim) at a time, given the longest prompt's tokens and the rows to generate."""
        ...

    def generate_blocks(
        self, blocks: Iterable[list[Prompt]], decoding: Mapping[str, Any]
    ) -> Iterator[list[Completion]]:
        """Yields groups of [`Completion`] (indexed by `Prompt.index`) as they finish, taking blocks as it needs them.

        An engine takes the next block only when it can start on it (a server: when a request slot is free, so
        `concurrency` requests stay in flight across blocks; in process: when the previous batch is done).
        """
        ...


class ScoringRow(NamedTuple):
    """Token ids to score, and the index of the first one scored (the response's first token, after the prompt)."""

    ids: list[int]
    first: int


@runtime_checkable
class ScoringEngine(Protocol):
    """An engine that also gives the seed model's likelihood of given text: what SDFT's distribution gap
    (`seed_nll_*`) and its least-surprising-target selection read."""

    def scoring_unavailable(self) -> str | None:
        """None if `score` works here, else why not (a server that returns no prompt log-probabilities).

        Asks once: calling it again costs nothing.
        """
        ...

    def score(self, rows: list[ScoringRow]) -> list[tuple[float, int]]:
        """For each row, the summed negative log-likelihood of `ids[first:]`, each token predicted from those before
        it, and the number of tokens scored."""
        ...


def numbered(prompts: list[str], seeds: list[int]) -> list[Prompt]:
    """`generate`'s arguments as one block of [`Prompt`], indexed by position."""
    return [Prompt(index, text, seed) for index, (text, seed) in enumerate(zip(prompts, seeds, strict=True))]


def special_token_texts(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Every special token's text (`<|im_end|>`, `</s>`, added special tokens), longest first.

    Such text in a prompt or a training target is encoded as the real token; longest first, so that a search names the
    whole token rather than a special token it contains.
    """
    added = (token.content for token in tokenizer.added_tokens_decoder.values() if token.special)
    return sorted({*tokenizer.all_special_tokens, *added} - {""}, key=len, reverse=True)


def bos_added_on_encoding(tokenizer: PreTrainedTokenizerBase | None) -> str:
    """The BOS token text if the tokenizer puts one in front when encoding with special tokens, else `""`.

    Llama-2 adds `<s>`; SmolLM2 (whose `bos_token` is `<|im_start|>`, never added) adds nothing.
    """
    bos = getattr(tokenizer, "bos_token", None)
    if tokenizer is None or not bos or tokenizer.bos_token_id is None:
        return ""
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == tokenizer.bos_token_id else ""
