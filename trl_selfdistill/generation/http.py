"""The HTTP transport of the server engine (`server.py`): JSON requests to one server, bounded and retried.

`JSONClient` sends a request through a `requests` session whose connections a watchdog thread watches: each attempt
has a timeout covering all of it (connecting, headers, the whole body), which socket timeouts alone do not give, and
the body is read up to a size the caller allows. A request is retried with exponential backoff on connection errors,
HTTP 429/5xx (by urllib3's `Retry`, which waits a `Retry-After` the server sends instead) and bad answers (malformed,
too long, or refused by the caller's `parse`, which raises `BadAnswer`), all from one budget; a client error (other
HTTP 4xx) or a redirect is not retried. A request that fails for good raises `ServerError`, naming the server.
"""

from __future__ import annotations

import heapq
import http.client
import itertools
import json
import socket
import threading
import time
from collections.abc import Callable
from http.cookiejar import DefaultCookiePolicy
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from transformers.utils import logging
from urllib3 import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import InvalidHeader
from urllib3.util.retry import RequestHistory, Retry

logger = logging.get_logger(__name__)


class ServerError(RuntimeError):
    """The server could not be reached, refused a request, or kept answering with errors."""


# Statuses retried (by urllib3): the server is busy (429) or failing (5xx). Another 4xx is this run's fault.
_RETRIED_STATUSES = frozenset({429, *range(500, 600)})
# A longer Retry-After is cut to this: a run waits at most this long for one retry, which counts either way.
_RETRY_AFTER_MAX = 60.0
# The body of an answer is read up to the `limit` a request gives, by default this (a model list); of an error page,
# the first `_DETAIL_BYTES` are kept.
_BODY_LIMIT = 4 * 1024 * 1024
_DETAIL_BYTES = 500
_CHUNK_BYTES = 64 * 1024
# Raised while talking to a server: retried, then reported.
_TRANSIENT = (OSError, Urllib3Error, http.client.HTTPException)  # requests' errors are OSErrors

# The request this thread is making: its timeout, its retries (see `_Adapter`), and its exchange on a connection.
_current = threading.local()


class _Failed(Exception):
    """An attempt that failed in a way that may pass: retried, then reported."""


class BadAnswer(_Failed):
    """An answer that no OpenAI-compatible server should give: the message says what is wrong ("has ...").

    Raised here for a body too long or not JSON, and by a request's `parse` for an answer it refuses.
    """


class _Exchange:
    """One request and its answer on one connection, its socket, and the monotonic time by which it must be over."""

    __slots__ = ("connection", "deadline", "expired", "sock")

    def __init__(self, connection: HTTPConnection, deadline: float):
        self.connection, self.deadline, self.expired, self.sock = connection, deadline, False, None

    def over(self) -> bool:
        return self.expired or time.monotonic() > self.deadline


class _Watchdog:
    """Shuts the socket of an exchange still running at its deadline, so that a blocked read returns at once.

    Socket timeouts bound each read only: a server sending a byte now and then would hold a request for ever, in its
    headers as well as in its body. One thread watches the deadlines of all requests.
    """

    def __init__(self):
        self._wake = threading.Condition()
        self._heap: list[tuple[float, int, _Exchange]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, connection: HTTPConnection, seconds: float, previous: _Exchange | None) -> _Exchange:
        exchange = _Exchange(connection, time.monotonic() + seconds)
        with self._wake:
            if previous is not None:  # the same request's earlier exchange (urllib3 retried a status)
                self._end(previous)
            connection._sdft_exchange = exchange
            heapq.heappush(self._heap, (exchange.deadline, next(self._order), exchange))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="sdft-server-deadlines", daemon=True)
                self._thread.start()
            self._wake.notify()
        return exchange

    def end(self, exchange: _Exchange) -> None:
        with self._wake:
            self._end(exchange)

    def attach(self, connection: HTTPConnection) -> None:
        """Notes the socket of the connection's exchange, once connected, and shuts it if the deadline has passed.

        The exchange keeps it: http.client lets go of it once the headers say "Connection: close", and the body is
        then read from it all the same.
        """
        with self._wake:
            exchange = getattr(connection, "_sdft_exchange", None)
            if exchange is not None and connection.sock is not None:
                exchange.sock = connection.sock
                if exchange.expired:
                    _shut(exchange.sock)

    @staticmethod
    def _end(exchange: _Exchange) -> None:
        exchange.sock = None
        # Only while the connection is still this exchange's: it may serve another request (thread) by now.
        if getattr(exchange.connection, "_sdft_exchange", None) is exchange:
            exchange.connection._sdft_exchange = None

    def _run(self) -> None:
        with self._wake:
            while True:
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    exchange = heapq.heappop(self._heap)[2]
                    if getattr(exchange.connection, "_sdft_exchange", None) is exchange:  # neither ended nor replaced
                        exchange.expired = True
                        _shut(exchange.sock)
                self._wake.wait(self._heap[0][0] - now if self._heap else None)


