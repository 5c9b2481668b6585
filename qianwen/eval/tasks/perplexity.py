"""Perplexity of a text file or token shards, strided sliding window (eval/perplexity.py)."""

from __future__ import annotations

from typing import Any

from ..registry import EvalTask, RunArgs, register


def run(model: Any, args: RunArgs) -> dict[str, Any]:
    from tqdm import tqdm

    from ..perplexity import load_ids, perplexity

    ids = load_ids(str(args.data), model.tokenizer)
    window = min(args.window or 1024, model.context_length)
    with tqdm(total=len(ids) - 1, desc="perplexity", unit="tok") as bar:
        res = perplexity(model.net, ids, model.device, window=window, stride=args.stride, progress=bar.update)
    return {"score": res["perplexity"], "nll": res["nll"], "n": res["tokens"], "window": window,
            "stride": args.stride or max(1, window // 2)}


register(EvalTask("perplexity", 0, "perplexity", run,
                  needs_data="perplexity needs --data: a UTF-8 text file or token shards"))
