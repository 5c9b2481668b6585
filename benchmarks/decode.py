"""Decode benchmark: qianwen vs llama-cpp-python vs transformers' GGUF loading, in one run.

    .venv/bin/python benchmarks/decode.py [--model FILE.gguf] [--threads 2] [--skip llama_stock,...]

Each engine runs in its own subprocess (so peak RSS is its own) on the same GGUF, thread count and
prompt: load time, prefill tokens/s on a 200-token prompt, decode tokens/s over 128 greedy tokens, peak
RSS. The roofline is the measured read bandwidth divided by the bytes each engine reads per token.
llama-cpp-python is optional (pip install llama-cpp-python==0.3.36); its default AMX repack path crashes
on some CPUs (shared/reference/cpu-performance.md), so it runs with `use_extra_bufts = False`
("llama.cpp"), and its stock default is tried separately ("llama.cpp stock").
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

TEXT = ("The history of tea in China spans thousands of years. 中国的茶文化历史悠久，从唐代的陆羽《茶经》"
        "到宋代的点茶，再到明清的散茶冲泡。Tea spread along the Silk Road to Central Asia and later by sea "
        "to Europe, where it changed daily life. 今天，茶仍然是世界上最受欢迎的饮料之一。") * 6
N_PROMPT, N_DECODE = 200, 128


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_qianwen(path: str, threads: int) -> dict:
    import torch

    import qianwen
    from qianwen.fast import StaticKVCache

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    m = qianwen.load(path, dtype="bfloat16", quantized=True)
    load = time.perf_counter() - t0
    net = m.net
    ids = m.tokenizer.encode(TEXT)[:N_PROMPT]
    wbytes = sum({t.data_ptr(): t.nbytes for t in [*net.parameters(), *net.buffers()]}.values())
    with torch.inference_mode():
        net(torch.tensor([ids[:16]]))  # warm-up
        cache = StaticKVCache.for_model(net, 1, N_PROMPT + N_DECODE + 8)
        t0 = time.perf_counter()
        logits = net(torch.tensor([ids]), cache=cache)[0, -1]
        prefill = time.perf_counter() - t0
        tok = int(logits.argmax())
        t0 = time.perf_counter()
        for _ in range(N_DECODE):
            tok = int(net(torch.tensor([[tok]]), cache=cache)[0, -1].argmax())
        decode = time.perf_counter() - t0
    return dict(load_s=load, prefill_tps=len(ids) / prefill, decode_tps=N_DECODE / decode, rss_mb=_rss_mb(),
                bytes_per_token=wbytes)


def run_llama(path: str, threads: int, stock: bool) -> dict:
    import llama_cpp

    if not stock:  # the AMX repack buffers crash here: turn extra buffer types off
        default = llama_cpp.llama_model_default_params

        def params():
            p = default()
            p.use_extra_bufts = False
            return p

        llama_cpp.llama_model_default_params = params
        llama_cpp.llama.llama_cpp.llama_model_default_params = params
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(path, n_ctx=512, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False)
    load = time.perf_counter() - t0
    ids = llm.tokenize(TEXT.encode(), add_bos=False)[:N_PROMPT]
    t0 = time.perf_counter()
    llm.eval(ids)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(N_DECODE):
        tok = int(llm.scores[llm.n_tokens - 1].argmax())
        llm.eval([tok])
    decode = time.perf_counter() - t0
    return dict(load_s=load, prefill_tps=len(ids) / prefill, decode_tps=N_DECODE / decode, rss_mb=_rss_mb(),
                bytes_per_token=os.path.getsize(path))


def run_transformers(path: str, threads: int) -> dict:
    import torch
    import transformers

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    folder, name = os.path.split(os.path.abspath(path))
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    load = time.perf_counter() - t0
    ids = tok(TEXT, add_special_tokens=False)["input_ids"][:N_PROMPT]
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(torch.tensor([ids]), use_cache=True)
        prefill = time.perf_counter() - t0
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(N_DECODE):
            out = model(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        decode = time.perf_counter() - t0
    nbytes = sum(p.nbytes for p in model.parameters())
    return dict(load_s=load, prefill_tps=len(ids) / prefill, decode_tps=N_DECODE / decode, rss_mb=_rss_mb(),
                bytes_per_token=nbytes)


def bandwidth_gbs(threads: int) -> float:
    """Read bandwidth over a 2 GiB array (beyond any cache)."""
    import torch

    torch.set_num_threads(threads)
    a = torch.ones(2**29, dtype=torch.float32)
    a.sum()
    t0 = time.perf_counter()
    for _ in range(5):
        a.sum()
    return 5 * a.nbytes / (time.perf_counter() - t0) / 1e9


ENGINES = {"bandwidth": lambda p, t: {"gbs": bandwidth_gbs(t)}, "qianwen": run_qianwen, "llama.cpp": lambda p, t: run_llama(p, t, False),
           "llama.cpp stock": lambda p, t: run_llama(p, t, True), "transformers": run_transformers}


def child(engine: str, path: str, threads: int) -> None:
    print("RESULT " + json.dumps(ENGINES[engine](path, threads)), flush=True)


def _spawn(engine: str, args: argparse.Namespace) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--model", args.model, "--threads", str(args.threads),
                           "--child", engine], capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        why = f"signal {-proc.returncode}" if proc.returncode < 0 else (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise RuntimeError(why)
    return json.loads(line[7:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a .gguf file (default: the default model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip", default="", help="comma-separated engines to leave out")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.model is None:
        from qianwen.artifacts import DEFAULT_GGUF, fetch

        args.model = str(fetch(DEFAULT_GGUF))
    if args.child:
        child(args.child, args.model, args.threads)
        return 0
    results: dict[str, dict] = {}
    bw = _spawn("bandwidth", args)["gbs"]  # in a child, so the 2 GiB array does not count in anyone's RSS
    print(f"model {os.path.basename(args.model)} ({os.path.getsize(args.model) / 1e6:.1f} MB), "
          f"{args.threads} threads, read bandwidth {bw:.1f} GB/s")
    for engine in ENGINES:
        if engine == "bandwidth" or engine in args.skip.split(","):
            continue
        try:
            r = results[engine] = _spawn(engine, args)
        except RuntimeError as e:
            print(f"{engine:<16} failed: {e}")
            continue
        r["roofline_tps"] = bw * 1e9 / r["bytes_per_token"]
        print(f"{engine:<16} load {r['load_s']:6.2f} s  prefill {r['prefill_tps']:7.1f} tok/s  decode "
              f"{r['decode_tps']:6.1f} tok/s  peak RSS {r['rss_mb']:6.0f} MB  roofline {r['roofline_tps']:6.0f} tok/s "
              f"({r['bytes_per_token'] / 1e6:.0f} MB/token)", flush=True)
    q = results.get("qianwen")
    for other in ("llama.cpp", "transformers"):
        if q and other in results:
            o = results[other]
            print(f"qianwen/{other}: decode {q['decode_tps'] / o['decode_tps']:.2f}x, "
                  f"prefill {q['prefill_tps'] / o['prefill_tps']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
