"""The server engine: any OpenAI-compatible `/v1/completions` endpoint (vLLM, SGLang, TGI, `transformers serve`).

Prompts are sent as text, one request per prompt, many at a time; the server batches them. Each request has a
timeout and is retried with exponential backoff on connection errors, HTTP 429/5xx and malformed answers; a client
error (HTTP 4xx) is not retried. Nothing here needs the model's weights, only its tokenizer.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any
from urllib.parse import urlsplit

from transformers import PreTrainedTokenizerBase
from transformers.utils import logging

from ..validation import check_number
from .base import Completion, bos_added_on_encoding

logger = logging.get_logger(__name__)

# `generate` options the engine translates into completion fields: OpenAI's, then vLLM's and SGLang's extensions.
_OPENAI_FIELDS = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p"}
_EXTENSION_FIELDS = {"top_k": "top_k", "min_new_tokens": "min_tokens", "repetition_penalty": "repetition_penalty"}
_SUPPORTED = {*_OPENAI_FIELDS, *_EXTENSION_FIELDS, "do_sample"}
_SAMPLING_ONLY = {"temperature", "top_p", "top_k"}


class ServerError(RuntimeError):
    """The server could not be reached, refused a request, or kept answering with errors."""


def completion_fields(decoding: Mapping[str, Any]) -> dict[str, Any]:
    """`generate` decoding options as `/v1/completions` fields; an option no server understands fails now.

    Greedy decoding (`do_sample=False`) is temperature 0, without the sampling-only options.
    """
    unsupported = sorted(key for key, value in decoding.items() if value is not None and key not in _SUPPORTED)
    if unsupported:
        raise ValueError(
            f"The server engine cannot send the decoding option(s) {unsupported}: a completions server takes only "
            f"{sorted(_SUPPORTED)}. Remove them from "
            "`distill_generation_kwargs`, or use `distill_engine='transformers'`."
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
    """The server engine's settings, refused with their names (`prefix` + name, e.g. `distill_server_timeout`)."""
    if not isinstance(url, str) or not url.startswith(("http://", "https://")) or not urlsplit(url).hostname:
        raise ValueError(
            f"`{prefix}url` must be an http(s) URL with a host, e.g. 'http://localhost:8000', got {url!r}."
        )
    check_number(f"{prefix}concurrency", concurrency, integer=True, low=1)
    check_number(f"{prefix}timeout", timeout, low=0, low_open=True, hint="Seconds one request may take.")
    check_number(f"{prefix}max_retries", max_retries, integer=True, low=0)
    check_number(f"{prefix}backoff", backoff, low=0)


class ServerEngine:
    """Rewrites on an OpenAI-compatible completions server.

    Args:
        url: the server's base URL, e.g. `http://localhost:8000` (a trailing `/v1` is accepted).
        model: the model id to request; it must be among the server's `/v1/models`.
        tokenizer: the seed model's tokenizer, used only to avoid a second BOS token (servers add their own).
        concurrency: requests in flight at once.
        timeout: seconds one request may take.
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

    def identity(self) -> dict[str, Any]:
        return {"engine": "server", "model": self.model}

    def check(self, decoding: Mapping[str, Any]) -> None:
        """Before any work: the server answers, serves `self.model`, and accepts the decoding (one 1-token request)."""
        retries = min(1, self.max_retries)  # an unreachable server fails in seconds
        try:
            served = [entry["id"] for entry in self._request("GET", "/v1/models", timeout=30, retries=retries)["data"]]
        except (KeyError, TypeError) as error:
            raise ServerError(f"{self.url}/v1/models lists no models as OpenAI-compatible servers do.") from error
        if self.model not in served:
            raise ServerError(
                f"The server at {self.url} serves {served}, not the seed model {self.model!r}. Start it with the seed "
                "model, or, if it is the seed model deployed under another name, set `distill_server_model` to that "
                "name."
            )
        probe = {**completion_fields(decoding), "max_tokens": 1}
        probe.pop("min_tokens", None)
        self._complete("Hello", probe, retries=retries)

    def generate(
        self, prompts: list[str], decoding: Mapping[str, Any], seeds: list[int]
    ) -> Iterator[list[Completion]]:
        fields = completion_fields(decoding)
        sampling = bool(decoding.get("do_sample", False))
        pending: dict[Future, int] = {}
        next_prompt, error = 0, None
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="sdft-rewrite")
        try:
            while pending or (error is None and next_prompt < len(prompts)):
                while error is None and next_prompt < len(prompts) and len(pending) < self.concurrency:
                    request = {**fields, **({"seed": seeds[next_prompt]} if sampling else {})}
                    pending[pool.submit(self._complete, prompts[next_prompt], request)] = next_prompt
                    next_prompt += 1
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

    def _complete(self, prompt: str, fields: dict[str, Any], retries: int | None = None) -> tuple[str, bool]:
        """The completion's text, and whether it stopped at `max_tokens` (OpenAI's `finish_reason` "length")."""
        if self._bos_added_by_server:
            prompt = prompt.removeprefix(self._bos_added_by_server)
        body = {"model": self.model, "prompt": prompt, **fields}
        answer = self._request("POST", "/v1/completions", body, retries=retries)
        try:
            choice = answer["choices"][0]
            return choice["text"].strip(), choice.get("finish_reason") == "length"
        except (KeyError, IndexError, TypeError, AttributeError) as error:
            message = f"{self.url}/v1/completions answered without choices[0].text: {answer!r:.300}"
            raise ServerError(message) from error

    def _request(self, method: str, path: str, body: dict | None = None, timeout=None, retries=None) -> Any:
        """One JSON request, retried with backoff on what may pass (connection errors, 429, 5xx, bad JSON)."""
        retries = self.max_retries if retries is None else retries
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        for attempt in range(retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=timeout or self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as error:
                detail = error.read().decode(errors="replace")[:500]
                if error.code != 429 and error.code < 500:
                    message = f"The server at {self.url} refused {method} {path} (HTTP {error.code}): {detail}"
                    raise ServerError(message) from None
                problem = f"HTTP {error.code}: {detail}"
            except (urllib.error.URLError, OSError) as error:  # refused, reset, timed out
                problem = f"{type(error).__name__}: {getattr(error, 'reason', error)}"
            except json.JSONDecodeError as error:
                problem = f"malformed JSON ({error})"
            if attempt < retries:
                delay = self.backoff * 2**attempt
                logger.warning(f"{method} {self.url}{path} failed ({problem}); retry {attempt + 1} in {delay:g} s")
                time.sleep(delay)
        raise ServerError(
            f"The rewrite server at {self.url} failed {retries + 1} time(s) on {method} {path}; last error: "
            f"{problem}. Check the server: finished rewrites are cached, and a rerun resumes where this one stopped."
        )
