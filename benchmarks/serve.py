"""Serving benchmark: aggregate output tokens/s and p50/p95 time to first token at 1, 4 and 16 concurrent
streaming clients, a 10-turn chat's time to first token per turn, and the raw decode step of the same model,
for `qianwen serve` and (same GGUF, same threads) llama.cpp's server, in one run.

    python benchmarks/serve.py                          # qianwen only, default model
    python benchmarks/serve.py --llama-python /tmp/llamavenv/bin/python   # plus llama-cpp-python[server]
    python benchmarks/serve.py --model HF_FOLDER --engine qianwen --engine vllm --vllm-python PY
        # both engines behind the same `qianwen serve` gateway (docs/deploy.md); vLLM needs a folder
    python benchmarks/serve.py --model default --model HF_FOLDER --engine qianwen --engine vllm --vllm-python PY
        # qianwen on the GGUF and on the folder, vLLM on the folder (it skips .gguf models)
    python benchmarks/serve.py ... --sampled --chat-tokens 0   # requests sampled with Qwen's default options

llama.cpp's AMX repack path crashes on some CPUs (docs/cpu-performance.md), so its server is started with
`use_extra_bufts = False`, the stock path. Each client sends chat requests one after another; a run
ends when every client has sent `--rounds` requests. The raw step is qianwen's decode forward of one
sequence (the model's own static cache, greedy argmax, no server, no sampling options), in a subprocess with
the same threads; "1 client / raw" sets the median rate of `--single-rounds` requests of one client (after
their first token) against the median of as many runs of the raw step, the two taking turns (the goal:
>= 0.8). The machine's speed wanders from minute to minute; taking turns meets it alike on both sides
(until 2026-12-01 the raw step ran once, before the servers started, and its best run was reported). The chat
scenario: one client holds a 10-turn conversation, each turn sending the whole history (the previous
answers included) and a new question, answers greedy and exactly `--chat-tokens` long (ignore_eos); it
reports the time to the first token of each turn (the goal: turn 10 <= 1.2x turn 1, which needs the
engine to reuse the cached prefix). One chat's turns swing with the machine's load by as much as the goal's
margin, so `--chat-runs N` holds the chat on N servers, each started afresh and warmed by the same load phases,
and reports each turn's median (and each chat's own ratio). Prints Markdown tables.

The clients run on the server's machine and share its cores, so they are light (`Client`: raw HTTP/1.1 on
one connection each, the chunked SSE body read off the socket); every server is measured through the same
client. Until 2026-11-30 they streamed through httpx, which took about twice the CPU per token beside the
server; `--httpx` measures that way, for comparison with older figures.
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
from collections.abc import AsyncIterator
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

QUESTIONS = ["Tell me about the history of tea.", "Which countries grow the most of it?", "How is green tea made?",
             "And black tea?", "What is a tea ceremony?", "Which teas have the most caffeine?",
             "How should I store tea at home?", "What water temperature is best?", "Can tea go bad?",
             "Summarise what we discussed."]

RAW_STEP = """
import sys, time, torch, qianwen
from qianwen.fast import StaticKVCache
path, dtype, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
m = qianwen.load(path, dtype=None if dtype == "auto" else dtype)
net = m.net
ids = m.tokenizer.encode("Write a short story about a robot learning to paint.")
print("ready", flush=True)
with torch.inference_mode():
    while sys.stdin.readline():  # one run of n tokens per line read; its tokens/s on a line
        cache = StaticKVCache.for_model(net, 1, len(ids) + n + 8)
        tok = int(net(torch.tensor([ids]), cache=cache)[0, -1].argmax())
        t0 = time.perf_counter()
        for _ in range(n):
            tok = int(net(torch.tensor([[tok]]), cache=cache)[0, -1].argmax())
        print(n / (time.perf_counter() - t0), flush=True)
