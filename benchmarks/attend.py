"""The attention kernel alone (qianwen/native/kernels.c `attend`), called through ctypes with its arguments
built once, so the time is the kernel's (building them per call in Python costs 10-40 us, more than a
decode row's attention).

    .venv/bin/python benchmarks/attend.py [--threads 1,2] [--kv bf16,fp32,int8] [--shape 9x3x64]
    .venv/bin/python benchmarks/attend.py --lib /tmp/old.so --lib /tmp/new.so   # builds A/B

A build of another checkout's kernels: `cc -O3 -march=native -fno-math-errno -fopenmp -shared -fPIC -o
X.so kernels.c -lm`. Each case is rows of one cache (the engine's rows of one sequence: a decode row, or a
prompt's tokens at lengths p+1 .. p+M, each causal by its own length), shape Hq x Hkv x D (SmolLM2's
9x3x64 by default). The libraries are timed in turn, `--rounds` times; the table shows each one's
fastest round (on a shared machine the least disturbed) in microseconds a call (one layer).
"""

from __future__ import annotations

import argparse
import ctypes
import time
from pathlib import Path

import torch

from qianwen import native
from qianwen.fast.cache import quantize_kv

# (p, M): rows at lengths p+1 .. p+M. A decode row at 31, 621, 2001 positions; a chat turn's new tokens
# after a cached 620-token history (19 rows); a short prompt's rows (21 at 10-30); a few rows
CASES = [(620, 19), (9, 21), (620, 1), (30, 1), (2000, 1), (620, 4), (100, 2), (2000, 8)]
KV = {"fp32": 0, "bf16": 1, "int8": 2}


class Call:
    """attend's arguments for rows of one random cache (kept alive with it)."""

    def __init__(self, kind: str, hq: int, hkv: int, d: int, lens: list[int]) -> None:
        cap, m = max(lens), len(lens)
        k, v = (torch.randn(hkv, cap, d) for _ in range(2))
        if kind == "int8":
            (self.k, ks), (self.v, vs) = quantize_kv(k), quantize_kv(v)
            scales = [ks.data_ptr(), vs.data_ptr()]
            self.keep = (ks, vs)
        else:
            dtype = torch.bfloat16 if kind == "bf16" else torch.float32
            self.k, self.v, scales = k.to(dtype), v.to(dtype), [None, None]
        self.q, self.out = torch.randn(m, hq * d), torch.empty(m, hq * d)
        self.scale = torch.full((m,), d ** -0.5)
        arr = lambda t, vals: (t * m)(*vals)  # noqa: E731
        self.args = (self.q.data_ptr(), m, hq, hkv, d, hq * d,
                     arr(ctypes.c_void_p, [self.k.data_ptr()] * m), arr(ctypes.c_void_p, [self.v.data_ptr()] * m),
                     arr(ctypes.c_void_p, [scales[0]] * m), arr(ctypes.c_void_p, [scales[1]] * m),
                     arr(ctypes.c_int, lens), arr(ctypes.c_long, [cap * d] * m), KV[kind],
                     self.scale.data_ptr(), self.out.data_ptr())

    def time(self, lib: ctypes.CDLL, seconds: float = 0.05) -> float:
        """Seconds a call: the fastest of 5 runs of calls filling `seconds` each."""
        fn, best = lib.attend, float("inf")
        for _ in range(3):
            fn(*self.args)
        t = time.perf_counter()
        fn(*self.args)
        n = max(5, int(seconds / max(time.perf_counter() - t, 1e-7)))
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(n):
                fn(*self.args)
            best = min(best, (time.perf_counter() - t) / n)
        return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--kv", default="bf16,fp32,int8")
    ap.add_argument("--shape", default="9x3x64", help="Hq x Hkv x D")
    ap.add_argument("--lib", action="append", help="a built kernels library (repeat to compare; default: "
                    "this checkout's)")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    hq, hkv, d = (int(x) for x in a.shape.split("x"))
    libs = {Path(p).stem: native.open_library(Path(p)) for p in a.lib} if a.lib else {"kernels": native.lib()}
    print(f"attend, {hq}x{hkv}x{d}, us a call (fastest of {a.rounds} rounds)")
    print(f"{'kv':5} {'thr':>3} {'rows':>4} {'lengths':>10}  " + "  ".join(f"{n:>10}" for n in libs))
    for threads in (int(x) for x in a.threads.split(",")):
        torch.set_num_threads(threads)
        next(iter(libs.values())).set_threads(threads)  # the calling thread's OpenMP count (one runtime)
        for kind in a.kv.split(","):
            for p, m in CASES:
                call = Call(kind, hq, hkv, d, list(range(p + 1, p + m + 1)))
                best = {n: float("inf") for n in libs}
                for _ in range(a.rounds):
                    for n, lib in libs.items():
                        best[n] = min(best[n], call.time(lib))
                print(f"{kind:5} {threads:>3} {m:>4} {f'{p + 1}-{p + m}':>10}  "
                      + "  ".join(f"{best[n] * 1e6:10.1f}" for n in libs), flush=True)


if __name__ == "__main__":
    main()
