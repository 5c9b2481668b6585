"""POST /v1/completions: raw prompts (text or token ids, one or many), full answers or an SSE stream."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request

from .schemas import Completion, CompletionRequest
from .serving import ERRORS, APIError, ChunkFormat, Serving, get_serving, new_id, sse, sse_response, usage
from .structured import processor_factory, request_grammar

router = APIRouter()


@router.post("/v1/completions", response_model=Completion, responses=ERRORS,
             summary="Text completion (set stream=true for server-sent events)")
async def complete(req: CompletionRequest, request: Request, serving: Serving = Depends(get_serving)) -> Any:
    if req.stream:
        return sse_response(completion_stream_setup(serving, req))
    return await completion(serving, req, request)


def _prompts(serving: Serving, req: CompletionRequest) -> list[tuple[str | None, list[int]]]:
    """(text or None, token ids) for each prompt in the request."""
    p = req.prompt
    tok = serving.model.tokenizer
    bos = [tok.bos_id] if tok.add_bos and tok.bos_id is not None else []
    if isinstance(p, str):
        items: list[Any] = [p]
    elif p and all(isinstance(x, int) for x in p):
        items = [p]
    else:
        items = list(p)
    if not items:
        raise APIError(400, "prompt must not be empty", param="prompt")
    out = []
    vocab = tok.vocab_size
    for item in items:
        if isinstance(item, str):
            out.append((item, bos + tok.encode(item)))
        else:
            if any(t < 0 or t >= vocab for t in item):
                raise APIError(400, f"token ids must be in [0, {vocab})", param="prompt")
            out.append((None, list(item)))
        if not out[-1][1]:
            raise APIError(400, "a prompt must have at least one token", param="prompt")
    return out


def _prepare(serving: Serving, req: CompletionRequest) -> tuple[list, list, int]:
    """Validate the whole request, then build its sequences (none when max_tokens is 0: echo only)."""
    serving.check_model(req.model)
    if req.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    if req.max_tokens == 0 and not req.echo:
        raise APIError(400, "max_tokens must be at least 1 (0 is allowed with echo, to score the prompt)",
                       param="max_tokens")
    prompts = _prompts(serving, req)
    serving.check_n(req.n * len(prompts))
    processors = processor_factory(serving.model, request_grammar(req), "response_format")
    seqs, prompt_tokens = [], 0
    for _text, ids in prompts:
        # OpenAI's legacy completions default to 16 tokens
        requested = req.max_tokens if req.max_tokens is not None else max(1, min(16, serving.context_length - len(ids)))
        max_tokens = serving.max_new_tokens(requested, len(ids), "prompt")
        prompt_tokens += len(ids)
        if max_tokens == 0:
            continue
        params = serving.sampling_params(req, max_tokens, req.logprobs)
        seqs += serving.make_sequences(ids, params, req.n, processors)
    if seqs:
        serving.check_capacity(len(seqs))
    return prompts, seqs, prompt_tokens


def _logprobs(serving: Serving, ids: list[int], lps: list[float | None],
              tops: list[list[tuple[int, float]] | None], offset: int) -> dict[str, Any]:
    """OpenAI's legacy logprobs object for these tokens; text_offset counts from `offset`."""
    tokens, offsets = [], []
    for t in ids:
        text = serving.token_text(t)[0]
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": list(lps), "text_offset": offsets,
            "top_logprobs": [_top(serving, top) if top else None for top in tops]}


def _top(serving: Serving, top: list[tuple[int, float]]) -> dict[str, float]:
    """{token text: logprob}, best first; tokens that print alike (partial UTF-8) keep the best one."""
    out: dict[str, float] = {}
    for t, lp in top:
        out.setdefault(serving.token_text(t)[0], lp)
    return out


def _generated_logprobs(serving: Serving, entries: list[Any], offset: int) -> dict[str, Any]:
    return _logprobs(serving, [o.token_id for o in entries], [o.logprob for o in entries],
                     [o.top_logprobs for o in entries], offset)


def _join(a: dict[str, Any] | None, b: dict[str, Any]) -> dict[str, Any]:
    return b if a is None else {k: a[k] + b[k] for k in a}


