"""POST /v1/completions: raw prompts (text or token ids, one or many), full answers or an SSE stream."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from .schemas import CompletionRequest
from .serving import APIError, Serving, new_id, sse, usage
from .structured import processor_factory, request_grammar


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
            if not item or any(t < 0 or t >= vocab for t in item):
                raise APIError(400, f"token ids must be in [0, {vocab})", param="prompt")
            out.append((None, list(item)))
    return out


def _prepare(serving: Serving, req: CompletionRequest) -> tuple[list, list, int]:
    serving.check_model(req.model)
    if req.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    if req.echo and req.logprobs is not None:
        raise APIError(400, "echo together with logprobs is not supported", param="echo")
    prompts = _prompts(serving, req)
    serving.check_n(req.n * len(prompts))
    processors = processor_factory(serving.model, request_grammar(req), "response_format")
    seqs, prompt_tokens = [], 0
    for _text, ids in prompts:
        # OpenAI's legacy completions default to 16 tokens
        requested = req.max_tokens if req.max_tokens is not None else min(16, serving.context_length - len(ids))
        max_tokens = serving.max_new_tokens(max(requested, 1), len(ids), "prompt")
        params = serving.sampling_params(req, max_tokens, req.logprobs)
        seqs += serving.make_sequences(ids, params, req.n, processors)
        prompt_tokens += len(ids)
    serving.check_capacity(len(seqs))
    return prompts, seqs, prompt_tokens


def _logprobs(serving: Serving, entries: list[Any], offset: int) -> dict[str, Any]:
    tokens, lps, tops, offsets = [], [], [], []
    for out in entries:
        text, _ = serving.token_text(out.token_id)
        tokens.append(text)
        lps.append(out.logprob)
        tops.append({serving.token_text(t)[0]: lp for t, lp in out.top_logprobs} if out.top_logprobs else None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


async def completion(serving: Serving, req: CompletionRequest, request: Any) -> dict[str, Any]:
    arrival = time.perf_counter()
    prompts, seqs, prompt_tokens = _prepare(serving, req)
    serving.metrics.prompt_tokens.inc(prompt_tokens)
    texts: list[list[str]] = [[] for _ in seqs]
    entries: list[list[Any]] = [[] for _ in seqs]
    reasons: list[str] = ["stop"] * len(seqs)
    async for i, out in serving.outputs(seqs, serving.submit(seqs), arrival, request):
        texts[i].append(out.text)
        if out.token_id >= 0:
            entries[i].append(out)
        if out.finish_reason:
            reasons[i] = out.finish_reason if out.finish_reason in ("stop", "length") else "stop"
    choices = []
    for i in range(len(seqs)):
        head = ""
        if req.echo:
            text = prompts[i // req.n][0]
            head = text if text is not None else serving.model.tokenizer.decode(seqs[i].prompt_ids)
        choices.append({"index": i, "text": head + "".join(texts[i]), "finish_reason": reasons[i],
                        "logprobs": _logprobs(serving, entries[i], 0) if req.logprobs is not None else None})
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
    rid, created, name = new_id("cmpl"), int(time.time()), serving.config.model_name
    with_usage = bool(req.stream_options and req.stream_options.include_usage)
    offsets = [0] * len(seqs)

    def chunk(i: int, text: str, finish: str | None, entries: list[Any]) -> str:
        lp = None
        if req.logprobs is not None:
            lp = _logprobs(serving, entries, offsets[i])
            offsets[i] += sum(len(t) for t in lp["tokens"])
        body = {"id": rid, "object": "text_completion", "created": created, "model": name,
                "system_fingerprint": None,
                "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": finish}]}
        if with_usage:
            body["usage"] = None
        return sse(body)

    if req.echo:
        for i, s in enumerate(seqs):
            text = prompts[i // req.n][0]
            yield chunk(i, text if text is not None else serving.model.tokenizer.decode(s.prompt_ids), None, [])
    pending: list[list[Any]] = [[] for _ in seqs]
    try:
        async for i, out in serving.outputs(seqs, queue, arrival):
            if out.token_id >= 0:
                pending[i].append(out)
            if out.text or out.finish_reason:
                reason = None
                if out.finish_reason:
                    reason = out.finish_reason if out.finish_reason in ("stop", "length") else "stop"
                yield chunk(i, out.text, reason, pending[i])
                pending[i] = []
    except APIError as e:
        yield sse(e.body())
    if with_usage:
        n_out = sum(len(s.output_ids) for s in seqs)
        yield sse({"id": rid, "object": "text_completion", "created": created, "model": name,
                   "system_fingerprint": None, "choices": [], "usage": usage(prompt_tokens, n_out)})
    yield sse("[DONE]")
