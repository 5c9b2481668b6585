"""Perplexity of a text file or tokenized shard with a sliding window (the strided method of the
transformers docs): windows of `window` tokens advance by `stride`; each token is scored at most once,
with up to `window - stride` tokens of context before the window's scored part."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import QianwenError


def load_ids(path: str | Path, tokenizer: Any) -> list[int]:
    """Token ids of a .txt (UTF-8 text, encoded as plain text) or a shard (.bin/.json, or a folder)."""
    p = Path(path)
    if p.suffix in (".bin", ".json") or p.is_dir() or any(c in str(path) for c in "*?["):
        from ..train.shards import load_tokens

        ids, _ = load_tokens(path, identity=tokenizer.identity)
        return ids.astype("int64").tolist()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise QianwenError(f"no such file: {p}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise QianwenError(f"cannot read {p} as UTF-8 text: {e}") from None
    bos = [tokenizer.bos_id] if getattr(tokenizer, "add_bos", False) and tokenizer.bos_id is not None else []
    return bos + tokenizer.encode(text)


@torch.inference_mode()
def perplexity(net: torch.nn.Module, ids: list[int], device: Any, window: int = 1024, stride: int | None = None,
               progress: Callable[[int], Any] | None = None) -> dict[str, float]:
    """{"perplexity", "nll" (mean, nats/token), "tokens" (scored)} over `ids`."""
    if len(ids) < 2:
        raise QianwenError("perplexity needs at least 2 tokens")
    stride = stride or max(1, window // 2)
    if not 0 < stride <= window:
        raise QianwenError("the stride must be between 1 and the window")
    data = torch.tensor(ids, dtype=torch.long)
    total, count, scored_to = 0.0, 0, 1  # token 0 has no context and is never scored
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        x = data[begin:end].to(device)[None]
        logits = net(x)[0, :-1].float()
        # row r predicts token begin + r + 1; score only the tokens no earlier window scored (with
        # stride == window a window's first token has no context in it and stays unscored, as in transformers)
        first = max(0, scored_to - begin - 1)
        nll = F.cross_entropy(logits[first:], x[0, first + 1:], reduction="sum")
        total += float(nll)
        n = end - begin - 1 - first
        count += n
        if progress is not None:
            progress(n)
        scored_to = end
        if end == len(ids):
            break
    mean = total / count
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": count}
