"""Batched decode benchmark: the fused decode step (qianwen/fast/decode.py on qianwen/native/kernels.c)
over B sequences at once, and the quantized matmul kernels (q4_gemm, q8_gemm) it spends its time in.

    .venv/bin/python benchmarks/batched.py [--model FILE.gguf] [--batches 1,4,16,64] [--threads 2]
    .venv/bin/python benchmarks/batched.py --compare /work/main     # this checkout against another one

For each batch size B: B sequences share a StaticKVCache, each prefilled with the same 32-token prompt,
then `--steps` decode steps (one token per sequence, the logits of all B included) are timed one by one;
it prints the median and the fastest step in ms and B / step as tokens/s (on a busy machine the fastest
is the one least disturbed). `--kernels` also times each distinct
projection of the model (and its output layer) alone at M = B rows (the fastest of repeated calls). Each checkout (this one, and those
given to --compare) runs in its own subprocess with PYTHONPATH set to it, `--rounds` times, the
checkouts interleaved round by round (a shared machine's load then falls on each alike); the table shows
medians over rounds."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_MODEL = "~/.cache/qianwen/models/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = 32  # tokens per sequence before decoding


def child(model: str, batches: list[int], steps: int, threads: int, kernels: bool) -> dict:
    import torch

    import qianwen
    from qianwen.fast import StaticKVCache
    from qianwen.quant.linear import NativeLinear

    torch.set_num_threads(threads)
    m = qianwen.load(os.path.expanduser(model))
    net = m.net
    assert net.fast_decode is not None, "the fused decode step is not installed (no C kernels?)"
    out: dict = {"step_ms": {}, "best_step_ms": {}, "kernel_ms": {}}
    with torch.inference_mode():
        for b in batches:
            cache = StaticKVCache.for_model(net, b, PROMPT + steps + 4)
            ids = torch.arange(3, 3 + PROMPT).repeat(b, 1)
            net.hidden_states(ids, cache=cache)
            tok = torch.full((b, 1), 7)
            times = []
            for i in range(steps + 2):
                t0 = time.perf_counter()
                logits = net(tok, cache=cache)
                if i >= 2:  # two warm-up steps
                    times.append((time.perf_counter() - t0) * 1000)
                tok = logits[:, -1:].argmax(-1)
            out["step_ms"][b], out["best_step_ms"][b] = statistics.median(times), min(times)
        if kernels:
            seen = {}
            for mod in net.modules():
                if isinstance(mod, NativeLinear):
                    seen.setdefault((mod.KERNEL, mod.in_features, mod.out_features), mod)
            for (kernel, k, n), mod in seen.items():
                for b in batches:
                    x, y = torch.randn(b, k), torch.empty(b, n)
                    mod.native_matmul(x, y)
                    best = float("inf")
                    for _ in range(max(5, min(200, int(5e8 / (b * k * n))))):  # the fastest call: the least disturbed
                        t0 = time.perf_counter()
                        mod.native_matmul(x, y)
                        best = min(best, time.perf_counter() - t0)
                    out["kernel_ms"][f"{kernel} {k}x{n} M={b}"] = best * 1000
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kernels", action="store_true", help="also time each projection kernel alone")
    ap.add_argument("--compare", nargs="*", default=[], help="other checkouts to run the same way")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    batches = [int(b) for b in a.batches.split(",")]
    if a.child:
        print(json.dumps(child(a.model, batches, a.steps, a.threads, a.kernels)))
        return
    here = str(Path(__file__).resolve().parent.parent)
    trees = [here, *[str(Path(t).resolve()) for t in a.compare]]
    runs: dict[str, list[dict]] = {t: [] for t in trees}
    for r in range(a.rounds):
        for t in trees:  # interleaved: each round runs every checkout once
            cmd = [sys.executable, __file__, "--child", "--model", a.model, "--batches", a.batches,
                   "--steps", str(a.steps), "--threads", str(a.threads), *(["--kernels"] if a.kernels else [])]
            env = {**os.environ, "PYTHONPATH": t}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode:
                sys.exit(f"{t}: {proc.stderr.strip().splitlines()[-1:]}")
            runs[t].append(json.loads(proc.stdout.splitlines()[-1]))
            print(f"round {r + 1}/{a.rounds} {t}: done", file=sys.stderr)

    def med(t: str, part: str, key: str) -> float:
        return statistics.median(run[part][key] for run in runs[t])

    for part, what in (("step_ms", "median step"), ("best_step_ms", "fastest step")):
        print(f"decode step ({what}), {a.threads} threads, median of {a.rounds} rounds x {a.steps} steps: ms, tokens/s")
        print(f"{'checkout':32s} " + " ".join(f"{'B=' + str(b):>18s}" for b in batches))
        for t in trees:
            cells = [f"{med(t, part, str(b)):7.2f} ms {b / med(t, part, str(b)) * 1000:6.0f}/s" for b in batches]
            print(f"{t:32s} " + " ".join(f"{c:>18s}" for c in cells))
    if a.kernels:
        print("\nkernel ms (the fastest of repeated calls)")
        print(f"{'':32s}" + "".join(f"{Path(t).name:>14s}" for t in trees))
        for key in runs[here][0]["kernel_ms"]:
            print(f"{key:32s}" + "".join(f"{med(t, 'kernel_ms', key):14.3f}" for t in trees))


if __name__ == "__main__":
    main()
