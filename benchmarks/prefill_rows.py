"""Prefill as rows of the decode step against the torch prefill path.

    .venv/bin/python benchmarks/prefill_rows.py [--model PATH] [--tokens 64,512,1024] [--rows 64,128]
    .venv/bin/python benchmarks/prefill_rows.py --model ~/.cache/qianwen/bench/SmolLM2-135M-Instruct.Q4_1-hf-bf16

One sequence of N tokens is prefilled into an engine cache (`qianwen.engine.cache_manager`) two ways:
- torch: `hidden_states` over chunks of 64 tokens with the fused step switched off (`net.fast_decode =
  None`): torch attention, the weights dequantized to bf16 per call from `PREFILL_TOKENS` tokens on (the
  prefill before prompts ran as rows);
- rows P: `fast_decode` (qianwen/native/kernels.c `decode_layers`) over chunks of P consecutive tokens of
  the same sequence, one row each (the same K/V buffer repeated, positions s .. s + P - 1): a causal
  prefill by exactly the decode step's arithmetic, so its K/V equal token-by-token decoding's bit for bit.
Neither computes logits (the engine computes them for the last position only). Each path runs once to
warm up, then `--repeats` times; it prints the best and the median tokens/s, the torch path measured
before and after the rows (a shared machine's load then shows as a gap between the two).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

DEFAULT_MODEL = "~/.cache/qianwen/models/SmolLM2-135M-Instruct.Q4_1.gguf"
CHUNK = 64  # tokens per torch prefill call (the offline engine's chunk)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        return platform.processor() or "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--tokens", default="64,512,1024", help="prompt lengths N")
    ap.add_argument("--rows", default="64,128", help="rows per decode_layers call")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-torch", action="store_true", help="time the rows only (e.g. under a profiler)")
    a = ap.parse_args()

    import torch

    import qianwen
    from qianwen.engine.cache_manager import BatchCache, CacheManager

    torch.set_num_threads(a.threads)
    m = qianwen.load(os.path.expanduser(a.model))
    net, c = m.net, m.config
    assert net.fast_decode is not None, "the fused decode step is not installed (no C kernels?)"
    cm = CacheManager(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, m.dtype, torch.device("cpu"), 1 << 16)
    print(f"{a.model}: {m.dtype}, {a.threads} threads, CPU {cpu_model()}")

    def torch_path(n: int) -> None:
        kv = cm.allocate(n + 8)
        ids = list(range(100, 100 + n))
        fused, net.fast_decode = net.fast_decode, None
        try:
            with torch.inference_mode():
                for s in range(0, n, CHUNK):
                    e = min(n, s + CHUNK)
                    net.hidden_states(torch.tensor([ids[s:e]]), torch.arange(s, e)[None], BatchCache([kv], [s]))
        finally:
            net.fast_decode = fused
        cm.free(kv)

    def row_path(n: int, rows: int) -> None:
        kv = cm.allocate(n + 8)
        ids = list(range(100, 100 + n))
        with torch.inference_mode():
            for s in range(0, n, rows):
                e = min(n, s + rows)
                cache = BatchCache([kv] * (e - s), list(range(s, e)))
                net.fast_decode(torch.tensor(ids[s:e])[:, None], torch.arange(s, e)[:, None], cache)
        cm.free(kv)

    def rate(n: int, f: Callable[[], None]) -> tuple[float, float]:
        f()
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
        return n / min(times), n / statistics.median(times)

    rows = [int(r) for r in a.rows.split(",")]
    names = ([] if a.skip_torch else ["torch"]) + [f"rows {r}" for r in rows] + ([] if a.skip_torch else ["torch again"])
    print("prefill tokens/s, best (median) of", a.repeats)
    print(f"{'N':>6s} " + " ".join(f"{name:>16s}" for name in names))
    for n in [int(t) for t in a.tokens.split(",")]:
        paths = [lambda n=n, r=r: row_path(n, r) for r in rows]
        if not a.skip_torch:
            paths = [lambda n=n: torch_path(n), *paths, lambda n=n: torch_path(n)]
        cells = [rate(n, f) for f in paths]
        print(f"{n:6d} " + " ".join(f"{best:8.0f} ({med:5.0f})" for best, med in cells), flush=True)


if __name__ == "__main__":
    main()
