"""`qianwen serve`: the OpenAI-compatible HTTP server with continuous batching and a web chat page."""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import QianwenError
from .common import add_model_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API (and a chat page at /)")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", action="append", default=None,
                   help="accepted API key (repeatable; also QIANWEN_API_KEY, comma-separated). None: no auth")
    p.add_argument("--served-model-name", default=None, help="the model id clients use (default: the model name)")
    g = p.add_argument_group("engine")
    g.add_argument("--max-num-seqs", type=int, default=16, help="sequences decoded together (default 16)")
    g.add_argument("--kv-cache-mb", type=float, default=2048, help="KV cache budget in MiB (default 2048)")
    g.add_argument("--max-prefill-tokens", type=int, default=2048, help="prompt tokens prefilled per step")
    g.add_argument("--no-batch-invariance", action="store_true",
                   help="let batch size change kernel paths (slightly faster; greedy output may depend on load)")
    g = p.add_argument_group("limits")
    g.add_argument("--max-queue", type=int, default=64, help="waiting sequences before 429 (default 64)")
    g.add_argument("--max-tokens-limit", type=int, default=None, help="largest max_tokens a request may ask")
    g.add_argument("--max-n", type=int, default=8, help="largest n (choices per request)")
    g.add_argument("--max-body-mb", type=float, default=4, help="largest request body in MiB (default 4)")
    g.add_argument("--cors-origin", action="append", default=None,
                   help="allow browser requests from this origin (repeatable; default: CORS off)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--log-level", default="info", help="uvicorn log level")
    p.set_defaults(func=run)


def api_keys(args: argparse.Namespace) -> list[str]:
    keys = list(args.api_key or [])
    keys += [k.strip() for k in os.environ.get("QIANWEN_API_KEY", "").split(",") if k.strip()]
    return keys


def served_name(model_name: str) -> str:
    """The model id clients see: a path's last part, without a .gguf suffix."""
    from pathlib import Path

    name = Path(model_name.rstrip("/")).name or model_name
    return name[:-5] if name.endswith(".gguf") else name


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from ..engine import EngineConfig
    from ..server import ServerConfig, create_app
    from .common import load_model

    for name in ("max_num_seqs", "port", "max_queue", "max_n"):
        if getattr(args, name) < (0 if name == "port" else 1):
            raise QianwenError(f"--{name.replace('_', '-')} must be positive")
    if args.threads:  # the flag wins over $QIANWEN_THREADS: loading applies the variable
        os.environ["QIANWEN_THREADS"] = str(args.threads)
    model = load_model(args)
    keys = api_keys(args)
    name = args.served_model_name or served_name(model.name)
    config = ServerConfig(model_name=name, api_keys=keys, max_body_bytes=int(args.max_body_mb * 2**20),
                          max_tokens_limit=args.max_tokens_limit, max_n=args.max_n, max_queue=args.max_queue,
                          cors_origins=args.cors_origin or [])
    engine_config = EngineConfig(max_num_seqs=args.max_num_seqs, max_prefill_tokens=args.max_prefill_tokens,
                                 kv_cache_mb=args.kv_cache_mb, batch_invariant=not args.no_batch_invariance)
    app = create_app(model, engine_config, config)
    cache = app.state.engine.engine.cache
    print(f"serving {name} ({model.dtype}, KV cache {cache.max_tokens} tokens) on http://{args.host}:{args.port}"
          f"  chat page: http://{args.host}:{args.port}/", file=sys.stderr)
    if not keys:
        print("no API keys configured: the API is open to anyone who can reach this address", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0
