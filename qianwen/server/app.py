"""The FastAPI application: OpenAI routes, health, metrics, the chat page, and the protections
(API keys, body size, queue length, OpenAI-shaped errors for every failure)."""

from __future__ import annotations

import contextlib
import hmac
import time
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.async_engine import AsyncEngine
from ..engine.llm_engine import EngineConfig, LLMEngine
from .chat_route import chat_completion, chat_stream_setup
from .completion_route import completion, completion_stream_setup
from .metrics import Metrics
from .schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
)
from .serving import APIError, ServerConfig, Serving

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 500, 503)}
PROTECTED = ("/v1", "/tokenize", "/detokenize", "/tokenizer_info")  # routes that need a key when keys are set
WEB_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
             ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"}


def _error(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errs = exc.errors()
    if not errs:
        return "invalid request", None
    e = errs[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    if e.get("type") == "json_invalid":
        return "We could not parse the JSON body of your request: " + str(e.get("msg", "")), None
    param = ".".join(loc) or None
    return (f"{param}: {e.get('msg', 'invalid value')}" if param else str(e.get("msg", "invalid request"))), param


class BodyLimit:
    """ASGI middleware: 413 (OpenAI error shape) for request bodies over `limit` bytes, declared or not."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = APIError(413, f"The request body is larger than this server's limit of {self.limit} bytes.",
                           code="request_too_large")
        length = next((v for k, v in scope.get("headers", []) if k == b"content-length"), None)
        if length is not None:  # declared: checked up front (the HTTP layer holds the client to it)
            if not length.isdigit() or int(length) > self.limit:
                return await _error(too_big)(scope, receive, send)
            return await self.app(scope, receive, send)
        # undeclared (chunked): read it here, up to the limit, then hand it on
        body, more = b"", True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":
                return
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > self.limit:
                return await _error(too_big)(scope, receive, send)
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def create_app(model: Any, engine_config: EngineConfig | None = None,
               config: ServerConfig | None = None) -> FastAPI:
    config = config or ServerConfig(model_name=model.name)
    engine = LLMEngine(model, engine_config)
    metrics = Metrics(lambda: engine.num_waiting, lambda: engine.num_running,
                      lambda: engine.cache.used, lambda: engine.cache.max_tokens, engine.prefix_cache_stats)
    async_engine = AsyncEngine(engine)
    serving = Serving(model, async_engine, config, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async_engine.start()
        yield
        async_engine.shutdown()

    app = FastAPI(title="Qianwen", version=_version(), lifespan=lifespan,
                  description="OpenAI-compatible API for Qwen-family models, with continuous batching.")
    app.state.serving = serving
    app.state.engine = async_engine

    protect(app, config, metrics)

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=ERRORS,
              summary="Chat completion (set stream=true for server-sent events)")
    async def chat(req: ChatCompletionRequest, request: Request) -> Any:
        if req.stream:
            return StreamingResponse(chat_stream_setup(serving, req), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await chat_completion(serving, req, request)

    @app.post("/v1/completions", response_model=Completion, responses=ERRORS,
              summary="Text completion (set stream=true for server-sent events)")
    async def complete(req: CompletionRequest, request: Request) -> Any:
        if req.stream:
            return StreamingResponse(completion_stream_setup(serving, req), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await completion(serving, req, request)

    @app.get("/v1/models", response_model=ModelList, responses=ERRORS, summary="The served model")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": serving.created,
                                            "owned_by": "qianwen", "max_model_len": serving.context_length}]}

    # vLLM's tokenizer routes: lm-evaluation-harness's local-completions finds and uses them, so it scores
    # with the served model's own tokenizer (text is encoded as plain text, as /v1/completions does)
    @app.post("/tokenize", response_model=TokenizeResponse, responses=ERRORS, summary="Text to token ids")
    async def tokenize(req: TokenizeRequest) -> dict[str, Any]:
        if req.model is not None:
            serving.check_model(req.model)
        tok = model.tokenizer
        ids = tok.encode(req.prompt)
        if req.add_special_tokens and tok.add_bos and tok.bos_id is not None:
            ids = [tok.bos_id, *ids]
        return {"count": len(ids), "max_model_len": serving.context_length, "tokens": ids}

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS, summary="Token ids to text")
    async def detokenize(req: DetokenizeRequest) -> dict[str, Any]:
        if req.model is not None:
            serving.check_model(req.model)
        vocab = model.tokenizer.vocab_size
        if any(t < 0 or t >= vocab for t in req.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens")
        return {"prompt": model.tokenizer.decode(req.tokens)}

    @app.get("/tokenizer_info", response_model=TokenizerInfo, summary="The tokenizer's special tokens")
    async def tokenizer_info() -> dict[str, Any]:
        tok = model.tokenizer
        name = lambda i: None if i is None else tok.id_to_token_bytes(i).decode("utf-8", errors="replace")
        return {"tokenizer_class": type(tok).__name__, "eos_token": name(tok.eos_id), "bos_token": name(tok.bos_id),
                "pad_token": name(tok.pad_id), "add_bos_token": tok.add_bos, "model_max_length": serving.context_length}

    @app.get("/health", summary="200 while the engine runs")
    async def health() -> JSONResponse:
        ok = async_engine.alive and async_engine.error is None
        return JSONResponse({"status": "ok" if ok else "error", "model": config.model_name,
                             "running": engine.num_running, "waiting": engine.num_waiting},
                            status_code=200 if ok else 503)

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    web_routes(app, config, serving.context_length, model.sampling_defaults)
    return app


def protect(app: FastAPI, config: ServerConfig, metrics: Metrics) -> None:
    """What every engine's app shares: OpenAI-shaped errors for every failure, API keys on /v1, the
    request counter, CORS and the body limit."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return _error(APIError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(APIError(exc.status_code, str(exc.detail), type=kind))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        return _error(APIError(500, f"internal error: {type(exc).__name__}", type="server_error"))

    @app.middleware("http")
    async def auth_and_count(request: Request, call_next: Any) -> Response:
        path = request.url.path
        if path.startswith(PROTECTED) and config.api_keys and not _authorized(request, config.api_keys):
            response: Response = _error(APIError(
                401, "Incorrect API key provided. Pass it as 'Authorization: Bearer <key>'.",
                code="invalid_api_key"))
        else:
            response = await call_next(request)
        if path.startswith("/v1"):
            metrics.requests.inc(route=path, status=str(response.status_code))
        return response

    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)


def web_routes(app: FastAPI, config: ServerConfig, context_length: int, sampling_defaults: dict[str, Any]) -> None:
    """The chat page: its static files and /web-config.json."""

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return _web_file("index.html")

    @app.get("/web/{name}", include_in_schema=False)
    async def web(name: str) -> Response:
        return _web_file(name)

    @app.get("/web-config.json", include_in_schema=False)
    async def web_config() -> JSONResponse:
        return JSONResponse({"model": config.model_name, "auth": bool(config.api_keys),
                             "max_tokens": context_length,
                             "defaults": {k: v for k, v in sampling_defaults.items()
                                          if isinstance(v, (int, float))}, "time": time.time()})


def _authorized(request: Request, keys: list[str]) -> bool:
    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
    return any(hmac.compare_digest(token.encode(), k.encode()) for k in keys)


def _web_file(name: str) -> Response:
    suffix = "." + name.rsplit(".", 1)[-1] if "." in name else ""
    if "/" in name or "\\" in name or name.startswith(".") or suffix not in WEB_TYPES:
        raise APIError(404, f"no such file: {name}", type="not_found_error")
    f = resources.files("qianwen.server") / "web" / name
    if not f.is_file():
        raise APIError(404, f"no such file: {name}", type="not_found_error")
    return Response(f.read_bytes(), media_type=WEB_TYPES[suffix])


def _version() -> str:
    from .. import __version__

    return __version__


__all__ = ["create_app", "ServerConfig"]
