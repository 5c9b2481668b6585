"""GSM8K: 8-shot chain of thought, greedy, exact numeric answer (eval/gsm8k.py)."""

from __future__ import annotations

from typing import Any

from ..registry import EvalTask, RunArgs, register


def run(model: Any, args: RunArgs) -> dict[str, Any]:
    from .. import data as D
    from .. import gsm8k as G
    from ..generate import encode_prompt, generate_all

    rows = D.load_gsm8k(args.data)
    rows = rows[:args.limit] if args.limit else rows
    prompts = [encode_prompt(model, G.build_prompt(r["question"], args.shots), args.chat) for r in rows]
    stats: dict[str, Any] = {}
    completions = generate_all(model, prompts, G.STOP, G.MAX_TOKENS, batch_size=args.batch_size, desc="gsm8k",
                               stats=stats)
    records, correct = [], 0
    for r, completion in zip(rows, completions, strict=True):
        ok = G.is_correct(completion, r["answer"])
        correct += ok
        pred = G.extract_prediction(G.truncate_completion(completion))
        records.append({"question": r["question"], "completion": completion, "pred": str(pred),
                        "gold": str(G.extract_reference(r["answer"])), "correct": ok})
    out: dict[str, Any] = {"score": 100.0 * correct / max(1, len(rows)), "n": len(rows), "records": records}
    if stats:
        out["prefix_cache_hit_rate"] = round(stats["hit_rate"], 4)
    return out


register(EvalTask("gsm8k", 8, "accuracy", run))
