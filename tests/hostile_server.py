"""A hostile OpenAI-compatible server for the server engine's tests: a raw-socket HTTP server on 127.0.0.1 whose
answer to each request is scripted, down to the bytes (a trickle, a cut mid-body, a garbage status line)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

MODEL = "seed"


@dataclass
class Reply:
    """One scripted answer.

    `body`: bytes, JSON (a dict), or an iterable of byte chunks (a body too large to hold). `length`: the
    Content-Length declared; "auto" for the body's own, None for none (the body ends when the connection closes).
    `trickle`: seconds between bytes, from the status line on (or from the body on, without `trickle_head`). `cut`:
    bytes of the body sent before the connection is closed. `raw`: sent as is, instead of all of the above.
    """

    status: int = 200
    body: bytes | dict | Iterable[bytes] = b""
    headers: dict[str, str] = field(default_factory=dict)
    length: int | str | None = "auto"
    trickle: float = 0.0
    trickle_head: bool = True
    cut: int | None = None
    raw: bytes | None = None


@dataclass
class Request:
    method: str
    path: str
    body: Any  # the JSON sent, or None
    at: float  # time.monotonic() when it arrived


def completion(text: Any = "A rewrite.", finish_reason: Any = "stop", **choice: Any) -> dict:
    """A `/v1/completions` answer with one choice (index 0), as `transformers serve` and vLLM send it."""
    entry = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason, **choice}
    return {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": MODEL, "choices": [entry]}


def models(*ids: str) -> Reply:
    return Reply(body={"object": "list", "data": [{"id": model, "object": "model"} for model in ids or (MODEL,)]})


class HostileServer:
    """Answers GET /v1/models with `model_list`, and each POST with the next of `replies` (the last one repeats), or
    with `replies(request)` if it is a function. Every request is kept in `requests`, and the bytes of each answer
    actually sent in `sent`. One request per connection, which is closed after the answer."""

    def __init__(self, replies: list[Reply] | Callable[[Request], Reply], model_list: Reply | None = None):
        self.replies = replies
        self.model_list = model_list or models()
        self.requests: list[Request] = []
        self.sent: list[int] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def posts(self) -> list[Request]:
        return [request for request in self.requests if request.method == "POST"]

    def close(self) -> None:
        self._listener.close()

    def __enter__(self) -> HostileServer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        with connection:
            request = self._read(connection)
            if request is None:
                return
            with self._lock:
                self.requests.append(request)
                if request.method == "GET":
                    reply = self.model_list
                elif callable(self.replies):
                    reply = self.replies(request)
                else:
                    reply = self.replies[min(len(self.posts), len(self.replies)) - 1]
            sent = 0
            try:
                for piece, trickle in self._pieces(reply):
                    if not trickle:
                        connection.sendall(piece)
                        sent += len(piece)
                        continue
                    for byte in range(len(piece)):
                        connection.sendall(piece[byte : byte + 1])
                        sent += 1
                        time.sleep(trickle)
            except OSError:  # the client gave up
                pass
            with self._lock:
                self.sent.append(sent)

    @staticmethod
    def _read(connection: socket.socket) -> Request | None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = connection.recv(65536)
            if not chunk:
                return None
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {name.strip().lower(): value.strip() for name, value in (line.split(":", 1) for line in lines[1:])}
        while len(body) < int(headers.get("content-length", 0)):
            body += connection.recv(65536)
        return Request(method, path, json.loads(body) if body else None, time.monotonic())

    @staticmethod
    def _pieces(reply: Reply) -> Iterable[tuple[bytes, float]]:
        """The answer's bytes, each piece with the seconds to wait between its bytes."""
        if reply.raw is not None:
            yield reply.raw, reply.trickle
            return
        body = reply.body
        if isinstance(body, dict):
            body = json.dumps(body).encode()
        length = len(body) if reply.length == "auto" else reply.length
        head = f"HTTP/1.1 {reply.status} {HTTPStatus(reply.status).phrase}\r\nContent-Type: application/json\r\n"
        head += f"Content-Length: {length}\r\n" if length is not None else ""
        head += "".join(f"{name}: {value}\r\n" for name, value in reply.headers.items())
        yield (head + "Connection: close\r\n\r\n").encode("latin-1"), reply.trickle if reply.trickle_head else 0.0
        chunks = [body] if isinstance(body, bytes) else body
        left = reply.cut
        for chunk in chunks:
            if left is not None:
                chunk, left = chunk[:left], left - len(chunk[:left])
            yield chunk, reply.trickle
            if left == 0:
                return