def _shut(sock: socket.socket | None) -> None:
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked read at once (close() from another thread may not)
        except OSError:
            pass  # closed meanwhile


_WATCHDOG = _Watchdog()


class _Watched:
    """A urllib3 connection whose exchanges `_WATCHDOG` ends at the deadline of the request that makes them."""

    _sdft_exchange: _Exchange | None = None

    def request(self, *args, **kwargs):
        seconds = getattr(_current, "timeout", None)
        if seconds is not None:
            _current.exchange = _WATCHDOG.watch(self, seconds, getattr(_current, "exchange", None))
        super().request(*args, **kwargs)
        _WATCHDOG.attach(self)

    def connect(self):
        super().connect()
        _WATCHDOG.attach(self)


class _WatchedHTTPConnection(_Watched, HTTPConnection):
    pass


class _WatchedHTTPSConnection(_Watched, HTTPSConnection):
    pass


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


_POOLS = {"http": _HTTPPool, "https": _HTTPSPool}


class _Retry(Retry):
    """urllib3's retry of HTTP 429/5xx with the client's backoff: `backoff_factor` doubled per retry, counting the
    request's earlier attempts (seeded in `history`). A Retry-After in seconds or as a date is waited instead, up to
    `_RETRY_AFTER_MAX`; one that is neither falls back to the backoff."""

    def get_backoff_time(self) -> float:
        return self.backoff_factor * 2 ** max(len(self.history) - 1, 0)

    def get_retry_after(self, response) -> float | None:
        try:
            seconds = super().get_retry_after(response)
        except InvalidHeader:
            return None
        return None if seconds is None else min(seconds, _RETRY_AFTER_MAX)

    def sleep(self, response=None) -> None:
        _current.status_retries = getattr(_current, "status_retries", 0) + 1
        delay = (self.get_retry_after(response) if response is not None else None) or self.get_backoff_time()
        status = getattr(response, "status", "?")
        logger.warning(f"{getattr(_current, 'target', '?')} failed (HTTP {status}); retry in {delay:g} s")
        super().sleep(response)


class _Adapter(HTTPAdapter):
    """requests' adapter with pools whose connections `_WATCHDOG` watches, and the retries of this thread's request.

    urllib3 retries a status within one call, with the `Retry` the adapter hands it: the request's own (its retries
    left, its attempts so far) comes from the thread, so that status retries and retries of bad answers share one
    budget and one backoff.
    """

    @property
    def max_retries(self) -> Retry:
        return getattr(_current, "retry", None) or self._default_retries

    @max_retries.setter
    def max_retries(self, value: Retry) -> None:
        self._default_retries = value

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, proxy, **proxy_kwargs):
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if not proxy.lower().startswith("socks"):  # SOCKS pools are their own; the body's deadline still holds
            manager.pool_classes_by_scheme = _POOLS
        return manager


def _describe(error: BaseException) -> str:
    """A connection error in one line: requests wraps urllib3's error, which wraps the cause."""
    cause = error.args[0] if isinstance(error, requests.RequestException) and error.args else error
    return f"{type(error).__name__}: {getattr(cause, 'reason', cause)}"[:500]