async def _echoes(serving: Serving, req: CompletionRequest, prompts: list) -> list[tuple[str, dict | None]]:
    """For each prompt, the text echoed and (with logprobs) the prompt tokens' logprobs: the first
    token's is null, as in OpenAI's and vLLM's answers, since nothing comes before it."""
    tok = serving.model.tokenizer
    texts = [text if text is not None else tok.decode(ids) for text, ids in prompts]
    if req.logprobs is None:
        return [(t, None) for t in texts]
    scored = await serving.score([ids for _, ids in prompts], req.logprobs)
    return [(t, _logprobs(serving, ids, [None, *lps], [None, *tops], 0))
            for t, (_, ids), (lps, tops) in zip(texts, prompts, scored, strict=True)]


async def completion(serving: Serving, req: CompletionRequest, request: Any) -> dict[str, Any]:
    arrival = time.perf_counter()
    prompts, seqs, prompt_tokens = _prepare(serving, req)
    serving.metrics.prompt_tokens.inc(prompt_tokens)
    queue = serving.submit(seqs)
    try:
        echoes = await _echoes(serving, req, prompts) if req.echo else None
    except BaseException:
        serving.engine.release(seqs)
        raise
    n_choices = len(prompts) * req.n
    texts: list[list[str]] = [[] for _ in range(n_choices)]
    entries: list[list[Any]] = [[] for _ in range(n_choices)]
    reasons: list[str] = ["length" if not seqs else "stop"] * n_choices
    async for i, out in serving.outputs(seqs, queue, arrival, request):
        texts[i].append(out.text)
        if out.token_id >= 0:
            entries[i].append(out)
        if out.finish_reason:
            reasons[i] = out.finish_reason if out.finish_reason in ("stop", "length") else "stop"
    choices = []
    for i in range(n_choices):
        head, lp = echoes[i // req.n] if echoes else ("", None)
        if req.logprobs is not None:
            offset = sum(len(t) for t in lp["tokens"]) if lp else 0
            lp = _join(lp, _generated_logprobs(serving, entries[i], offset))
        choices.append({"index": i, "text": head + "".join(texts[i]), "finish_reason": reasons[i], "logprobs": lp})
    n_out = sum(len(s.output_ids) for s in seqs)
    return {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()),
            "model": serving.config.model_name, "choices": choices, "usage": usage(prompt_tokens, n_out),
            "system_fingerprint": None}


def completion_stream_setup(serving: Serving, req: CompletionRequest) -> AsyncIterator[str]:
    arrival = time.perf_counter()
    prompts, seqs, prompt_tokens = _prepare(serving, req)
    serving.metrics.prompt_tokens.inc(prompt_tokens)
    queue = serving.submit(seqs)
    return _stream(serving, req, prompts, seqs, queue, prompt_tokens, arrival)


async def _stream(serving: Serving, req: CompletionRequest, prompts: list, seqs: list, queue: Any,
                  prompt_tokens: int, arrival: float) -> AsyncIterator[str]:
    with_usage = bool(req.stream_options and req.stream_options.include_usage)
    head = {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()),
            "model": serving.config.model_name, "system_fingerprint": None}
    fmt = ChunkFormat(head, with_usage)
    n_choices = len(prompts) * req.n
    offsets = [0] * n_choices

    def chunk(i: int, text: str, finish: str | None, lp: dict[str, Any] | None) -> str:
        if lp is not None:
            offsets[i] += sum(len(t) for t in lp["tokens"])
        return fmt({"index": i, "text": text, "logprobs": lp, "finish_reason": finish})

    try:
        if req.echo:  # each choice starts with its prompt (and the prompt's logprobs), as in vLLM
            echoes = await _echoes(serving, req, prompts)
            for i in range(n_choices):
                text, lp = echoes[i // req.n]
                yield chunk(i, text, None if seqs else "length", lp)
        pending: list[list[Any]] = [[] for _ in range(n_choices)]
        async for i, out in serving.outputs(seqs, queue, arrival):
            if out.token_id >= 0:
                pending[i].append(out)
            if out.text or out.finish_reason:
                reason = None
                if out.finish_reason:
                    reason = out.finish_reason if out.finish_reason in ("stop", "length") else "stop"
                lp = _generated_logprobs(serving, pending[i], offsets[i]) if req.logprobs is not None else None
                yield chunk(i, out.text, reason, lp)
                pending[i] = []
    except APIError as e:
        yield sse(e.body())
    finally:
        serving.engine.release(seqs)
    if with_usage:
        n_out = sum(len(s.output_ids) for s in seqs)
        yield sse({**head, "choices": [], "usage": usage(prompt_tokens, n_out)})
    yield sse("[DONE]")
