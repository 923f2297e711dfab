"""The server engine: any OpenAI-compatible `/v1/completions` endpoint (vLLM, SGLang, TGI, `transformers serve`).

Prompts are sent as text, one request per prompt, many at a time; the server batches them. HTTP is `http.py`'s
`JSONClient`: each attempt has a timeout covering all of it, and a request is retried with exponential backoff on
connection errors, HTTP 429/5xx and bad answers, but not on a client error (other HTTP 4xx) or a redirect. Here the
body of an answer is bounded by the size that `max_tokens` allows, and an answer is checked before it is returned, and
so before it is cached: one choice, a known `finish_reason`, valid text within `max_tokens` tokens, and no
special-token text, which in a training target would become the real token; one that fails is a `BadAnswer`, retried
like a failing server. Nothing here needs the model's weights, only its tokenizer.
"""

from __future__ import annotations

import copy
import math
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any
from urllib.parse import urlsplit

from transformers import PreTrainedTokenizerBase

from ..validation import check_number
from .base import Completion, Prompt, ScoringRow, bos_added_on_encoding, numbered, special_token_texts
from .http import BadAnswer, JSONClient, ServerError  # ServerError is imported from here too

# `generate` options the engine translates into completion fields: OpenAI's, then vLLM's and SGLang's extensions.
_OPENAI_FIELDS = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p"}
_EXTENSION_FIELDS = {"top_k": "top_k", "min_new_tokens": "min_tokens", "repetition_penalty": "repetition_penalty"}
_SUPPORTED = {*_OPENAI_FIELDS, *_EXTENSION_FIELDS, "do_sample"}
_SAMPLING_ONLY = {"temperature", "top_p", "top_k"}


def completion_fields(decoding: Mapping[str, Any]) -> dict[str, Any]:
    """`generate` decoding options as `/v1/completions` fields; an option no server understands fails now.

    Greedy decoding (`do_sample=False`) is temperature 0, without the sampling-only options.
    """
    unsupported = sorted(key for key, value in decoding.items() if value is not None and key not in _SUPPORTED)
    if unsupported:
        raise ValueError(
            f"The server engine cannot send the decoding option(s) {unsupported}: a completions server takes only "
            f"{sorted(_SUPPORTED)}. Remove them from "
            "`sdft_generation_kwargs`, or use `sdft_engine='transformers'`."
        )
    sampling = bool(decoding.get("do_sample", False))
    fields = {}
    for key, value in decoding.items():
        name = _OPENAI_FIELDS.get(key) or _EXTENSION_FIELDS.get(key)
        if name is None or value is None or (key in _SAMPLING_ONLY and not sampling):
            continue
        fields[name] = value
    if not sampling:
        fields["temperature"] = 0.0
    return fields


def check_server_settings(
    url: str, concurrency: int, timeout: float, max_retries: int, backoff: float = 1.0, *, prefix: str = ""
) -> None:
    """The server engine's settings, refused with their names (`prefix` + name, e.g. `sdft_server_timeout`)."""
    if not isinstance(url, str) or not url.startswith(("http://", "https://")) or not urlsplit(url).hostname:
        raise ValueError(
            f"`{prefix}url` must be an http(s) URL with a host, e.g. 'http://localhost:8000', got {url!r}."
        )
    check_number(f"{prefix}concurrency", concurrency, integer=True, low=1)
    check_number(f"{prefix}timeout", timeout, low=0, low_open=True, hint="Seconds one request may take.")
    check_number(f"{prefix}max_retries", max_retries, integer=True, low=0)
    check_number(f"{prefix}backoff", backoff, low=0)


# The `finish_reason`s an answer may have, and whether it means cut at `max_tokens`; for a stop string TGI says
# "stop_sequence" where OpenAI says "stop".
_FINISH_REASONS = {"stop": False, "stop_sequence": False, "length": True}
# The body of an answer may have `_bytes_per_token` per token asked for plus this (ids, usage, ...); without
# `max_tokens` it is bounded as for `_UNBOUNDED_TOKENS`. A model list or an error page has its own bound (`http.py`).
_BODY_ALLOWANCE = 64 * 1024
_UNBOUNDED_TOKENS = 32 * 1024


