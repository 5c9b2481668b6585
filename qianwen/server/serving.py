"""What the OpenAI routes share: errors, limits, sampling parameters, prompt checks, output collection."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from fastapi import Request
from fastapi.responses import StreamingResponse

from .. import native
from ..engine.async_engine import AsyncEngine
from ..engine.sequence import Sequence, StepOutput
from ..errors import QianwenError
from ..generation.params import OPTIONS, SamplingParams
from .metrics import Metrics
from .schemas import ErrorResponse

if TYPE_CHECKING:
    from ..api import Model  # the loaded model (type only: no upward import at run time)

# the error answers every route may give, for the OpenAPI schema
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 500, 503)}


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ServerConfig:
    model_name: str
    api_keys: list[str] = field(default_factory=list)
    max_body_bytes: int = 4 * 2**20
    max_tokens_limit: int | None = None  # cap on max_tokens per request (None: the context)
    max_n: int = 8
    max_queue: int = 64  # sequences waiting; beyond it: 429
    cors_origins: list[str] = field(default_factory=list)
    # cores the kernels leave to the event loop and HTTP while few sequences run (engine/async_engine.py);
    # None: one on a CPU with two or more usable cores
    frontend_cores: int | None = None


class Serving:
    """Model + engine + limits: everything a route needs."""

    def __init__(self, model: Model, engine: AsyncEngine, config: ServerConfig, metrics: Metrics) -> None:
        self.model, self.engine, self.config, self.metrics = model, engine, config, metrics
        self.created = int(time.time())
        # applied to every sequence (constrained decoding hooks; tests force exact outputs with them)
        self.logits_processors: list[Any] = []
        # prompt scoring (echo + logprobs) runs here, off the event loop, one request at a time
        self.scorer = ThreadPoolExecutor(1, thread_name_prefix="qianwen-score")

    @property
    def context_length(self) -> int:
        return self.engine.engine.context_length

    def check_model(self, name: str) -> None:
        if name != self.config.model_name:
            raise APIError(404, f"The model `{name}` does not exist. This server serves `{self.config.model_name}`.",
                           param="model", code="model_not_found")

    def check_capacity(self, n_sequences: int) -> None:
        if self.engine.error is not None:
            raise APIError(503, f"the engine stopped: {self.engine.error}", type="server_error")
        if self.engine.engine.num_waiting + n_sequences > self.config.max_queue:
            raise APIError(429, "The server is busy: too many requests are waiting. Retry shortly.",
                           type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})

    def check_n(self, n: int) -> None:
        if n > self.config.max_n:
            raise APIError(400, f"n must be at most {self.config.max_n}, got {n}", param="n")

    def max_new_tokens(self, requested: int | None, n_prompt: int, what: str) -> int:
        ctx = self.context_length
        if n_prompt >= ctx:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, your {what} "
                                f"resulted in {n_prompt} tokens. Please reduce the length of the {what}.",
                           param=what, code="context_length_exceeded")
        limit = self.config.max_tokens_limit
        if requested is not None:
            if limit is not None and requested > limit:
                raise APIError(400, f"max_tokens is {requested}; this server allows at most {limit}",
                               param="max_tokens")
            if n_prompt + requested > ctx:
                raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                                    f"{n_prompt + requested} tokens ({n_prompt} in the {what}, {requested} in the "
                                    "completion). Please reduce the length of the "
                                    f"{what} or completion.", param="max_tokens", code="context_length_exceeded")
            return requested
        default = int(self.model.sampling_defaults.get("max_tokens") or 512)
        return min(default, ctx - n_prompt, limit or ctx)

    def sampling_params(self, req: Any, max_tokens: int, logprobs: int | None,
                        extra_stop: list[str] | None = None) -> SamplingParams:
        """The request's sampling fields (already checked by the schema with generation's `check_option`)."""
        options = {name: getattr(req, name, None) for name in OPTIONS}
        options.update(max_tokens=max_tokens, logprobs=logprobs, ignore_eos=req.ignore_eos or None)
        try:
            params = self.model.params(**options)
        except QianwenError as e:
            raise APIError(400, str(e)) from None
        return params.replace(stop=params.stop + (extra_stop or []))

    def make_sequences(self, prompt_ids: list[int], params: SamplingParams, n: int,
                       processors: Callable[[], list[Any]] | None = None) -> list[Sequence]:
        """`processors` makes each sequence's own (stateful) logits processors: an output constraint."""
        seqs = []
        for i in range(n):
            p = params if params.seed is None or i == 0 else params.replace(seed=params.seed + i)
            try:
                seq = self.engine.engine.make_sequence(
                    prompt_ids, p, logits_processors=list(self.logits_processors) + (processors() if processors else []))
            except QianwenError as e:
                raise APIError(400, str(e), param="messages") from None
            seqs.append(seq)
        return seqs

    async def score(self, prompts: list[list[int]], top: int) -> list[tuple[list[float], list]]:
        """prompt_logprobs of each prompt, computed on the scoring thread."""
        def job() -> list[tuple[list[float], list]]:
            try:
                return [prompt_logprobs(self.model, p, top) for p in prompts]
            finally:  # its OpenMP threads, kept, would make the engine thread's barriers sleep (qianwen/native)
                native.release_pool()

        return await asyncio.get_running_loop().run_in_executor(self.scorer, job)

    # ---------------------------------------------------------------- outputs

    def token_text(self, token_id: int) -> tuple[str, list[int]]:
        data = self.model.tokenizer.id_to_token_bytes(token_id)
        return data.decode("utf-8", errors="replace"), list(data)

    def submit(self, seqs: list[Sequence]) -> asyncio.Queue:
        """Queue the sequences in the engine now (the request holds its place from arrival)."""
        return self.engine.submit(seqs)

    async def outputs(self, seqs: list[Sequence], queue: asyncio.Queue, arrival: float, request: Any = None
                      ) -> AsyncIterator[tuple[int, StepOutput]]:
        """(choice index, output) for every token of every sequence, as they come; records latency
        metrics; aborts whatever is left if the consumer stops or the client disconnects."""
        index = {s.seq_id: i for i, s in enumerate(seqs)}
        last: dict[int, float] = {}
        remaining = len(seqs)
        try:
            while remaining:
                if request is not None:  # non-streaming: notice a client that went away
                    try:
                        out = await asyncio.wait_for(queue.get(), timeout=1.0)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            return
                        continue
                else:
                    out = await queue.get()
                now = time.perf_counter()
                if out.token_id >= 0:
                    prev = last.get(out.seq_id)
                    if prev is None:
                        self.metrics.ttft.observe(now - arrival)
                    else:
                        self.metrics.itl.observe(now - prev)
                    last[out.seq_id] = now
                    self.metrics.generation_tokens.inc()
                if out.finish_reason:
                    remaining -= 1
                    self.metrics.finished.inc(reason=out.finish_reason)
                    if out.finish_reason == "error":  # this request only: the engine carries on
                        raise APIError(500, f"generation failed: {out.error or self.engine.error}",
                                       type="server_error")
                yield index[out.seq_id], out
        finally:
            aborted = [s for s in seqs if not s.is_finished]
            if aborted:
                self.metrics.aborted.inc(len(aborted))
            self.engine.release(seqs)


