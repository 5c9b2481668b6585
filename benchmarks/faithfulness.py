"""Faithfulness of the default path: mean KL to the float32 reference and top-1 agreement on bilingual
text, for qianwen and llama.cpp on the same GGUF, in one run.

    .venv/bin/python benchmarks/faithfulness.py [--model FILE.gguf] [--threads 2] [--skip-llama]

The reference is the same file loaded by qianwen in float32 with its blocks dequantized exactly
(`quantized=False`: the float path that tests/test_gguf.py checks against transformers' GGUF loader).
The text is benchmarks/quant_agreement.py's prompts (English and Chinese prose and chats); every position's
next-token distribution is compared: top-1 agreement and mean KL(reference || engine) in nats.
- qianwen default: `qianwen.load(FILE)` as the CLI and the server load it (bfloat16 on CPUs with native
  bf16: weights kept quantized, C kernels), through `Model.logits` (one forward over each prompt, the
  prefill path) and token by token through the KV cache (the decode path: the fused C step).
- llama.cpp: llama-cpp-python with `logits_all=True` and `use_extra_bufts=False` (its AMX repack path
  crashes on some CPUs, as in benchmarks/decode.py), fed the same token ids, each prompt in one batch and
  token by token.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import torch  # noqa: E402
from quant_agreement import _sci, compare, prompts  # noqa: E402

import qianwen  # noqa: E402
from qianwen.artifacts import DEFAULT_GGUF, fetch  # noqa: E402
from qianwen.fast import StaticKVCache  # noqa: E402


def qianwen_rows(model: qianwen.Model, ids: list[list[int]], stepwise: bool) -> list[torch.Tensor]:
    """Logits at every position: one forward per prompt, or one cached step per token."""
    if not stepwise:
        return [model.logits(x) for x in ids]
    out = []
    net = model.net
    with torch.inference_mode():
        for x in ids:
            cache = StaticKVCache.for_model(net, 1, len(x))
            out.append(torch.stack([net(torch.tensor([[t]]), cache=cache)[0, -1] for t in x]))
    return out


def llama_rows(path: Path, ids: list[list[int]], threads: int, stepwise: bool) -> list[torch.Tensor]:
    import llama_cpp

    default = llama_cpp.llama_model_default_params

    def params():  # no extra buffer types (the AMX repack path), as benchmarks/decode.py runs it
        p = default()
        p.use_extra_bufts = False
        return p

    llama_cpp.llama_model_default_params = params
    llama_cpp.llama.llama_cpp.llama_model_default_params = params
    llm = llama_cpp.Llama(str(path), n_ctx=1024, n_threads=threads, n_threads_batch=threads, n_batch=512,
                          logits_all=True, verbose=False)
    out = []
    for x in ids:
        llm.reset()
        if stepwise:
            for t in x:
                llm.eval([t])
        else:
            llm.eval(x)
        out.append(torch.from_numpy(llm.scores[: len(x)].copy()).float())
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None,
                    help="a GGUF file (default: the packaged SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--threads", type=int, default=2, help="threads for both engines (default 2)")
    ap.add_argument("--skip-llama", action="store_true", help="leave out llama-cpp-python")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = Path(args.model) if args.model else Path(fetch(DEFAULT_GGUF))

    ref_model = qianwen.load(path, dtype="float32", quantized=False)
    ids = prompts(ref_model)
    ref = qianwen_rows(ref_model, ids, stepwise=False)
    del ref_model
    default = qianwen.load(path)
    kernels = "C kernels" if default.net.fast_decode else "torch kernels"
    label = f"qianwen default ({str(default.dtype).removeprefix('torch.')}, {kernels})"
    runs = [(f"{label}, one forward (Model.logits)", lambda: qianwen_rows(default, ids, False)),
            (f"{label}, token by token (decode step)", lambda: qianwen_rows(default, ids, True))]
    if args.skip_llama:
        pass
    elif importlib.util.find_spec("llama_cpp") is None:
        print("llama.cpp skipped: llama-cpp-python is not installed (pip install llama-cpp-python==0.3.36)")
    else:
        runs += [("llama.cpp, prompt in one batch", lambda: llama_rows(path, ids, args.threads, False)),
                 ("llama.cpp, token by token", lambda: llama_rows(path, ids, args.threads, True))]
    n = sum(len(x) for x in ids)
    rows = []
    for name, fn in runs:
        t0 = time.perf_counter()
        got = fn()
        top1, kl = compare(ref, got)
        print(f"{name}: top-1 {top1:.1%}, mean KL {kl:.2e} ({time.perf_counter() - t0:.1f} s)", flush=True)
        rows.append((name, top1, kl))
    print(f"\n{path.name}, {n} positions ({len(ids)} prompts, English and Chinese), reference: the same file "
          f"dequantized, float32; torch {torch.__version__}, {args.threads} threads, "
          f"{platform.processor() or platform.machine()}")
    print("\n| engine and path | top-1 agreement | mean KL (nats) |\n|---|---:|---:|")
    for name, top1, kl in rows:
        print(f"| {name} | {top1:.1%} | {_sci(kl)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