def _token_slack(max_tokens: int) -> int:
    """Tokens an answer may have over `max_tokens`: re-tokenizing decoded text can differ from what was generated (a
    character split at the cut decodes to U+FFFD, which may take 3 tokens; a leading space may merge or not)."""
    return 4 + max_tokens // 100


class ServerEngine:
    """Rewrites on an OpenAI-compatible completions server.

    Args:
        url: the server's base URL, e.g. `http://localhost:8000` (a trailing `/v1` is accepted).
        model: the model id to request; it must be among the server's `/v1/models`.
        tokenizer: the seed model's tokenizer: answers are checked with it (their length in tokens, no special-token
            text), and prompts lose a BOS token that the server adds itself.
        concurrency: requests in flight at once.
        timeout: seconds one attempt at a request may take, all of it (connecting, and reading the whole answer).
        max_retries: retries of one request before giving up.
        backoff: seconds before the first retry, doubled after each.
    """

    def __init__(
        self,
        url: str,
        model: str,
        tokenizer: PreTrainedTokenizerBase,
        *,
        concurrency: int = 64,
        timeout: float = 600.0,
        max_retries: int = 5,
        backoff: float = 1.0,
    ):
        check_server_settings(url, concurrency, timeout, max_retries, backoff)
        self.url = url.rstrip("/").removesuffix("/v1")
        self.model = model
        self.concurrency = concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self._bos_added_by_server = bos_added_on_encoding(tokenizer)
        self._checked_probes: list[dict[str, Any]] = []  # the decodings `check` has passed, as its probe requests
        # Answers are counted with a copy of our own, one thread at a time: calls on one fast tokenizer from several
        # threads at once can fail ("Already borrowed").
        self._tokenizer, self._tokenizer_lock = copy.deepcopy(tokenizer), threading.Lock()
        self._specials = special_token_texts(tokenizer)  # what the rewrite also keeps out of its prompts
        # JSON may escape a byte as 6 characters (`\u00XX`); no token is longer than the longest in the vocabulary.
        self._bytes_per_token = 6 * max((len(token.encode("utf-8")) for token in tokenizer.get_vocab()), default=16)
        self._client = JSONClient(self.url, concurrency, timeout, max_retries, backoff)
        self._scoring_unavailable: list[str | None] = []  # `scoring_unavailable`'s answer, once asked

    def identity(self) -> dict[str, Any]:
        return {"engine": "server", "model": self.model}

    def check(self, decoding: Mapping[str, Any]) -> None:
        """Before any work: the server answers, serves `self.model`, and accepts the decoding (one 1-token request).

        Once per decoding: a trainer checks before loading the model, and the rewrite's own check is then free. The
        model's positions are learnt here where the server lists them (vLLM's `max_model_len`).
        """
        probe = {**completion_fields(decoding), "max_tokens": 1}
        probe.pop("min_tokens", None)
        if probe in self._checked_probes:
            return
        retries = min(1, self.max_retries)  # an unreachable server fails in seconds
        try:
            models = self._client.request("GET", "/v1/models", timeout=30, retries=retries)
            listed = {entry["id"]: entry for entry in models["data"]}
        except (KeyError, TypeError) as error:
            raise ServerError(f"{self.url}/v1/models lists no models as OpenAI-compatible servers do.") from error
        served = list(listed)
        if self.model not in served:
            raise ServerError(
                f"The server at {self.url} serves {served}, not the seed model {self.model!r}. Start it with the seed "
                "model, or, if it is the seed model deployed under another name, set `sdft_server_model` to that "
                "name."
            )
        self._complete("Hello", probe, retries=retries)
        positions = listed[self.model].get("max_model_len")
        if type(positions) is int and positions > 0:
            self.position_limit = positions
        self._checked_probes.append(probe)

    deal_size = 1  # the server batches what it gets; no batch of ours to keep whole
    position_limit: int | None = None  # learnt from the server by `check`, where it says

    def block_size(self, longest_prompt: int, decoding: Mapping[str, Any], rows: int) -> int:
        return self.concurrency

    def generate(
        self, prompts: list[str], decoding: Mapping[str, Any], seeds: list[int]
    ) -> Iterator[list[Completion]]:
        return self.generate_blocks([numbered(prompts, seeds)], decoding)

    def generate_blocks(
        self, blocks: Iterable[list[Prompt]], decoding: Mapping[str, Any]
    ) -> Iterator[list[Completion]]:
        """Keeps `concurrency` requests in flight across blocks: the next block is taken as soon as a slot is free
        and nothing is queued, so the server never waits for the slowest row of a block."""
        fields = completion_fields(decoding)
        sampling = bool(decoding.get("do_sample", False))
        blocks = iter(blocks)
        queued: deque[Prompt] = deque()
        pending: dict[Future, int] = {}
        error = None
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="sdft-rewrite")
        try:
            while True:
                while error is None and len(pending) < self.concurrency:
                    if not queued:
                        queued.extend(next(blocks, ()))
                        if not queued:
                            break
                    prompt = queued.popleft()
                    request = {**fields, **({"seed": prompt.seed} if sampling else {})}
                    pending[pool.submit(self._complete, prompt.text, request)] = prompt.index
                if not pending:
                    break
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                finished = []
                for future in done:
                    index = pending.pop(future)
                    if future.exception() is None:
                        finished.append(Completion(index, *future.result()))
                    else:  # send nothing more, but keep what the requests in flight still bring back
                        error = error or future.exception()
                if finished:
                    yield finished
            if error is not None:
                raise error
        finally:  # the caller stopped (Ctrl-C): start nothing more, and do not wait for requests in flight
            pool.shutdown(wait=False, cancel_futures=True)

    def scoring_unavailable(self) -> str | None:
        """None if the server returns the log-probabilities of a prompt's tokens (vLLM does, with `echo` and
        `logprobs`), else what it did instead; one 3-token request, asked once."""
        if not self._scoring_unavailable:
            ids = self._tokenizer("Hello, world", add_special_tokens=False)["input_ids"][:3]
            try:
                self._prompt_logprobs(ids, retries=0)
                self._scoring_unavailable.append(None)
            except ServerError as error:
                self._scoring_unavailable.append(str(error))
        return self._scoring_unavailable[0]

    def score(self, rows: list[ScoringRow]) -> list[tuple[float, int]]:
        """Each row sent as token ids, echoed with their log-probabilities and nothing generated, `concurrency` at a
        time: the same ids the in-process engine scores, so the same numbers up to the kernels' rounding."""
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="sdft-score")
        try:
            logprobs = list(pool.map(lambda row: self._prompt_logprobs(row.ids), rows))
        finally:  # on a failure, send nothing more
            pool.shutdown(wait=False, cancel_futures=True)
        return [
            (-sum(values[row.first :]), max(0, len(row.ids) - row.first))
            for row, values in zip(rows, logprobs, strict=True)
        ]

    def _prompt_logprobs(self, ids: list[int], retries: int | None = None) -> list[float]:
        """The log-probability of each of `ids` after those before it (the first, which has none, as 0.0)."""
        body = {"model": self.model, "prompt": ids, "echo": True, "logprobs": 0, "max_tokens": 0, "temperature": 0.0}
        # The answer echoes every token about three times (text, token list, top log-probabilities) with numbers.
        limit = _BODY_ALLOWANCE + len(ids) * (3 * self._bytes_per_token + 128)
        return self._client.request(
            "POST", "/v1/completions", body, retries=retries, limit=limit,
            parse=lambda answer: _echoed_logprobs(answer, len(ids)),
        )  # fmt: skip

    def _complete(self, prompt: str, fields: dict[str, Any], retries: int | None = None) -> tuple[str, bool]:
        """The completion's text, and whether it stopped at `max_tokens` (OpenAI's `finish_reason` "length"); the
        answer has passed `_checked`."""
        if self._bos_added_by_server:
            prompt = prompt.removeprefix(self._bos_added_by_server)
        body = {"model": self.model, "prompt": prompt, **fields}
        max_tokens = fields.get("max_tokens")
        limit = _BODY_ALLOWANCE + self._bytes_per_token * (max_tokens or _UNBOUNDED_TOKENS)
        text, truncated = self._client.request(
            "POST", "/v1/completions", body, retries=retries, limit=limit,
            parse=lambda answer: self._checked(answer, max_tokens),
        )  # fmt: skip
        return text.strip(), truncated

    def _checked(self, answer: Any, max_tokens: int | None) -> tuple[str, bool]:
        """The text of a completion answer and whether it was cut; `BadAnswer` if the answer is not one to keep."""
        choices = answer.get("choices") if isinstance(answer, dict) else None
        if not isinstance(choices, list) or len(choices) != 1:
            found = f"{len(choices)} choices" if isinstance(choices, list) else "no `choices` list"
            raise BadAnswer(f"has {found}, not the one asked for")
        choice = choices[0]
        if not isinstance(choice, dict):
            raise BadAnswer(f"has a choice that is not an object: {choice!r:.100}")
        index = choice.get("index")
        if type(index) is not int or index != 0:
            raise BadAnswer(f"has a choice with index {index!r:.100}, not 0")
        reason = choice.get("finish_reason")
        if not isinstance(reason, str) or reason not in _FINISH_REASONS:
            raise BadAnswer(f"has finish_reason {reason!r:.100}, not 'stop' or 'length'")
        text = choice.get("text")
        if not isinstance(text, str):
            raise BadAnswer(f"has a text of type {type(text).__name__}, not a string")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise BadAnswer(f"has a text that is not valid Unicode (a lone surrogate at {error.start})") from None
        special = next((token for token in self._specials if token in text), None)
        if special is not None:
            raise BadAnswer(
                f"has the special-token text {special!r} in its text, which in a training target would become that "
                "token"
            )
        if max_tokens is not None:
            with self._tokenizer_lock:
                count = len(self._tokenizer(text, add_special_tokens=False)["input_ids"])
            if count > max_tokens + _token_slack(max_tokens):
                raise BadAnswer(
                    f"has {count} tokens of text, more than the max_tokens={max_tokens} asked for (re-tokenizing may "
                    f"add up to {_token_slack(max_tokens)})"
                )
        return text, _FINISH_REASONS[reason]


def _echoed_logprobs(answer: Any, tokens: int) -> list[float]:
    """The prompt's token log-probabilities in an echoed completion answer (`logprobs.token_logprobs`, the first
    `None`), or `BadAnswer` if they are not there, one finite number per token after the first."""
    choices = answer.get("choices") if isinstance(answer, dict) else None
    logprobs = (
        choices[0].get("logprobs") if isinstance(choices, list) and choices and isinstance(choices[0], dict) else None
    )
    values = logprobs.get("token_logprobs") if isinstance(logprobs, dict) else None
    if not isinstance(values, list):
        raise BadAnswer("has no `logprobs.token_logprobs`: the server does not return a prompt's log-probabilities")
    if len(values) < tokens:
        raise BadAnswer(f"has {len(values)} token log-probabilities for a prompt of {tokens} tokens")
    values = values[:tokens]
    if any(type(value) not in (int, float) or not math.isfinite(value) or value > 0 for value in values[1:]):
        raise BadAnswer("has a token log-probability that is not a finite number at most 0")
    return [0.0, *map(float, values[1:])]
