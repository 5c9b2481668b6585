"""The int8 KV cache (`--kv-cache-dtype int8`): what it costs in accuracy, what it saves in memory, and
decode speed over a long cache, against the bf16 cache, on the default model.

    .venv/bin/python benchmarks/kv_int8.py [--model FILE.gguf] [--threads 2] [--context 2048] [--steps 32]

- Accuracy: benchmarks/quant_agreement.py's prompts (English and Chinese prose and chats) run token by
  token through a StaticKVCache of each dtype (the decode step: the C kernels where they are built), and
  every position's next-token distribution is compared with the bf16 cache's: top-1 agreement and mean
  KL(bf16 cache || other) in nats. The fp32 cache against bf16 is there for scale. Then the same for one
  forward per prompt (the prefill path, torch attention over the cache's dequantized values).
- Memory: bytes per token (int8 counts its fp32 scale per vector) and the tokens `--kv-cache-mb` holds.
- Speed: `--batch` sequences with a `--context`-token cache each (prefilled), then `--steps` decode
  steps timed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import torch  # noqa: E402
from quant_agreement import _sci, compare, prompts  # noqa: E402

import qianwen  # noqa: E402
from qianwen.artifacts import DEFAULT_GGUF, fetch  # noqa: E402
from qianwen.engine.cache_manager import CacheManager  # noqa: E402
from qianwen.fast import StaticKVCache  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "int8": torch.int8}


def stepwise(net: torch.nn.Module, ids: list[list[int]], dtype: torch.dtype) -> list[torch.Tensor]:
    """Logits at every position, one cached decode step per token, with a cache of `dtype`."""
    out = []
    with torch.inference_mode():
        for x in ids:
            cache = StaticKVCache.for_model(net, 1, len(x), dtype)
            out.append(torch.stack([net(torch.tensor([[t]]), cache=cache)[0, -1].float() for t in x]))
    return out


def one_forward(net: torch.nn.Module, ids: list[list[int]], dtype: torch.dtype) -> list[torch.Tensor]:
    """Logits at every position from one forward per prompt (the prefill path: torch attention over the
    cache's values, int8 dequantized to the model's dtype)."""
    with torch.inference_mode():
        return [net(torch.tensor([x]), cache=StaticKVCache.for_model(net, 1, len(x), dtype))[0].float() for x in ids]


def decode_speed(net: torch.nn.Module, prompt: list[int], dtype: torch.dtype, steps: int, batch: int) -> float:
    """Tokens per second of `steps` greedy decode steps of `batch` rows after `prompt` is cached in each."""
    with torch.inference_mode():
        cache = StaticKVCache.for_model(net, batch, len(prompt) + steps + 1, dtype)
        tokens = net(torch.tensor([prompt] * batch), cache=cache)[:, -1].argmax(-1, keepdim=True)
        net(tokens, cache=cache)  # one warm-up step
        t0 = time.perf_counter()
        for _ in range(steps):
            tokens = net(tokens, cache=cache)[:, -1].argmax(-1, keepdim=True)
        return batch * steps / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a GGUF file (default: the packaged default model)")
    ap.add_argument("--threads", type=int, default=2, help="torch and kernel threads (default 2)")
    ap.add_argument("--context", type=int, default=2048, help="cached tokens for the speed run (default 2048)")
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps (default 32)")
    ap.add_argument("--batch", type=int, default=1, help="sequences decoded together in the speed run (default 1)")
    ap.add_argument("--kv-cache-mb", type=float, default=2048, help="budget for the token count (default 2048)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = Path(args.model) if args.model else Path(fetch(DEFAULT_GGUF))
    model = qianwen.load(path)
    net, c = model.net, model.config
    kernels = "C kernels" if net.fast_decode else "torch kernels"
    print(f"{path.name}: {str(model.dtype).removeprefix('torch.')} weights path, decode on {kernels}, "
          f"{args.threads} threads; {c.num_hidden_layers} layers, {c.num_key_value_heads} kv heads of {c.head_dim}")

    ids = prompts(model)
    ref = stepwise(net, ids, torch.bfloat16)
    print(f"\naccuracy over {sum(map(len, ids))} positions (prompts of {[len(x) for x in ids]} tokens), "
          "vs the bf16 cache:")
    for name in ("float32", "int8"):
        top1, kl = compare(ref, stepwise(net, ids, DTYPES[name]))
        print(f"  {name:8s} cache: top-1 agreement {top1:.4f}, mean KL {_sci(kl)} nats")
    top1, kl = compare(one_forward(net, ids, torch.bfloat16), one_forward(net, ids, torch.int8))
    print(f"  int8     cache, one forward per prompt (prefill path): top-1 agreement {top1:.4f}, mean KL {_sci(kl)}")

    print(f"\nmemory (--kv-cache-mb {args.kv_cache_mb:g}):")
    for name, dtype in DTYPES.items():
        per = CacheManager.bytes_per_token(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, dtype)
        print(f"  {name:8s}: {per:6d} bytes/token, {int(args.kv_cache_mb * 2**20) // per:8d} tokens")

    text = [t for x in ids for t in x]
    prompt = (text * (args.context // len(text) + 1))[:args.context]
    print(f"\ndecode at {args.context} cached tokens, batch {args.batch}, {args.steps} steps:")
    for name in ("bfloat16", "int8"):
        print(f"  {name:8s} cache: {decode_speed(net, prompt, DTYPES[name], args.steps, args.batch):6.1f} tok/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
