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


# ---------------------------------------------------------------- OpenAI conformance checks, with the official
# client, shared by tests/test_server_openai.py (our engine, the default GGUF) and tests/test_server_vllm.py (both
# engines behind the gateway)

def check_chat_stream_equals_non_stream(client: Any, name: str) -> None:
    kw = dict(model=name, messages=[{"role": "user", "content": "What is the capital of France?"}],
              temperature=0, max_tokens=24)
    full = client.chat.completions.create(**kw)
    answer = full.choices[0].message.content
    assert answer.strip() and full.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens > 5


def check_completions_n_logprobs_stop(client: Any, name: str, tokens_spell_text: bool = True) -> None:
    """`n`, `logprobs` and `stop` on /v1/completions; `tokens_spell_text`: the logprob tokens' strings begin
    the text (our engine's tokens; vLLM's are not checked for it)."""
    r = client.completions.create(model=name, prompt="The three primary colors are", max_tokens=12,
                                  temperature=0, n=2, logprobs=2)
    assert len(r.choices) == 2 and r.choices[0].text == r.choices[1].text
    assert r.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in r.choices)
    assert all(len(t) <= 2 for c in r.choices for t in c.logprobs.top_logprobs) and r.choices[0].logprobs.top_logprobs
    if tokens_spell_text:
        assert "".join(r.choices[0].logprobs.tokens).startswith(r.choices[0].text[:3])
    text = r.choices[0].text
    word = text.split()[1] if len(text.split()) > 1 else text.split()[0]
    cut = client.completions.create(model=name, prompt="The three primary colors are", max_tokens=12,
                                    temperature=0, stop=[word])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[:text.find(word)]


def check_chat_logprobs_and_seeded_sampling(client: Any, name: str) -> None:
    kw = dict(model=name, messages=[{"role": "user", "content": "Say hi"}], max_tokens=5, temperature=0.8, seed=1,
              n=2)
    r = client.chat.completions.create(**kw, logprobs=True, top_logprobs=3)
    assert len(r.choices) == 2
    for c in r.choices:
        assert len(c.logprobs.content) >= 1 and all(len(t.top_logprobs) == 3 for t in c.logprobs.content)
        assert all(t.logprob <= 0 for t in c.logprobs.content)
    again = client.chat.completions.create(**kw)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]