class JSONClient:
    """JSON requests to the server at `url`, up to `concurrency` at once, each attempt within `timeout` seconds,
    retried up to `max_retries` times after `backoff` seconds, doubled after each retry."""

    def __init__(self, url: str, concurrency: int, timeout: float, max_retries: int, backoff: float):
        self.url = url
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self._session = requests.Session()
        self._session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))  # nothing a server sets is sent back
        adapter = _Adapter(pool_connections=1, pool_maxsize=concurrency)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)

    def request(
        self,
        method: str,
        path: str,
        body: dict | None = None,
        timeout: float | None = None,
        retries: int | None = None,
        *,
        limit: int = _BODY_LIMIT,
        parse: Callable[[Any], Any] | None = None,
    ) -> Any:
        """One JSON request (its answer through `parse`, if given), retried with backoff on what may pass.

        Retried: connection errors, timeouts, HTTP 429/5xx (by urllib3, within one call), and bad answers (malformed,
        over `limit` bytes, or refused by `parse`); all count against `retries`. `timeout` bounds each attempt whole.
        """
        retries = self.max_retries if retries is None else retries
        timeout = timeout or self.timeout
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}  # sizes are the bytes sent
        attempts, problem, bad_answer = 0, "", False
        while attempts <= retries:
            if attempts:
                delay = self.backoff * 2 ** (attempts - 1)
                logger.warning(f"{method} {self.url}{path} failed ({problem}); retry {attempts} in {delay:g} s")
                time.sleep(delay)
            _current.timeout, _current.target, _current.status_retries = timeout, f"{method} {self.url}{path}", 0
            _current.retry = _Retry(
                total=retries - attempts, connect=0, read=0, other=0, redirect=0, raise_on_redirect=False,
                status_forcelist=_RETRIED_STATUSES, allowed_methods=frozenset({"GET", "POST"}), raise_on_status=False,
                respect_retry_after_header=True, backoff_factor=self.backoff,
                history=(RequestHistory(method, path, None, None, None),) * attempts,
            )  # fmt: skip
            response = None
            try:
                response = self._session.request(
                    method, self.url + path, data=data, headers=headers, timeout=(timeout, timeout),
                    allow_redirects=False, stream=True,
                )  # fmt: skip
                answer = self._answer(response, method, path, limit)
                return answer if parse is None else parse(answer)
            except _Failed as error:
                problem, bad_answer = str(error), isinstance(error, BadAnswer)
            except _TRANSIENT as error:
                problem, bad_answer = _describe(error), False
            finally:
                attempts += 1 + _current.status_retries
                expired = self._end_exchange(response)
            if expired:
                problem, bad_answer = f"no whole answer within the {timeout:g} s timeout ({problem})", False
            if bad_answer:
                problem = f"its answer {problem}"
        fault = (
            " The server answered, but not as an OpenAI-compatible server must: that is the server's fault, not this "
            "run's."
            if bad_answer
            else ""
        )
        raise ServerError(
            f"The rewrite server at {self.url} failed {attempts} time(s) on {method} {path}; last error: {problem}."
            f"{fault} Check the server: finished rewrites are cached, and a rerun resumes where this one stopped."
        )

    def _answer(self, response: requests.Response, method: str, path: str, limit: int) -> Any:
        """The JSON of a 2xx answer; `ServerError` at once for a redirect or a client error, `_Failed` otherwise."""
        status = response.status_code
        if 300 <= status < 400:
            raise ServerError(
                f"The server at {self.url} answered {method} {path} with a redirect (HTTP {status}) to "
                f"{response.headers.get('Location')!r:.300}, which is not followed: the answer would come from "
                "another server, and a POST would arrive there as a GET without its prompt. Give the engine the URL "
                "of the server itself (`sdft_server_url`)."
            )
        if not 200 <= status < 300:
            detail = _read_body(response, _DETAIL_BYTES, cut=True).decode("utf-8", errors="replace")
            if status in _RETRIED_STATUSES or not 400 <= status < 500:
                raise _Failed(f"HTTP {status}: {detail}")
            raise ServerError(f"The server at {self.url} refused {method} {path} (HTTP {status}): {detail}")
        raw = _read_body(response, limit)
        try:
            return json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as error:
            raise BadAnswer(f"is not valid UTF-8 (at byte {error.start})") from None
        except json.JSONDecodeError as error:
            raise BadAnswer(f"is malformed JSON ({error})") from None
        except RecursionError:
            raise BadAnswer("is JSON nested too deeply to read") from None

    @staticmethod
    def _end_exchange(response: requests.Response | None) -> bool:
        """Ends the watch on this thread's request and closes its answer; whether its deadline had passed."""
        exchange = getattr(_current, "exchange", None)
        _current.exchange = _current.retry = _current.timeout = None
        if exchange is not None:
            _WATCHDOG.end(exchange)
        if response is not None:
            response.close()  # a body read whole leaves the connection to the pool; another is closed
        return exchange is not None and exchange.expired


def _read_body(response: requests.Response, limit: int, cut: bool = False) -> bytes:
    """The body, streamed: `BadAnswer` past `limit` bytes (declared or sent), or its first `limit` bytes if `cut`;
    `_Failed` once the request's deadline has passed."""
    declared = response.headers.get("Content-Length", "")
    if not cut and declared.isdigit() and int(declared) > limit:
        raise BadAnswer(f"declares {declared} bytes, more than the {limit} an answer of this length can take")
    exchange = getattr(_current, "exchange", None)
    chunks, size = [], 0
    for chunk in response.iter_content(min(_CHUNK_BYTES, limit + 1)):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            if cut:
                return b"".join(chunks)[:limit]
            raise BadAnswer(f"is longer than the {limit} bytes an answer of this length can take")
        if exchange is not None and exchange.over():
            break
    if exchange is not None and exchange.over():  # a close-delimited body ends early when the watchdog shuts it
        raise _Failed(f"the answer was still arriving after {getattr(_current, 'timeout', 0):g} s")
    return b"".join(chunks)
