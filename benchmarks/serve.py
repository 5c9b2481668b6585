"""Serving benchmark: aggregate output tokens/s and p50/p95 time to first token at 1, 4 and 16 concurrent
streaming clients, for `qianwen serve` and (same GGUF, same threads) llama.cpp's server, in one run.

    python benchmarks/serve.py                          # qianwen only, default model
    python benchmarks/serve.py --llama-python /tmp/llamavenv/bin/python   # plus llama-cpp-python[server]
    python benchmarks/serve.py --model HF_FOLDER --engine qianwen --engine vllm --vllm-python PY
        # both engines behind the same `qianwen serve` gateway (docs/deploy.md); vLLM needs a folder

llama.cpp's AMX repack path crashes on some CPUs (docs/cpu-performance.md), so its server is started with
`use_extra_bufts = False`, the stock path. Each client sends chat requests one after another; a run
ends when every client has sent `--rounds` requests. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

LLAMA_LAUNCHER = """
import sys
import llama_cpp.llama_cpp as C
_orig = C.llama_model_default_params
def _params():
    p = _orig()
    p.use_extra_bufts = False  # the AMX repack path crashes here (llama.cpp issue 20824)
    return p
C.llama_model_default_params = _params
from llama_cpp.server.__main__ import main
sys.argv = ["llama_cpp.server"] + sys.argv[1:]
main()
"""

PROMPTS = ["Write a short story about a robot learning to paint.", "Explain how a refrigerator works.",
           "List ten facts about the ocean.", "Describe a walk through a forest in autumn.",
           "What are the benefits of regular exercise?", "Tell me about the history of tea.",
           "How do airplanes stay in the air?", "Write a poem about the moon."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], base: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    f = open(log, "w")
    proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    deadline = time.time() + 1800  # vLLM's start-up takes minutes on a CPU
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{cmd[0]} exited early; see {log}")
        try:
            if httpx.get(base + "/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"server did not start; see {log}")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def one_request(http: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, chunks, usage = None, 0, None
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line.strip() == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                usage = data["usage"]["completion_tokens"]
            for c in data.get("choices", []):
                if (c.get("delta") or {}).get("content"):
                    chunks += 1
                    if ttft is None:
                        ttft = time.perf_counter() - t0
    return (ttft if ttft is not None else time.perf_counter() - t0), (usage if usage is not None else chunks)


async def load(base: str, model: str, clients: int, rounds: int, max_tokens: int) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=base, timeout=600) as http:
        await one_request(http, model, "Hi", 4)  # warm-up

        async def client(k: int) -> list[tuple[float, int]]:
            return [await one_request(http, model, PROMPTS[(k + r) % len(PROMPTS)], max_tokens)
                    for r in range(rounds)]

        t0 = time.perf_counter()
        results = [x for xs in await asyncio.gather(*[client(k) for k in range(clients)]) for x in xs]
        wall = time.perf_counter() - t0
    ttfts = sorted(t for t, _ in results)
    tokens = sum(n for _, n in results)
    return {"requests": len(results), "tokens": tokens, "wall": wall, "tok_s": tokens / wall,
            "ttft_p50": statistics.median(ttfts), "ttft_p95": ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a .gguf file (default: the default model)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--rounds", type=int, default=2, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--dtype", default=None, help="qianwen's dtype (default: by hardware)")
    ap.add_argument("--engine", action="append", choices=["qianwen", "vllm"], default=None,
                    help="qianwen serve's engine (repeatable; default qianwen)")
    ap.add_argument("--vllm-python", default=None, help="the Python with vLLM (default QIANWEN_VLLM_PYTHON)")
    ap.add_argument("--llama-python", default=None,
                    help="a Python with llama-cpp-python[server] installed; omit to skip llama.cpp")
    ap.add_argument("--log-dir", default="/tmp")
    args = ap.parse_args()

    if args.model is None:
        from qianwen.artifacts import DEFAULT_GGUF, fetch

        args.model = str(fetch(DEFAULT_GGUF))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    servers = []
    for engine in args.engine or ["qianwen"]:
        port = free_port()
        cmd = [sys.executable, "-m", "qianwen.cli.main", "serve", "--model", args.model, "--port", str(port),
               "--threads", str(args.threads), "--served-model-name", "bench", "--log-level", "warning",
               "--max-num-seqs", str(max(args.concurrency)), "--max-queue", "1000", "--engine", engine]
        if args.dtype:
            cmd += ["--dtype", args.dtype]
        if engine == "vllm":
            cmd += ["--max-model-len", "2048"] + (["--vllm-python", args.vllm_python] if args.vllm_python else [])
        servers.append(("qianwen serve" + (" --engine vllm" if engine == "vllm" else ""), cmd, port, "bench"))
    if args.llama_python:
        port = free_port()
        servers.append(("llama.cpp server", [args.llama_python, "-c", LLAMA_LAUNCHER, "--model", args.model,
                                             "--port", str(port), "--host", "127.0.0.1", "--n_threads",
                                             str(args.threads), "--n_ctx", "4096", "--model_alias", "bench",
                                             # queue concurrent requests instead of cancelling the running one
                                             "--interrupt_requests", "False"],
                        port, "bench"))
    rows = []
    for label, cmd, port, model in servers:
        base = f"http://127.0.0.1:{port}"
        log = Path(args.log_dir) / f"bench-{port}.log"
        print(f"starting {label} ...", file=sys.stderr)
        proc = start(cmd, base, env, log)
        try:
            for c in args.concurrency:
                r = asyncio.run(load(base, model, c, args.rounds, args.max_tokens))
                print(f"  {label} c={c}: {r['tok_s']:.1f} tok/s, TTFT p50 {r['ttft_p50']:.2f}s "
                      f"p95 {r['ttft_p95']:.2f}s", file=sys.stderr)
                rows.append((label, c, r))
        finally:
            stop(proc)
    print(f"\nModel: {Path(args.model).name}, {args.threads} threads, {args.max_tokens} max tokens per answer, "
          f"{args.rounds} requests per client, greedy.\n")
    print("| server | clients | requests | output tokens | aggregate tok/s | TTFT p50 (s) | TTFT p95 (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, c, r in rows:
        print(f"| {label} | {c} | {r['requests']} | {r['tokens']} | {r['tok_s']:.1f} | {r['ttft_p50']:.2f} | "
              f"{r['ttft_p95']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
