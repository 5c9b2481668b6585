"""Decode benchmark: one model in every form qianwen runs, against llama-cpp-python and transformers, in one run.

    .venv/bin/python benchmarks/decode.py [--model FILE.gguf] [--threads 2] [--steps 128] [--skip-llama] [--skip-transformers]
    .venv/bin/python benchmarks/decode.py --busy 0,1,2     # decode beside 0, 1 and 2 busy processes

The same weights (default: the default model, a Q4_1 GGUF) in five forms, each engine in its own
subprocess (so peak RSS is its own) with the same thread count and prompt:
- qianwen gguf: the GGUF kept quantized (bf16, the C kernels);
- qianwen hf-bf16 / hf-fp32: Hugging Face folders written by `qianwen convert --dtype bfloat16 / float32`
  of the GGUF (under $QIANWEN_HOME/bench; the dense C kernels);
- transformers hf-bf16: transformers on the bf16 folder;
- llama.cpp gguf / f16: llama-cpp-python on the GGUF, and on an F16 GGUF of the bf16 folder made by
  llama.cpp's own convert_hf_to_gguf.py (as benchmarks/make_qwen_gguf.py does, from its sdist).
Per row: load time, prefill tokens/s on a 200-token prompt (logits of the last position only, as
llama.cpp computes them), decode tokens/s over `--steps` greedy tokens, peak RSS and its growth after
`import torch` (or `import llama_cpp`), the bytes each engine reads per token (the weights it holds),
and tokens/s x bytes per token: the read bandwidth its decode reaches, also as a share of the
machine's measured read bandwidth ("efficiency"; printed with the CPU model). qianwen's GGUF decode is
also timed through the public `Model.stream_tokens` (sampling loop included).
llama-cpp-python is optional (pip install llama-cpp-python==0.3.36); its default AMX repack path crashes
on some CPUs (docs/cpu-performance.md), so it runs with `use_extra_bufts = False`
("llama.cpp"), and its stock default is tried separately ("llama.cpp stock"; a crash is reported).

`--busy N[,N...]`: a shared machine. For each N, N processes spinning in Python (`while True: pass`) run
beside qianwen, qianwen with its thread count fixed (QIANWEN_ADAPT_THREADS=0, as before it followed the
free cores) and llama.cpp, each in turn, started before the engine loads and killed after it; decode
stops after `--decode-seconds`. It also measures qianwen on one thread with nothing beside it, and prints
a table of decode tokens/s.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import resource
import subprocess
import sys
import time

TEXT = ("The history of tea in China spans thousands of years. 中国的茶文化历史悠久，从唐代的陆羽《茶经》"
        "到宋代的点茶，再到明清的散茶冲泡。Tea spread along the Silk Road to Central Asia and later by sea "
        "to Europe, where it changed daily life. 今天，茶仍然是世界上最受欢迎的饮料之一。") * 6
N_PROMPT, N_DECODE = 200, 128
DECODE_SECONDS = math.inf  # a child's decode stops after this long (--decode-seconds)


def _rss_mb() -> float:
    """Peak resident memory of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_qianwen(path: str, threads: int, dtype: str = "bfloat16") -> dict:
    import torch

    base = _rss_now_mb()  # after `import torch`: the growth is what loading and running add
    import qianwen
    from qianwen.fast import StaticKVCache
    from qianwen.quant.summary import weight_summary

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    m = qianwen.load(path, dtype=dtype, quantized=True)
    load = time.perf_counter() - t0
    net = m.net
    ids = m.tokenizer.encode(TEXT)[:N_PROMPT]

    def prefill(cache) -> int:
        h = net.hidden_states(torch.tensor([ids]), cache=cache)
        return int(net.lm_head(h[:, -1:])[0, -1].argmax())

    with torch.inference_mode():
        prefill(StaticKVCache.for_model(net, 1, N_PROMPT))  # warm-up (both the prefill and decode kernels)
        net(torch.tensor([ids[:1]]))
        cache = StaticKVCache.for_model(net, 1, N_PROMPT + N_DECODE + 8)
        t0 = time.perf_counter()
        tok = prefill(cache)
        prefill_s = time.perf_counter() - t0
        n, t0 = 0, time.perf_counter()
        while n < N_DECODE and time.perf_counter() - t0 < DECODE_SECONDS:
            tok = int(net(torch.tensor([[tok]]), cache=cache)[0, -1].argmax())
            n += 1
        decode = time.perf_counter() - t0
    out = dict(load_s=load, prefill_tps=len(ids) / prefill_s, decode_tps=n / decode, rss_mb=_rss_mb(),
               rss_growth_mb=_rss_mb() - base, bytes_per_token=weight_summary(net).bytes_held,
               one_call=bool(net.fast_decode and net.fast_decode.one_call))
    if DECODE_SECONDS < math.inf or os.path.isdir(path):  # --busy, or a folder: the raw step only
        return out
    params = m.params(max_tokens=N_DECODE + 1, temperature=0, ignore_eos=True)
    steps, t0 = 0, time.perf_counter()
    for _ in m.stream_tokens(ids, params):
        steps += 1
        if steps == 1:  # the first token comes from the prefill
            t0 = time.perf_counter()
    return {**out, "api_decode_tps": (steps - 1) / (time.perf_counter() - t0)}


