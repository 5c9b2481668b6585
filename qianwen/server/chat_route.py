"""POST /v1/chat/completions: prompt building (chat template, tools), then a full answer or an SSE stream."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Request

from ..chat import reasoning as R
from ..chat import tools as T
from ..chat.template import encode_rendered
from ..models import architecture
from .schemas import ChatCompletion, ChatCompletionRequest
from .serving import ERRORS, APIError, ChunkFormat, Serving, get_serving, new_id, sse, sse_response, usage
from .structured import processor_factory, request_grammar

if TYPE_CHECKING:
    from ..api import Model  # the loaded model (type only: no upward import at run time)

router = APIRouter()


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses=ERRORS,
             summary="Chat completion (set stream=true for server-sent events)")
async def chat(req: ChatCompletionRequest, request: Request, serving: Serving = Depends(get_serving)) -> Any:
    if req.stream:
        return sse_response(chat_stream_setup(serving, req))
    return await chat_completion(serving, req, request)


def _messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    out = []
    for m in req.messages:
        d = m.model_dump(exclude_none=True)
        if d["role"] == "developer":  # OpenAI's newer name for the system role
            d["role"] = "system"
        if isinstance(d.get("content"), list):
            d["content"] = "".join(p["text"] for p in d["content"])
        if d["role"] in ("system", "user", "tool") and d.get("content") is None:
            raise APIError(400, f"a {d['role']} message needs 'content'", param="messages")
        d.setdefault("content", None if d.get("tool_calls") else "")
        out.append(d)
    return out


class ChatPrompt:
    """Token ids for a chat request, how to read the answer (tool format, reasoning) and what constrains it."""

    def __init__(self, serving: Serving, req: ChatCompletionRequest) -> None:
        model = serving.model
        template = model.chat_template
        messages = T.prepare_messages(_messages(req))
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        choice = req.tool_choice.model_dump() if hasattr(req.tool_choice, "model_dump") else req.tool_choice
        if isinstance(choice, dict):
            if not tools or choice["function"]["name"] not in {t["function"]["name"] for t in tools}:
                raise APIError(400, f"tool_choice names a function not in tools: {choice['function']['name']}",
                               param="tool_choice")
        if choice == "required" and not tools:
            raise APIError(400, "tool_choice 'required' needs tools", param="tool_choice")
        self.use_tools = bool(tools) and choice != "none"
        self.arch = architecture(model.config.model_type)
        self.fmt = T.tool_format(self.arch.tool_format, None if template.builtin else template.source)
        history_has_tools = any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
        if not (self.use_tools or history_has_tools):
            self.fmt = "plain"
        self.stop = [T.REACT_STOP] if self.fmt == "react" and self.use_tools else []
        self.kwargs = req.chat_template_kwargs or {}
        text = self._render(model, messages, tools if self.use_tools else None)
        contents = [m.get("content") for m in messages]
        self.ids = encode_rendered(model.tokenizer, text, contents)
        # Qwen3 thinking (chat/reasoning.py) and the output constraint (tools, response_format, guided_*)
        self.reasoning = R.template_thinks(None if template.builtin else template.source)
        self.in_think = self.reasoning and R.prompt_opens_thinking(text)
        think = self.reasoning and R.thinking_allowed(text)
        grammar = request_grammar(req, think)
        if self.use_tools:
            if grammar is not None and choice in (None, "auto"):
                raise APIError(400, "response_format or guided_* together with tools needs tool_choice "
                                    "'none', 'required' or a named function", param="response_format")
            grammar = T.call_grammar(self.fmt, tools, choice or "auto", req.parallel_tool_calls is not False, think,
                                     in_thought=text.endswith("Thought:"))
        self.grammar = grammar  # llguidance Lark, or None; the vLLM gateway hands it to vLLM's own llguidance
        self.processors = processor_factory(model, grammar, "tools" if self.use_tools else "response_format")

    def _render(self, model: Model, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str:
        if self.fmt in ("plain", "template"):
            try:
                return model.chat_template.render(messages, True, tools, **self.kwargs)
            except Exception as e:  # a template that rejects these messages: the client's error
                raise APIError(400, f"the chat template rejected these messages: {e}", param="messages") from None
        if self.fmt == "react":
            return T.render_react(messages, tools, model.chat_template.default_system or T.DEFAULT_SYSTEM)
        return T.render_hermes(messages, tools, self.arch.tool_system or T.DEFAULT_SYSTEM)

    def parser(self) -> T.HermesStreamParser | T.ReactStreamParser | None:
        if not self.use_tools:
            return None
        return T.stream_parser(self.fmt)

    def reasoning_parser(self) -> R.ReasoningParser | None:
        return R.ReasoningParser(self.in_think) if self.reasoning else None


def _logprob_entry(serving: Serving, out: Any) -> dict[str, Any]:
    token, data = serving.token_text(out.token_id)
    tops = []
    for tid, lp in out.top_logprobs or []:
        t, b = serving.token_text(tid)
        tops.append({"token": t, "logprob": lp, "bytes": b})
    return {"token": token, "logprob": out.logprob, "bytes": data, "top_logprobs": tops}


def _prepare(serving: Serving, req: ChatCompletionRequest) -> tuple[ChatPrompt, list, int]:
    serving.check_model(req.model)
    serving.check_n(req.n)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
    prompt = ChatPrompt(serving, req)
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens = serving.max_new_tokens(requested, len(prompt.ids), "messages")
    params = serving.sampling_params(req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None,
                                     prompt.stop)
    serving.check_capacity(req.n)
    return prompt, serving.make_sequences(prompt.ids, params, req.n, prompt.processors), len(prompt.ids)


async def chat_completion(serving: Serving, req: ChatCompletionRequest, request: Any) -> dict[str, Any]:
    arrival = time.perf_counter()
    prompt, seqs, n_prompt = _prepare(serving, req)
    serving.metrics.prompt_tokens.inc(n_prompt)
    texts = [[] for _ in seqs]
    lps: list[list[dict[str, Any]]] = [[] for _ in seqs]
    reasons: list[str | None] = [None] * len(seqs)
    async for i, out in serving.outputs(seqs, serving.submit(seqs), arrival, request):
        texts[i].append(out.text)
        if out.token_id >= 0 and req.logprobs:
            lps[i].append(_logprob_entry(serving, out))
        if out.finish_reason:
            reasons[i] = out.finish_reason
    choices = []
    for i in range(len(seqs)):
        text = "".join(texts[i])
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if prompt.reasoning:
            message["reasoning_content"], text = R.split_reasoning(text, prompt.in_think)
            message["content"] = text
        reason = reasons[i] or "stop"
        parser = prompt.parser()
        if parser is not None:
            content, calls = T.parse_tool_calls(prompt.fmt, text)
            message["content"] = content
            if calls:
                message["tool_calls"] = [c.to_openai() for c in calls]
                reason = "tool_calls"
        choices.append({"index": i, "message": message,
                        "logprobs": {"content": lps[i]} if req.logprobs else None, "finish_reason": reason})
    n_out = sum(len(s.output_ids) for s in seqs)
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()),
            "model": serving.config.model_name, "choices": choices, "usage": usage(n_prompt, n_out),
            "system_fingerprint": None}


def chat_stream_setup(serving: Serving, req: ChatCompletionRequest) -> AsyncIterator[str]:
    """Validate now (errors become HTTP statuses), then stream."""
    arrival = time.perf_counter()
    prompt, seqs, n_prompt = _prepare(serving, req)
    serving.metrics.prompt_tokens.inc(n_prompt)
    queue = serving.submit(seqs)
    return _chat_stream(serving, req, prompt, seqs, queue, n_prompt, arrival)


async def _chat_stream(serving: Serving, req: ChatCompletionRequest, prompt: ChatPrompt, seqs: list,
                       queue: Any, n_prompt: int, arrival: float) -> AsyncIterator[str]:
    with_usage = bool(req.stream_options and req.stream_options.include_usage)
    head = {"id": new_id("chatcmpl"), "object": "chat.completion.chunk", "created": int(time.time()),
            "model": serving.config.model_name, "system_fingerprint": None}
    fmt = ChunkFormat(head, with_usage)

    def chunk(i: int, delta: dict[str, Any], finish: str | None = None, logprobs: list | None = None) -> str:
        return fmt({"index": i, "delta": delta, "logprobs": {"content": logprobs} if logprobs is not None else None,
                    "finish_reason": finish})

    parsers = [prompt.parser() for _ in seqs]
    thinkers = [prompt.reasoning_parser() for _ in seqs]
    for i in range(len(seqs)):
        yield chunk(i, {"role": "assistant", "content": ""})
    pending_lp: list[list[dict[str, Any]]] = [[] for _ in seqs]
    try:
        async for i, out in serving.outputs(seqs, queue, arrival):
            if out.token_id >= 0 and req.logprobs:
                pending_lp[i].append(_logprob_entry(serving, out))
            parser, thinker = parsers[i], thinkers[i]
            pieces = [{"content": out.text}] if out.text else []
            if thinker is not None:  # reasoning goes out as is; only the content reaches the tool parser
                pieces = thinker.feed(out.text) + (thinker.finish() if out.finish_reason else [])
            deltas = []
            for d in pieces:
                if "content" in d and parser is not None:
                    deltas += parser.feed(d["content"])
                else:
                    deltas.append(d)
            if out.finish_reason and parser is not None:
                deltas += parser.finish()
            for d in deltas:
                lp = pending_lp[i] if req.logprobs else None
                yield chunk(i, d, None, lp)
                pending_lp[i] = []
            if out.finish_reason:
                reason = "tool_calls" if parser is not None and parser.has_calls else out.finish_reason
                reason = reason if reason in ("stop", "length", "tool_calls") else "stop"
                yield chunk(i, {}, reason, (pending_lp[i] or None) if req.logprobs else None)
    except APIError as e:
        yield sse(e.body())
    if with_usage:
        n_out = sum(len(s.output_ids) for s in seqs)
        yield sse({**head, "choices": [], "usage": usage(n_prompt, n_out)})
    yield sse("[DONE]")
