"""Prompts and completions for the generating tasks: token-id prompts through the engine (or one by one)."""

from __future__ import annotations

from typing import Any

from tqdm import tqdm

from ..generation.params import plain_options


def encode_prompt(model: Any, text: str, chat: bool, reply_prefix: str = "") -> list[int]:
    tok = model.tokenizer
    if chat:
        ids = model.encode_chat([{"role": "user", "content": text}])
        return ids + (tok.encode(reply_prefix) if reply_prefix else [])
    bos = [tok.bos_id] if getattr(tok, "add_bos", False) and tok.bos_id is not None else []
    return bos + tok.encode(text)


def requests(model: Any, prompts: list[list[int]], stop: list[str], max_tokens: int, temperature: float,
             seeds: list[int | None]) -> list[dict[str, Any]]:
    # a prompt longer than the context keeps its end (as Qwen's scripts do), leaving room to answer
    keep = max(1, model.context_length - min(max_tokens, model.context_length // 2))
    # benchmark decoding: plain greedy (or plain temperature sampling), every other sampling option off
    plain = plain_options()
    return [{**plain, "prompt": ids[-keep:], "max_tokens": max_tokens, "temperature": temperature,
             "stop": list(stop), "seed": seed} for ids, seed in zip(prompts, seeds, strict=True)]


def generate_all(model: Any, prompts: list[list[int]], stop: list[str], max_tokens: int, temperature: float = 0.0,
                 seeds: list[int | None] | None = None, batch_size: int = 8, desc: str = "generate",
                 stats: dict[str, Any] | None = None) -> list[str]:
    """Completions of token-id prompts: batched through the continuous-batching engine (which keeps each
    sequence's tokens independent of its neighbours, and reuses the few-shot prefix the prompts share
    through its prefix cache), or one by one with `model.stream_tokens`. `stats` receives the engine's
    prefix cache counts."""
    reqs = requests(model, prompts, stop, max_tokens, temperature, seeds or [None] * len(prompts))
    if batch_size > 1:
        from ..engine import LLM, EngineConfig

        llm = LLM(model, EngineConfig(max_num_seqs=batch_size))
        with tqdm(total=len(reqs), desc=desc, unit="req") as bar:
            out = []
            for s in range(0, len(reqs), 4 * batch_size):  # chunks, so the bar moves
                out += [c.text for c in llm.generate(reqs[s: s + 4 * batch_size])]
                bar.update(min(4 * batch_size, len(reqs) - s))
        if stats is not None:
            stats.update(llm.engine.prefix_cache_stats())
        return out
    texts = []
    for r in tqdm(reqs, desc=desc, unit="req"):
        options = {k: v for k, v in r.items() if k != "prompt"}
        texts.append("".join(step.text for step in model.stream_tokens(r["prompt"], model.params(**options))))
    return texts