def run_llama(path: str, threads: int, stock: bool) -> dict:
    import llama_cpp

    base = _rss_now_mb()
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
    n, t0 = 0, time.perf_counter()
    while n < N_DECODE and time.perf_counter() - t0 < DECODE_SECONDS:
        tok = int(llm.scores[llm.n_tokens - 1].argmax())
        llm.eval([tok])
        n += 1
    decode = time.perf_counter() - t0
    return dict(load_s=load, prefill_tps=len(ids) / prefill, decode_tps=n / decode, rss_mb=_rss_mb(),
                rss_growth_mb=_rss_mb() - base, bytes_per_token=os.path.getsize(path))


def run_transformers(path: str, threads: int, dtype: str = "bfloat16") -> dict:
    """transformers on a Hugging Face folder (or, given a .gguf, on its GGUF loading, dequantized)."""
    import torch

    base = _rss_now_mb()
    import transformers

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    if os.path.isdir(path):
        folder, kw = path, dict(torch_dtype=getattr(torch, dtype))
    else:
        folder, name = os.path.split(os.path.abspath(path))
        kw = dict(gguf_file=name, torch_dtype=torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, **kw).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder, **{k: v for k, v in kw.items() if k == "gguf_file"})
    load = time.perf_counter() - t0
    ids = tok(TEXT, add_special_tokens=False)["input_ids"][:N_PROMPT]
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - t0
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        n = 0
        while n < N_DECODE and time.perf_counter() - t0 < DECODE_SECONDS:
            out = model(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            n += 1
        decode = time.perf_counter() - t0
    nbytes = sum(p.nbytes for p in model.parameters())
    return dict(load_s=load, prefill_tps=len(ids) / prefill, decode_tps=n / decode, rss_mb=_rss_mb(),
                rss_growth_mb=_rss_mb() - base, bytes_per_token=nbytes)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        return "?"


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


ENGINES = {"bandwidth": lambda p, t, d: {"gbs": bandwidth_gbs(t)}, "qianwen": run_qianwen,
           "llama.cpp": lambda p, t, d: run_llama(p, t, False), "llama.cpp stock": lambda p, t, d: run_llama(p, t, True),
           "transformers": run_transformers}
FIXED = "qianwen fixed"  # --busy: qianwen with QIANWEN_ADAPT_THREADS=0
# (row, engine, form of the weights, dtype): the forms are made by `prepare`
ROWS = [("qianwen gguf", "qianwen", "gguf", "bfloat16"), ("qianwen hf-bf16", "qianwen", "bf16", "bfloat16"),
        ("qianwen hf-fp32", "qianwen", "fp32", "float32"), ("transformers hf-bf16", "transformers", "bf16", "bfloat16"),
        ("llama.cpp gguf", "llama.cpp", "gguf", ""), ("llama.cpp f16", "llama.cpp", "f16", ""),
        ("llama.cpp stock", "llama.cpp stock", "gguf", "")]


def child(engine: str, path: str, threads: int, dtype: str) -> None:
    print("RESULT " + json.dumps(ENGINES[engine](path, threads, dtype)), flush=True)


def _spawn(engine: str, args: argparse.Namespace, threads: int | None = None, model: str | None = None,
           dtype: str = "bfloat16") -> dict:
    threads = threads or args.threads
    env = {**os.environ, "QIANWEN_THREADS": str(threads)}
    if engine == FIXED:
        engine, env["QIANWEN_ADAPT_THREADS"] = "qianwen", "0"
    cmd = [sys.executable, __file__, "--model", model or args.model, "--threads", str(threads), "--child", engine,
           "--decode-seconds", str(args.decode_seconds), "--dtype", dtype or "bfloat16", "--steps", str(args.steps)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"did not finish within {args.timeout} s") from None
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        why = f"signal {-proc.returncode}" if proc.returncode < 0 else (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise RuntimeError(why)
    return json.loads(line[7:])


def _wanted(args: argparse.Namespace) -> list[str]:
    """The engines (and rows, for a full run) to run: --skip takes either."""
    skip = {x.strip() for x in args.skip.split(",") if x.strip()}
    if args.skip_llama:
        skip |= {"llama.cpp", "llama.cpp stock"}
    if args.skip_transformers:
        skip.add("transformers")
    engines = [e for e in ENGINES if e != "bandwidth" and e not in skip]
    if any(e.startswith("llama.cpp") for e in engines) and importlib.util.find_spec("llama_cpp") is None:
        print("llama.cpp        skipped: llama-cpp-python is not installed "
              "(pip install llama-cpp-python==0.3.36, about 4 minutes to build; or pass --skip-llama)")
        engines = [e for e in engines if not e.startswith("llama.cpp")]
    return engines + [row for row, engine, _, _ in ROWS if engine in engines and row not in skip]


def prepare(gguf: str, forms: set[str]) -> dict[str, str | Exception]:
    """The paths of the weights' forms (made once, cached under $QIANWEN_HOME/bench): the GGUF itself,
    `qianwen convert` folders in bf16 and fp32, and llama.cpp's F16 GGUF of the bf16 folder."""
    from qianwen.paths import home

    bench = home() / "bench"
    bench.mkdir(parents=True, exist_ok=True)
    stem = os.path.basename(gguf).removesuffix(".gguf")
    out: dict[str, str | Exception] = {"gguf": gguf}
    for form, dtype in (("bf16", "bfloat16"), ("fp32", "float32")):
        folder = bench / f"{stem}-hf-{form}"
        if form in forms | ({"bf16"} if "f16" in forms else set()) and not (folder / "config.json").is_file():
            print(f"making {folder} (qianwen convert --dtype {dtype})", flush=True)
            code = "import sys; from qianwen.cli.main import main; sys.exit(main(sys.argv[1:]))"
            subprocess.run([sys.executable, "-c", code, "convert", "-m", gguf, "--out", str(folder), "--dtype", dtype],
                           check=True)
        out[form] = str(folder)
    if "f16" in forms:
        import make_qwen_gguf  # beside this file

        try:
            src = make_qwen_gguf.fetch_llama_cpp(bench)
            out["f16"] = str(make_qwen_gguf.convert_f16(src, bench / f"{stem}-hf-bf16", bench / f"{stem}.f16.gguf"))
        except (subprocess.CalledProcessError, OSError) as e:
            out["f16"] = e
    return out


class Busy:
    """`n` processes spinning in Python while the block runs."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self) -> None:
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.n)]

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            p.kill()
            p.wait()


def run_busy(args: argparse.Namespace, levels: list[int]) -> int:
    """Decode tokens/s beside 0, 1, 2, ... busy processes, for qianwen (and with fixed threads) and llama.cpp."""
    skip = {x.strip() for x in args.skip.split(",")}
    engines = [e for e in ("qianwen", FIXED) if e not in skip] + [e for e in _wanted(args) if e == "llama.cpp"]
    print(f"model {os.path.basename(args.model)}, {args.threads} threads, {os.cpu_count()} CPUs, decode up to "
          f"{N_DECODE} tokens or {args.decode_seconds:g} s; load average {os.getloadavg()[0]:.1f}", flush=True)
    started, table = time.perf_counter(), {}
    try:
        one = _spawn("qianwen", args, threads=1)["decode_tps"]
        print(f"qianwen, 1 thread, nothing beside it: decode {one:.1f} tok/s", flush=True)
    except RuntimeError as e:
        one = None
        print(f"qianwen, 1 thread: failed: {e}", flush=True)
    for n in levels:
        for engine in engines:
            load = os.getloadavg()[0]
            with Busy(n):
                try:
                    r = _spawn(engine, args)
                except RuntimeError as e:
                    print(f"busy {n}  {engine:<14} failed: {e}", flush=True)
                    continue
            table[n, engine] = r["decode_tps"]
            print(f"busy {n}  {engine:<14} decode {r['decode_tps']:6.1f} tok/s  prefill {r['prefill_tps']:6.1f} tok/s  "
                  f"(load average before: {load:.1f})", flush=True)
    print(f"\n| busy processes | {' | '.join(engines)} |\n|---:|" + "---:|" * len(engines))
    for n in levels:
        print(f"| {n} | " + " | ".join(f"{table[n, e]:.1f}" if (n, e) in table else "-" for e in engines) + " |")
    if one and (1, "qianwen") in table:
        q = table[1, "qianwen"]
        vs = f", llama.cpp {table[1, 'llama.cpp']:.1f}" if (1, "llama.cpp") in table else ""
        print(f"\nbusy 1: qianwen {q:.1f} tok/s = {q / one:.2f}x its own 1-thread speed with nothing beside it "
              f"({one:.1f}; goal >= 0.8){vs}")
    print(f"total {time.perf_counter() - started:.0f} s, load average now {os.getloadavg()[0]:.1f}")
    return 0


def main() -> int:
    global DECODE_SECONDS, N_DECODE
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a .gguf file (default: the default model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=N_DECODE, help=f"greedy tokens to decode (default {N_DECODE})")
    ap.add_argument("--dtype", default="bfloat16", help=argparse.SUPPRESS)
    ap.add_argument("--skip-llama", action="store_true", help="leave out llama-cpp-python (both of its runs)")
    ap.add_argument("--skip-transformers", action="store_true", help="leave out transformers")
    ap.add_argument("--skip", default="", help="comma-separated engines to leave out: "
                    + ", ".join([*list(ENGINES)[1:], *(r[0] for r in ROWS), FIXED + " (--busy)"]))
    ap.add_argument("--timeout", type=float, default=900, help="seconds one engine may take (default 900)")
    ap.add_argument("--busy", default=None, help="comma-separated counts of busy processes to run beside the engines")
    ap.add_argument("--decode-seconds", type=float, default=math.inf,
                    help="stop each decode after this many seconds (default with --busy: 15)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    levels = None
    if args.busy is not None:
        try:
            levels = [int(x) for x in args.busy.split(",")]
        except ValueError:
            levels = [-1]
        if not levels or min(levels) < 0:
            ap.error("--busy takes counts like 0,1,2")
        if args.decode_seconds == math.inf:
            args.decode_seconds = 15.0
    if args.model is None:
        from qianwen.artifacts import DEFAULT_GGUF, fetch

        args.model = str(fetch(DEFAULT_GGUF))
    N_DECODE = args.steps
    if args.child:
        DECODE_SECONDS = args.decode_seconds
        child(args.child, args.model, args.threads, args.dtype)
        return 0
    if not os.path.isfile(args.model):
        print(f"error: {args.model} is not a file", file=sys.stderr)
        return 1
    if levels is not None:
        return run_busy(args, levels)
    rows = [r for r in ROWS if r[0] in _wanted(args)]
    started = time.perf_counter()
    paths = prepare(args.model, {form for _, _, form, _ in rows})
    results: dict[str, dict] = {}
    bw = _spawn("bandwidth", args)["gbs"]  # in a child, so the 2 GiB array does not count in anyone's RSS
    print(f"model {os.path.basename(args.model)} ({os.path.getsize(args.model) / 1e6:.1f} MB), {cpu_model()}, "
          f"{args.threads} threads, read bandwidth {bw:.1f} GB/s, {args.steps} decode steps, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    for row, engine, form, dtype in rows:
        path = paths[form]
        try:
            if isinstance(path, Exception):
                raise RuntimeError(f"could not make its {form} weights: {path}")
            r = results[row] = _spawn(engine, args, model=path, dtype=dtype)
        except RuntimeError as e:
            hint = " (its AMX repack path crashes on some CPUs; see docs/cpu-performance.md)" if engine == "llama.cpp stock" else ""
            print(f"{row:<21} failed: {e}{hint}", flush=True)
            continue
        r["gbs"] = r["decode_tps"] * r["bytes_per_token"] / 1e9  # the read bandwidth its decode reaches
        extra = f"  (stream_tokens {r['api_decode_tps']:.1f} tok/s)" if "api_decode_tps" in r else ""
        extra += "  NOT one call" if r.get("one_call") is False else ""
        print(f"{row:<21} load {r['load_s']:6.2f} s  prefill {r['prefill_tps']:7.1f} tok/s  decode "
              f"{r['decode_tps']:6.1f} tok/s  x {r['bytes_per_token'] / 1e6:4.0f} MB/token = {r['gbs']:5.1f} GB/s "
              f"({r['gbs'] / bw:.2f} of the bandwidth)  peak RSS {r['rss_mb']:6.0f} MB "
              f"(+{r['rss_growth_mb']:.0f} after import){extra}", flush=True)
    q = results.get("qianwen gguf")
    for mine, other in (("qianwen gguf", "llama.cpp gguf"), ("qianwen hf-bf16", "llama.cpp f16"),
                        ("qianwen hf-bf16", "transformers hf-bf16"), ("qianwen gguf", "llama.cpp stock")):
        a, b = results.get(mine), results.get(other)
        if a and b:
            print(f"{mine} / {other}: decode {a['decode_tps'] / b['decode_tps']:.2f}x, "
                  f"prefill {a['prefill_tps'] / b['prefill_tps']:.2f}x, load {b['load_s'] / a['load_s']:.2f}x faster")
    if q and (h := results.get("qianwen hf-bf16")):
        print(f"bandwidth efficiency hf-bf16 / gguf: {h['gbs'] / q['gbs']:.2f} (goal >= 0.8)")
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
