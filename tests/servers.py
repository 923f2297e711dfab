"""Servers the server-engine tests start themselves: the real `transformers serve` and vLLM, a deliberately broken one,
and a proxy that counts what reaches a server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from trl_selfdistill.generation.vllm_server import VLLMServer


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TransformersServe:
    """`transformers serve <model_dir>` on the CPU in float32, in a subprocess; its model id is `model_dir`."""

    def __init__(self, model_dir: str, log_path: Path, port: int | None = None):
        self.model_dir = model_dir
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> TransformersServe:
        command = [sys.executable, "-m", "transformers.cli.transformers", "serve", self.model_dir]
        command += ["--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu", "--dtype", "float32"]
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"transformers serve exited with {self.process.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2):
                    return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"transformers serve did not answer within {timeout} s; see {self.log_path}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


class JSONHandler(BaseHTTPRequestHandler):
    """A request handler that answers JSON bytes and logs nothing."""

    def send_json(self, code: int, payload: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):  # quiet
        pass


class LocalServer:
    """A threaded HTTP server on a free port of 127.0.0.1, serving `handler` in the background until `close`."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def model_list(model: str) -> bytes:
    """`/v1/models` as OpenAI-compatible servers answer it, listing `model`."""
    return json.dumps({"object": "list", "data": [{"id": model, "object": "model"}]}).encode()


class BrokenServer(LocalServer):
    """Lists `model` on /v1/models, then answers every completion with `status` and `body` (counted in `calls`)."""

    def __init__(self, model: str, status: int, body: bytes):
        self.calls = 0
        owner = self

        class Handler(JSONHandler):
            def do_GET(self):
                self.send_json(200, model_list(model))

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                owner.calls += 1
                self.send_json(status, body)

        super().__init__(Handler)


def vllm_python() -> str | None:
    """The interpreter of the vLLM environment `tools/vllm_env.sh` builds (vLLM pins its own torch and transformers,
    so it lives apart from the project's): `$TRL_SELFDISTILL_VLLM_PYTHON`, else `.venv-vllm` in the checkout."""
    python = os.environ.get("TRL_SELFDISTILL_VLLM_PYTHON") or str(Path(__file__).parents[1] / ".venv-vllm/bin/python")
    return python if os.access(python, os.X_OK) else None


def vllm_server(python: str, model_dir: str, served_name: str, log_path: Path) -> VLLMServer:
    """vLLM on the bundled model in float32, as the tests run it.

    `--enforce-eager`: compiling the model for the CPU takes about 2.5 min on 2 cores, eager mode starts in about
    50 s. The KV cache gets 2 GiB, as vLLM's CPU notes advise on a small machine.
    """
    arguments = ["--dtype", "float32", "--max-model-len", "2048", "--enforce-eager"]
    env = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1"}
    return VLLMServer(model_dir, python=python, served_model_name=served_name, arguments=arguments, env=env,
                      log_path=log_path)  # fmt: skip


class CountingProxy(LocalServer):
    """Forwards every request to `upstream` unchanged and counts them by method and path (`counts["POST /v1/..."]`);
    `bodies` are the JSON bodies posted; `max_in_flight` is the most requests it had open at once."""

    def __init__(self, upstream: str):
        self.counts: Counter[str] = Counter()
        self.bodies: list = []
        self.in_flight = self.max_in_flight = 0
        lock = threading.Lock()
        owner = self

        class Handler(JSONHandler):
            def do_GET(self):
                self._forward(None)

            def do_POST(self):
                self._forward(self.rfile.read(int(self.headers.get("Content-Length", 0))))

            def _forward(self, body: bytes | None):
                with lock:
                    owner.counts[f"{self.command} {self.path}"] += 1
                    if body is not None:
                        owner.bodies.append(json.loads(body))
                    owner.in_flight += 1
                    owner.max_in_flight = max(owner.max_in_flight, owner.in_flight)
                request = urllib.request.Request(upstream + self.path, data=body, method=self.command,
                                                 headers={"Content-Type": "application/json"})  # fmt: skip
                try:
                    with urllib.request.urlopen(request, timeout=600) as response:
                        status, payload = response.status, response.read()
                except urllib.error.HTTPError as error:
                    status, payload = error.code, error.read()
                finally:
                    with lock:
                        owner.in_flight -= 1
                self.send_json(status, payload)

        super().__init__(Handler)


class TimedServer(LocalServer):
    """An OpenAI-compatible completions server that answers `text` after `delay(prompt)` seconds, and records when
    each prompt's request started and ended (`log`, in monotonic seconds)."""

    def __init__(self, model: str, delay, text: str = "fine"):
        self.log: dict[str, tuple[float, float]] = {}
        owner = self

        class Handler(JSONHandler):
            def do_GET(self):
                self.send_json(200, model_list(model))

            def do_POST(self):
                prompt = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))["prompt"]
                started = time.monotonic()
                time.sleep(delay(prompt))
                owner.log[prompt] = (started, time.monotonic())
                choice = {"index": 0, "text": text, "finish_reason": "stop"}
                answer = {"object": "text_completion", "model": model, "choices": [choice]}
                self.send_json(200, json.dumps(answer).encode())

        super().__init__(Handler)
