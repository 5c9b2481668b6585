"""The FastAPI application: OpenAI routes, health, metrics, the chat page, and the protections
(API keys, body size, queue length, OpenAI-shaped errors for every failure)."""

from __future__ import annotations

import contextlib
import hmac
import time
from collections.abc import AsyncIterator
from importlib import resources
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.async_engine import AsyncEngine, usable_cores
from ..engine.llm_engine import EngineConfig, LLMEngine
from . import chat_route, completion_route, info_routes
from .metrics import Metrics
from .serving import ERRORS, APIError, ServerConfig, Serving

if TYPE_CHECKING:
    from ..api import Model  # the loaded model (type only: no upward import at run time)

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


class AuthAndCount:
    """ASGI middleware: API keys on the PROTECTED routes (401 in OpenAI's shape), and the request counter
    by route and status. Plain ASGI, so a streamed body goes straight through (Starlette's
    `@app.middleware("http")` would pass every chunk through a memory stream and another task)."""

    def __init__(self, app: Any, config: ServerConfig, metrics: Metrics) -> None:
        self.app, self.config, self.metrics = app, config, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path: str = scope["path"]
        counted = path.startswith("/v1")

        async def counting_send(message: dict) -> None:
            if counted and message["type"] == "http.response.start":
                self.metrics.requests.inc(route=path, status=str(message["status"]))
            await send(message)

        keys = self.config.api_keys
        if path.startswith(PROTECTED) and keys and not _authorized(Headers(scope=scope), keys):
            denied = _error(APIError(401, "Incorrect API key provided. Pass it as 'Authorization: Bearer <key>'.",
                                     code="invalid_api_key"))
            return await denied(scope, receive, counting_send)
        await self.app(scope, receive, counting_send)


def create_app(model: Model, engine_config: EngineConfig | None = None,
               config: ServerConfig | None = None) -> FastAPI:
    config = config or ServerConfig(model_name=model.name)
    engine = LLMEngine(model, engine_config)
    metrics = Metrics(lambda: engine.num_waiting, lambda: engine.num_running,
                      lambda: engine.cache.used, lambda: engine.cache.max_tokens, engine.prefix_cache_stats)
    frontend = config.frontend_cores if config.frontend_cores is not None else int(usable_cores() >= 2)
    async_engine = AsyncEngine(engine, frontend_cores=frontend)
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

    for module in (chat_route, completion_route, info_routes):
        app.include_router(module.router)
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

    app.add_middleware(AuthAndCount, config=config, metrics=metrics)
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


def _authorized(headers: Headers, keys: list[str]) -> bool:
    header = headers.get("authorization", "")
    token = header[7:].strip() if header.lower().startswith("bearer ") else headers.get("x-api-key", "")
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


__all__ = ["ERRORS", "create_app", "ServerConfig"]  # ERRORS: for the vLLM gateway's routes