"""

SAMPLED = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}  # --sampled: Qwen's defaults

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


class Client:
    """A minimal HTTP/1.1 client for the streamed chat requests: one keep-alive connection, the chunked
    body read straight off the socket, each SSE line parsed with json.loads. On the 2-core dev VM it took
    0.25 ms of CPU per streamed token at 1 client (httpx: 0.55), 0.11 at 4 (httpx: 0.25)."""

    def __init__(self, base: str) -> None:
        host, port = base.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)
        self.conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def close(self) -> None:
        if self.conn is not None:
            self.conn[1].close()
            self.conn = None

    async def lines(self, path: str, body: dict) -> AsyncIterator[str]:
        """POST `body` as JSON; yields the response's lines (raises for a status other than 200)."""
        if self.conn is None:
            self.conn = await asyncio.open_connection(self.host, self.port)
        reader, writer = self.conn
        data = json.dumps(body).encode()
        writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        status = (await reader.readline()).split(b" ", 2)[1]
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            k, _, v = line.decode().partition(":")
            headers[k.strip().lower()] = v.strip()
        if status != b"200" or headers.get("transfer-encoding") != "chunked":
            text = (await reader.readexactly(int(headers.get("content-length", 0)))).decode(errors="replace")
            await self.close()
            raise RuntimeError(f"HTTP {status.decode()}: {text}")
        buf, text, ended = b"", b"", False  # chunked framing not yet read; body text after the last newline
        while not ended:
            more = await reader.read(1 << 16)
            if not more:
                raise RuntimeError("the server closed the connection mid-stream")
            buf += more
            while (eol := buf.find(b"\r\n")) >= 0:  # every whole chunk in the buffer
                size = int(buf[:eol].split(b";")[0], 16)
                end = eol + 2 + size + 2  # size line, data, CRLF
                if len(buf) < end:
                    break
                text, buf = text + buf[eol + 2:end - 2], buf[end:]
                if size == 0:  # the last chunk
                    ended = True
                    break
            *done, text = text.split(b"\n")
            for line in done:
                yield line.decode()
        if headers.get("connection") == "close":
            await self.close()


async def stream_lines(http: Client | httpx.AsyncClient, body: dict) -> AsyncIterator[str]:
    """The lines of one streamed chat completion, through either client."""
    if isinstance(http, Client):
        async for line in http.lines("/v1/chat/completions", body):
            yield line
        return
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            yield line


def client(base: str, use_httpx: bool) -> Client | httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base, timeout=600) if use_httpx else Client(base)


async def close(http: Client | httpx.AsyncClient) -> None:
    await (http.aclose() if isinstance(http, httpx.AsyncClient) else http.close())


async def one_request(http: Client | httpx.AsyncClient, model: str, prompt: str, max_tokens: int,
                      sampled: bool = False) -> tuple[float, int, float]:
    """(time to first token, output tokens, seconds from the first token to the end). Greedy, or `sampled`:
    SAMPLED's options (Qwen's generation config, sent to every engine alike), each answer exactly `max_tokens`
    long."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}}
    body.update({**SAMPLED, "ignore_eos": True} if sampled else {"temperature": 0})
    t0 = time.perf_counter()
    ttft, chunks, usage = None, 0, None
    async for line in stream_lines(http, body):
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
    end = time.perf_counter() - t0
    ttft = ttft if ttft is not None else end
    return ttft, (usage if usage is not None else chunks), end - ttft


async def load(base: str, model: str, clients: int, rounds: int, max_tokens: int, use_httpx: bool = False,
               sampled: bool = False) -> dict[str, float]:
    # one connection per simulated client (httpx: one pool for all, as before)
    shared = client(base, True) if use_httpx else None
    conns = [shared or client(base, False) for _ in range(clients)]
    try:
        await one_request(conns[0], model, "Hi", 4)  # warm-up

        async def run(k: int) -> list[tuple[float, int, float]]:
            return [await one_request(conns[k], model, PROMPTS[(k + r) % len(PROMPTS)], max_tokens, sampled)
                    for r in range(rounds)]

        t0 = time.perf_counter()
        results = [x for xs in await asyncio.gather(*[run(k) for k in range(clients)]) for x in xs]
        wall = time.perf_counter() - t0
    finally:
        for c in {id(c): c for c in conns}.values():
            await close(c)
    ttfts = sorted(t for t, _, _ in results)
    tokens = sum(n for _, n, _ in results)
    return {"requests": len(results), "tokens": tokens, "wall": wall, "tok_s": tokens / wall,
            "ttft_p50": statistics.median(ttfts), "ttft_p95": ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))]}


async def first_token(http: Client | httpx.AsyncClient, model: str, messages: list[dict[str, str]],
                      max_tokens: int) -> tuple[float, str]:
    """(seconds to the first content token, the whole answer) of one streamed greedy chat turn."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    t0 = time.perf_counter()
    ttft, parts = None, []
    async for line in stream_lines(http, body):
        if not line.startswith("data: ") or line.strip() == "data: [DONE]":
            continue
        for c in json.loads(line[6:]).get("choices", []):
            piece = (c.get("delta") or {}).get("content")
            if piece:
                parts.append(piece)
                if ttft is None:
                    ttft = time.perf_counter() - t0
    return (ttft if ttft is not None else time.perf_counter() - t0), "".join(parts)


