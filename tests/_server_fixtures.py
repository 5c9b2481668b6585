"""Helpers for server tests: a real uvicorn server on 127.0.0.1 and a free port, in a thread or a process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, timeout: float = 120.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{base} did not become healthy")


class ThreadServer:
    """uvicorn serving `app` in a background thread of the test process."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.app = app
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        wait_healthy(self.base, 60)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


class ProcessServer:
    """`qianwen serve ...` in a subprocess; stopped by the PID this object started."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, timeout: float = 300) -> None:
        self.port, self.timeout = free_port(), timeout
        self.base = f"http://127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "qianwen.cli.main", "serve", "--port", str(self.port),
                     "--log-level", "warning", *args]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> ProcessServer:
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"qianwen-serve-{self.port}.log", "w+")
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_healthy(self.base, self.timeout, self.proc)
        except Exception:
            self.__exit__()
            self.log.seek(0)
            raise RuntimeError("server failed to start:\n" + self.log.read()[-3000:]) from None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def load_tiny(folder: Path, dtype: str = "float32") -> Any:
    import qianwen

    return qianwen.load(str(folder), dtype=dtype)


def forcing_processor(target_ids: list[int], end_id: int, seen_prompts: list[list[int]] | None = None):
    """A logits processor that makes the model write exactly `target_ids`, then `end_id`."""
    import torch

    def fn(prompt_ids: list[int], output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if seen_prompts is not None and not output_ids:
            seen_prompts.append(list(prompt_ids))
        k = len(output_ids)
        want = target_ids[k] if k < len(target_ids) else end_id
        out = torch.full_like(logits, float("-inf"))
        out[want] = 0.0
        return out

    return fn


def force(server, text: str) -> list[list[int]]:
    """Make every following answer of `server` (a ThreadServer with .model and .serving) exactly `text`;
    returns the list the prompts get recorded in."""
    tok = server.model.tokenizer
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    seen: list[list[int]] = []
    server.serving.logits_processors = [forcing_processor(ids, tok.token_to_id("<|im_end|>"), seen)]
    return seen


def metric(text: str, name: str) -> float:
    """The value of an unlabelled sample `name` in Prometheus text."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)
