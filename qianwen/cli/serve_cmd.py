"""`qianwen serve`: the OpenAI-compatible HTTP server with continuous batching and a web chat page."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from ..errors import QianwenError
from .common import add_model_args

if TYPE_CHECKING:
    from ..server import ServerConfig


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
    g.add_argument("--kv-cache-dtype", choices=["auto", "bfloat16", "float32", "int8"], default="auto",
                   help="KV cache elements: auto (the model's dtype), bfloat16, float32, or int8 (about half "
                        "of bf16's bytes per token, so twice the tokens in --kv-cache-mb; docs/server.md)")
    g.add_argument("--max-prefill-tokens", type=int, default=128,
                   help="prompt tokens prefilled per step; longer prompts run in chunks between decode steps "
                        "(default 128: shorter waits for the first token; more: more throughput)")
    g.add_argument("--no-prefix-cache", action="store_true",
                   help="do not reuse the KV cache of prompt prefixes earlier requests computed")
    g.add_argument("--no-batch-invariance", action="store_true",
                   help="let batch size change kernel paths (slightly faster; greedy output may depend on load)")
    g = p.add_argument_group("limits")
    g.add_argument("--max-queue", type=int, default=64, help="waiting sequences before 429 (default 64)")
    g.add_argument("--max-tokens-limit", type=int, default=None, help="largest max_tokens a request may ask")
    g.add_argument("--max-n", type=int, default=8, help="largest n (choices per request)")
    g.add_argument("--max-body-mb", type=float, default=4, help="largest request body in MiB (default 4)")
    g.add_argument("--cors-origin", action="append", default=None,
                   help="allow browser requests from this origin (repeatable; default: CORS off)")
    g = p.add_argument_group("vLLM engine (--engine vllm; docs/deploy.md)")
    g.add_argument("--engine", choices=["qianwen", "vllm"], default="qianwen",
                   help="qianwen (default): this package's engine; vllm: vLLM behind the same gateway")
    g.add_argument("--vllm-python", default=None,
                   help="the Python that has vLLM (default: QIANWEN_VLLM_PYTHON, else this Python)")
    g.add_argument("--tensor-parallel-size", type=int, default=None, help="GPUs per model replica (vLLM)")
    g.add_argument("--pipeline-parallel-size", type=int, default=None, help="pipeline stages (vLLM)")
    g.add_argument("--max-model-len", type=int, default=None, help="context length (vLLM; default the model's)")
    g.add_argument("--gpu-memory-utilization", type=float, default=None, help="share of GPU memory (vLLM)")
    g.add_argument("--vllm-args", default="",
                   help="any other vLLM server flags, as one string: --vllm-args='--enforce-eager --seed 1'")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--frontend-cores", type=int, default=None,
                   help="cores the CPU kernels leave to HTTP and the event loop while at most 8 sequences run "
                        "(default: 1 with two or more cores; 0: the kernels take every core)")
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


def server_config(args: argparse.Namespace, name: str) -> ServerConfig:
    from ..server import ServerConfig

    return ServerConfig(model_name=name, api_keys=api_keys(args), max_body_bytes=int(args.max_body_mb * 2**20),
                        max_tokens_limit=args.max_tokens_limit, max_n=args.max_n, max_queue=args.max_queue,
                        cors_origins=args.cors_origin or [], frontend_cores=getattr(args, "frontend_cores", None))


def run(args: argparse.Namespace) -> int:
    for name in ("max_num_seqs", "port", "max_queue", "max_n"):
        if getattr(args, name) < (0 if name == "port" else 1):
            raise QianwenError(f"--{name.replace('_', '-')} must be positive")
    if args.frontend_cores is not None and args.frontend_cores < 0:
        raise QianwenError("--frontend-cores must be 0 or more")
    if args.engine == "vllm":
        if args.kv_cache_dtype != "auto":
            raise QianwenError("--kv-cache-dtype is for the qianwen engine; give vLLM its own with --vllm-args")
        return run_vllm(args)
    import uvicorn

    from ..engine import EngineConfig
    from ..server import create_app
    from .common import freeze_heap, load_model

    if args.threads:  # the flag wins over $QIANWEN_THREADS: loading applies the variable
        os.environ["QIANWEN_THREADS"] = str(args.threads)
    model = load_model(args)
    name = args.served_model_name or served_name(model.name)
    config = server_config(args, name)
    engine_config = EngineConfig(max_num_seqs=args.max_num_seqs, max_prefill_tokens=args.max_prefill_tokens,
                                 kv_cache_mb=args.kv_cache_mb, kv_cache_dtype=args.kv_cache_dtype,
                                 batch_invariant=not args.no_batch_invariance, prefix_caching=not args.no_prefix_cache)
    app = create_app(model, engine_config, config)
    freeze_heap()  # the app's routes and schemas too
    cache = app.state.engine.engine.cache
    print(f"serving {name} ({model.dtype}, KV cache {cache.max_tokens} tokens of {cache.dtype}) on http://{args.host}:{args.port}"
          f"  chat page: http://{args.host}:{args.port}/", file=sys.stderr)
    if not config.api_keys:
        print("no API keys configured: the API is open to anyone who can reach this address", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0


def run_vllm(args: argparse.Namespace) -> int:
    """vLLM's OpenAI server as a subprocess behind the same gateway (qianwen/server/vllm_gateway.py)."""
    import shlex

    try:
        from ..server.vllm_gateway import PromptModel, VllmOptions, serve_vllm, vllm_python
    except ModuleNotFoundError as e:
        raise QianwenError(f"--engine vllm needs {e.name}: pip install 'qianwen[vllm]'") from None

    python = vllm_python(args.vllm_python)  # first: without vLLM, one line and exit 1
    model = PromptModel.load(args.model)
    options = VllmOptions(python=python, dtype=args.dtype, tensor_parallel_size=args.tensor_parallel_size,
                          pipeline_parallel_size=args.pipeline_parallel_size, max_model_len=args.max_model_len,
                          max_num_seqs=args.max_num_seqs, gpu_memory_utilization=args.gpu_memory_utilization,
                          kv_cache_gib=max(1, round(args.kv_cache_mb / 1024)), extra_args=shlex.split(args.vllm_args))
    config = server_config(args, args.served_model_name or served_name(model.name))
    return serve_vllm(model, config, options, args.host, args.port, args.log_level)
