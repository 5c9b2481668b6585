"""The routes around the completions: the model list, vLLM's tokenizer routes, health and metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, PlainTextResponse

from .schemas import (
    DetokenizeRequest,
    DetokenizeResponse,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
)
from .serving import ERRORS, APIError, Serving, get_serving

router = APIRouter()


@router.get("/v1/models", response_model=ModelList, responses=ERRORS, summary="The served model")
async def models(serving: Serving = Depends(get_serving)) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": serving.config.model_name, "object": "model", "created": serving.created,
                                        "owned_by": "qianwen", "max_model_len": serving.context_length}]}


# vLLM's tokenizer routes: lm-evaluation-harness's local-completions finds and uses them, so it scores
# with the served model's own tokenizer (text is encoded as plain text, as /v1/completions does)
@router.post("/tokenize", response_model=TokenizeResponse, responses=ERRORS, summary="Text to token ids")
async def tokenize(req: TokenizeRequest, serving: Serving = Depends(get_serving)) -> dict[str, Any]:
    if req.model is not None:
        serving.check_model(req.model)
    tok = serving.model.tokenizer
    ids = tok.encode(req.prompt)
    if req.add_special_tokens and tok.add_bos and tok.bos_id is not None:
        ids = [tok.bos_id, *ids]
    return {"count": len(ids), "max_model_len": serving.context_length, "tokens": ids}


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS, summary="Token ids to text")
async def detokenize(req: DetokenizeRequest, serving: Serving = Depends(get_serving)) -> dict[str, Any]:
    if req.model is not None:
        serving.check_model(req.model)
    tok = serving.model.tokenizer
    if any(t < 0 or t >= tok.vocab_size for t in req.tokens):
        raise APIError(400, f"token ids must be in [0, {tok.vocab_size})", param="tokens")
    return {"prompt": tok.decode(req.tokens)}


@router.get("/tokenizer_info", response_model=TokenizerInfo, summary="The tokenizer's special tokens")
async def tokenizer_info(serving: Serving = Depends(get_serving)) -> dict[str, Any]:
    tok = serving.model.tokenizer

    def name(i: int | None) -> str | None:
        return None if i is None else tok.id_to_token_bytes(i).decode("utf-8", errors="replace")

    return {"tokenizer_class": type(tok).__name__, "eos_token": name(tok.eos_id), "bos_token": name(tok.bos_id),
            "pad_token": name(tok.pad_id), "add_bos_token": tok.add_bos, "model_max_length": serving.context_length}


@router.get("/health", summary="200 while the engine runs")
async def health(serving: Serving = Depends(get_serving)) -> JSONResponse:
    engine = serving.engine
    ok = engine.alive and engine.error is None
    return JSONResponse({"status": "ok" if ok else "error", "model": serving.config.model_name,
                         "running": engine.engine.num_running, "waiting": engine.engine.num_waiting},
                        status_code=200 if ok else 503)


@router.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
async def prometheus(serving: Serving = Depends(get_serving)) -> PlainTextResponse:
    return PlainTextResponse(serving.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