def get_serving(request: Request) -> Serving:
    """The routes' dependency: the app's Serving (set by create_app)."""
    return request.app.state.serving


SCORE_ROWS = 256  # logits rows computed at once when scoring a prompt


@torch.inference_mode()
def prompt_logprobs(model: Model, ids: list[int], top: int) -> tuple[list[float], list[list[tuple[int, float]] | None]]:
    """The log-probability of each token of `ids` after the first, given the tokens before it, and the
    `top` most likely tokens at each of those positions: one forward over the prompt, as `Model.logits`
    does (float32 logits), with the vocabulary projection SCORE_ROWS rows at a time so that memory stays
    SCORE_ROWS x vocab whatever the prompt's length."""
    net = model.net
    hidden = net.hidden_states(torch.tensor([ids], dtype=torch.long, device=model.device))[0, :-1]
    targets = torch.tensor(ids[1:], dtype=torch.long, device=hidden.device)
    lps: list[float] = []
    tops: list[list[tuple[int, float]] | None] = []
    for i in range(0, len(ids) - 1, SCORE_ROWS):
        lp = torch.log_softmax(net.compute_logits(hidden[i:i + SCORE_ROWS]), dim=-1)
        lps += lp.gather(1, targets[i:i + SCORE_ROWS, None])[:, 0].tolist()
        if top:
            values, idx = lp.topk(top, dim=-1)
            tops += [list(zip(j, v, strict=True)) for j, v in zip(idx.tolist(), values.tolist(), strict=True)]
        else:
            tops += [None] * lp.shape[0]
    return lps, tops


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    """A response streaming `events` (SSE text, `sse`) to the client as they come."""
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class ChunkFormat:
    """The SSE events of one stream: `head` (id, object, created, model, ...) and the `usage: null` that
    every chunk repeats are serialised once; each chunk then serialises only its one choice. The text is
    exactly `sse({**head, "choices": [choice], "usage": None})` (without usage unless `with_usage`)."""

    def __init__(self, head: dict[str, Any], with_usage: bool) -> None:
        self.head = head
        self.prefix = "data: " + json.dumps(head, ensure_ascii=False)[:-1] + ', "choices": ['
        self.suffix = ("], \"usage\": null}" if with_usage else "]}") + "\n\n"

    def __call__(self, choice: dict[str, Any]) -> str:
        return self.prefix + json.dumps(choice, ensure_ascii=False) + self.suffix


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