async def chat_turns(base: str, model: str, max_tokens: int, use_httpx: bool = False) -> list[float]:
    """Time to first token of each turn of one 10-turn conversation (each turn resends the history)."""
    http = client(base, use_httpx)
    try:
        await first_token(http, model, [{"role": "user", "content": "Hi"}], 4)  # warm-up
        messages: list[dict[str, str]] = [{"role": "system", "content": "You are a helpful assistant."}]
        ttfts = []
        for question in QUESTIONS:
            messages.append({"role": "user", "content": question})
            ttft, answer = await first_token(http, model, messages, max_tokens)
            messages.append({"role": "assistant", "content": answer})
            ttfts.append(ttft)
    finally:
        await close(http)
    return ttfts


class RawStep:
    """qianwen's raw decode step on `model`, in a subprocess with the benchmark's threads, run on demand: the
    single client's requests alternate with its runs, so that both meet the machine at the same speed."""

    def __init__(self, model: str, dtype: str | None, tokens: int, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", RAW_STEP, model, dtype or "auto", str(tokens)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise SystemExit(f"the raw step on {model} failed to start")

    def run(self) -> float:
        """One run's tokens/s."""
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit("the raw step failed")
        return float(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


async def single_client(base: str, model: str, raw: RawStep, rounds: int, max_tokens: int, sampled: bool = False
                        ) -> tuple[list[float], list[float]]:
    """`rounds` requests of one client (each one's rate after its first token), each after a run of the raw
    step: (request rates, raw rates)."""
    http = Client(base)
    served, steps = [], []
    try:
        for r in range(rounds):
            steps.append(raw.run())
            _, n, d = await one_request(http, model, PROMPTS[r % len(PROMPTS)], max_tokens, sampled)
            served.append((n - 1) / d)
    finally:
        await http.close()
    return served, steps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=None,
                    help="a .gguf file or a Hugging Face folder; repeatable ('default': the default model)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--rounds", type=int, default=2, help="requests per client")
    ap.add_argument("--single-rounds", type=int, default=8,
                    help="requests of one client, each after a run of the raw step (0: skip)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--chat-tokens", type=int, default=48, help="tokens per answer in the 10-turn chat (0: skip)")
    ap.add_argument("--chat-runs", type=int, default=1,
                    help="chats per server, each on a fresh server after the load phases (medians reported)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--sampled", action="store_true",
                    help="load phases and single client sampled with Qwen's default options (SAMPLED), answers of "
                         "exactly --max-tokens")
    ap.add_argument("--dtype", default=None, help="qianwen's dtype (default: by hardware)")
    ap.add_argument("--engine", action="append", choices=["qianwen", "vllm"], default=None,
                    help="qianwen serve's engine (repeatable; default qianwen); vllm runs on the folders only")
    ap.add_argument("--vllm-python", default=None, help="the Python with vLLM (default QIANWEN_VLLM_PYTHON)")
    ap.add_argument("--llama-python", default=None,
                    help="a Python with llama-cpp-python[server] installed (GGUF models); omit to skip llama.cpp")
    ap.add_argument("--log-dir", default="/tmp")
    ap.add_argument("--httpx", action="store_true",
                    help="stream through httpx (this benchmark's client until 2026-11-30; more CPU beside the server)")
    args = ap.parse_args()

    models = []
    for m in args.model or ["default"]:
        if m == "default":
            from qianwen.artifacts import DEFAULT_GGUF, fetch

            m = str(fetch(DEFAULT_GGUF))
        models.append(m)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "QIANWEN_THREADS": str(args.threads)}
    servers = []  # (label, model path, command, port, engine)
    for path in models:
        for engine in args.engine or ["qianwen"]:
            if engine == "vllm" and path.endswith(".gguf"):
                continue
            port = free_port()
            cmd = [sys.executable, "-m", "qianwen.cli.main", "serve", "--model", path, "--port", str(port),
                   "--threads", str(args.threads), "--served-model-name", "bench", "--log-level", "warning",
                   "--max-num-seqs", str(max(args.concurrency)), "--max-queue", "1000", "--engine", engine]
            if args.dtype:
                cmd += ["--dtype", args.dtype]
            if engine == "vllm":
                cmd += ["--max-model-len", "2048"] + (["--vllm-python", args.vllm_python] if args.vllm_python else [])
            servers.append(("qianwen serve" + (" --engine vllm" if engine == "vllm" else ""), path, cmd, port, engine))
        if args.llama_python and path.endswith(".gguf"):
            port = free_port()
            servers.append(("llama.cpp server", path, [args.llama_python, "-c", LLAMA_LAUNCHER, "--model", path,
                                                       "--port", str(port), "--host", "127.0.0.1", "--n_threads",
                                                       str(args.threads), "--n_ctx", "4096", "--model_alias", "bench",
                                                       # queue concurrent requests instead of cancelling the running one
                                                       "--interrupt_requests", "False"], port, "llama.cpp"))
    rows, chats, singles = [], [], {}
    for label, path, cmd, port, engine in servers:
        base = f"http://127.0.0.1:{port}"
        log = Path(args.log_dir) / f"bench-{port}.log"
        print(f"starting {label} on {Path(path).name} ...", file=sys.stderr)
        runs = []
        for run in range(max(1, args.chat_runs if args.chat_tokens else 1)):
            proc = start(cmd, base, env, log)  # a fresh server for each further chat: nothing cached from the last
            try:
                for c in args.concurrency:
                    r = asyncio.run(load(base, "bench", c, args.rounds, args.max_tokens, args.httpx, args.sampled))
                    if run == 0:
                        print(f"  {label} c={c}: {r['tok_s']:.1f} tok/s, TTFT p50 {r['ttft_p50']:.2f}s "
                              f"p95 {r['ttft_p95']:.2f}s", file=sys.stderr)
                        rows.append((label, path, engine, c, r))
                if run == 0 and engine == "qianwen" and args.single_rounds:
                    print(f"  {label}: one client against the raw step, alternately ...", file=sys.stderr)
                    raw = RawStep(path, args.dtype, args.max_tokens, env)
                    try:
                        singles[path] = asyncio.run(single_client(base, "bench", raw, args.single_rounds, args.max_tokens,
                                                                  args.sampled))
                    finally:
                        raw.close()
                if args.chat_tokens:
                    runs.append(asyncio.run(chat_turns(base, "bench", args.chat_tokens, args.httpx)))
                    print(f"  {label} chat TTFT turn 1 {runs[-1][0]:.3f}s, turn 10 {runs[-1][-1]:.3f}s", file=sys.stderr)
            finally:
                stop(proc)
        if runs:
            chats.append((label, path, [statistics.median(r[i] for r in runs) for i in range(len(QUESTIONS))],
                          [r[-1] / r[0] for r in runs]))
    how = f"sampled ({', '.join(f'{k} {v}' for k, v in SAMPLED.items())}), every answer that long" if args.sampled \
        else "greedy"
    print(f"\n{args.threads} threads, {args.max_tokens} max tokens per answer, {args.rounds} requests per client, "
          f"{how}.\n")
    print("| server | model | clients | requests | output tokens | aggregate tok/s | TTFT p50 (s) | TTFT p95 (s) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for label, path, _, c, r in rows:
        print(f"| {label} | {Path(path).name} | {c} | {r['requests']} | {r['tokens']} | {r['tok_s']:.1f} | "
              f"{r['ttft_p50']:.2f} | {r['ttft_p95']:.2f} |")
    if singles:
        print(f"\nOne client against the raw decode step, {args.single_rounds} requests, each after a run of the raw "
              "step (tokens/s after the first token; median and range):\n")
        print("| model | raw decode step | qianwen serve, 1 client | 1 client / raw step |")
        print("|---|---:|---:|---:|")
        for path, (served, steps) in singles.items():
            ratio = statistics.median(served) / statistics.median(steps)
            print(f"| {Path(path).name} | {statistics.median(steps):.1f} ({min(steps):.0f}-{max(steps):.0f}) | "
                  f"{statistics.median(served):.1f} ({min(served):.0f}-{max(served):.0f}) | {ratio:.2f} |")
    if chats:
        runs = f", the median of {args.chat_runs} chats (each on a fresh server)" if args.chat_runs > 1 else ""
        print(f"\n10-turn chat, one client, {args.chat_tokens}-token greedy answers: time to first token (s) per "
              f"turn{runs}\n")
        print("| server | model | " + " | ".join(f"turn {i + 1}" for i in range(len(QUESTIONS))) +
              " | turn 10 / turn 1 | each chat's |")
        print("|---|---|" + "---:|" * (len(QUESTIONS) + 2))
        for label, path, turns, ratios in chats:
            print(f"| {label} | {Path(path).name} | " + " | ".join(f"{t:.3f}" for t in turns) +
                  f" | {turns[-1] / turns[0]:.2f} | {min(ratios):.2f}-{max(ratios):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
