"""Run one task on a loaded Model and return the result record (what results.json holds)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from .. import __version__
from ..errors import QianwenError
from ..generation.params import check_option, plain_options
from . import data as D

if TYPE_CHECKING:
    from ..api import Model  # the loaded model (type only: no upward import at run time)

TASKS = ("mmlu", "cmmlu", "ceval", "gsm8k", "humaneval", "perplexity")
DEFAULT_SHOTS = {"mmlu": 5, "cmmlu": 5, "ceval": 5, "gsm8k": 8, "humaneval": 0, "perplexity": 0}
METRIC = {"mmlu": "accuracy", "cmmlu": "accuracy", "ceval": "accuracy", "gsm8k": "accuracy",
          "humaneval": "pass@1", "perplexity": "perplexity"}


def _requests(model: Model, prompts: list[list[int]], stop: list[str], max_tokens: int, temperature: float,
              seeds: list[int | None]) -> list[dict[str, Any]]:
    # a prompt longer than the context keeps its end (as Qwen's scripts do), leaving room to answer
    keep = max(1, model.context_length - min(max_tokens, model.context_length // 2))
    # benchmark decoding: plain greedy (or plain temperature sampling), every other sampling option off
    plain = plain_options()
    return [{**plain, "prompt": ids[-keep:], "max_tokens": max_tokens, "temperature": temperature,
             "stop": list(stop), "seed": seed} for ids, seed in zip(prompts, seeds, strict=True)]


def generate_all(model: Model, prompts: list[list[int]], stop: list[str], max_tokens: int, temperature: float = 0.0,
                 seeds: list[int | None] | None = None, batch_size: int = 8, desc: str = "generate") -> list[str]:
    """Completions of token-id prompts: batched through the continuous-batching engine (which keeps each
    sequence's tokens independent of its neighbours), or one by one with `model.stream_tokens`."""
    reqs = _requests(model, prompts, stop, max_tokens, temperature, seeds or [None] * len(prompts))
    if batch_size > 1:
        from ..engine import LLM, EngineConfig

        llm = LLM(model, EngineConfig(max_num_seqs=batch_size))
        with tqdm(total=len(reqs), desc=desc, unit="req") as bar:
            out = []
            for s in range(0, len(reqs), 4 * batch_size):  # chunks, so the bar moves
                out += [c.text for c in llm.generate(reqs[s: s + 4 * batch_size])]
                bar.update(min(4 * batch_size, len(reqs) - s))
        return out
    texts = []
    for r in tqdm(reqs, desc=desc, unit="req"):
        options = {k: v for k, v in r.items() if k != "prompt"}
        texts.append("".join(step.text for step in model.stream_tokens(r["prompt"], model.params(**options))))
    return texts


def _encode_prompt(model: Model, text: str, chat: bool, reply_prefix: str = "") -> list[int]:
    tok = model.tokenizer
    if chat:
        ids = model.encode_chat([{"role": "user", "content": text}])
        return ids + (tok.encode(reply_prefix) if reply_prefix else [])
    bos = [tok.bos_id] if getattr(tok, "add_bos", False) and tok.bos_id is not None else []
    return bos + tok.encode(text)


def run_multiple_choice(model: Model, task: D.MCTask, shots: int, limit: int | None, chat: bool,
                        batch_size: int) -> dict[str, Any]:
    from . import multiple_choice as MC

    items = MC.stratified_sample(task, limit)
    prompts = MC.build_prompts(task, items, lambda text: _encode_prompt(model, text.rstrip() if chat else text, chat),
                               shots)
    letters = MC.letter_token_ids(model.tokenizer, task.language, chat)
    pad = model.tokenizer.pad_id if model.tokenizer.pad_id is not None else 0
    with tqdm(total=len(prompts), desc=task.name, unit="q") as bar:
        lps = MC.score_prompts(model.net, prompts, letters, model.device, batch_size=batch_size,
                               max_len=model.context_length, pad_id=pad, progress=bar)
    out = MC.summarize(task, items, lps)
    out["n"] = len(items)
    return out


def run_gsm8k(model: Model, rows: list[dict], shots: int, chat: bool, batch_size: int) -> dict[str, Any]:
    from . import gsm8k as G

    prompts = [_encode_prompt(model, G.build_prompt(r["question"], shots), chat) for r in rows]
    completions = generate_all(model, prompts, G.STOP, G.MAX_TOKENS, batch_size=batch_size, desc="gsm8k")
    records, correct = [], 0
    for r, completion in zip(rows, completions, strict=True):
        ok = G.is_correct(completion, r["answer"])
        correct += ok
        pred = G.extract_prediction(G.truncate_completion(completion))
        records.append({"question": r["question"], "completion": completion, "pred": str(pred),
                        "gold": str(G.extract_reference(r["answer"])), "correct": ok})
    return {"score": 100.0 * correct / max(1, len(rows)), "n": len(rows), "records": records}


def run_humaneval(model: Model, problems: list[dict], chat: bool, samples: int, temperature: float,
                  workers: int, timeout_s: float, batch_size: int) -> dict[str, Any]:
    from . import humaneval as H
    from .sandbox import Limits, Sandbox

    sandbox = Sandbox(workers=workers, limits=Limits(timeout_s=timeout_s, cpu_s=int(timeout_s) + 1))
    temp = temperature if samples > 1 else 0.0
    prompts = []
    for p in problems:
        if chat:
            ids = _encode_prompt(model, H.CHAT_INSTRUCTION + p["prompt"], True, "```python\n" + p["prompt"])
        else:
            ids = _encode_prompt(model, p["prompt"], False)
        prompts += [ids] * samples
    seeds = [s for _ in problems for s in range(samples)] if samples > 1 else None
    flat = generate_all(model, prompts, H.STOP, H.MAX_TOKENS, temp, seeds, batch_size, desc="humaneval generate")
    completions = [[H.truncate_completion(t) for t in flat[i * samples:(i + 1) * samples]] for i in range(len(problems))]
    with tqdm(total=len(problems) * samples, desc="humaneval execute", unit="prog") as bar:
        results = H.execute(problems, completions, sandbox, workers=workers, progress=bar.update)
    ks = [k for k in (1, 10, 100) if k <= samples]
    out = H.summarize(problems, completions, results, ks)
    out["n"] = len(problems)
    return out


def run_perplexity(model: Model, path: str, window: int | None, stride: int | None) -> dict[str, Any]:
    from .perplexity import load_ids, perplexity

    ids = load_ids(path, model.tokenizer)
    window = min(window or 1024, model.context_length)
    with tqdm(total=len(ids) - 1, desc="perplexity", unit="tok") as bar:
        res = perplexity(model.net, ids, model.device, window=window, stride=stride, progress=bar.update)
    return {"score": res["perplexity"], "nll": res["nll"], "n": res["tokens"], "window": window,
            "stride": stride or max(1, window // 2)}


def check_args(task: str, data: str | None, limit: int | None = None, shots: int | None = None,
               temperature: float | None = None) -> None:
    """The checks that need no model, so that mistakes are reported before a slow load."""
    check_option("temperature", temperature)
    if task not in TASKS:
        raise QianwenError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if limit is not None and limit < 1:
        raise QianwenError("--limit must be at least 1")
    if shots is not None and shots < 0:
        raise QianwenError("--shots must be 0 or more")
    if not data and task in ("cmmlu", "ceval"):
        raise QianwenError(f"{task} data is not available from any registry here: pass --data FOLDER "
                           f"in the published {task} layout")
    if not data and task == "perplexity":
        raise QianwenError("perplexity needs --data: a UTF-8 text file or token shards")
    if data and not any(c in data for c in "*?[") and not Path(data).exists():
        raise QianwenError(f"no such file or folder: {data}")


def run(model: Model, task: str, data: str | None = None, limit: int | None = None, shots: int | None = None,
        chat: bool = False, batch_size: int = 8, samples: int = 1, temperature: float = 0.8,
        workers: int | None = None, timeout_s: float = 10.0, window: int | None = None,
        stride: int | None = None, log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Evaluate `model` on `task`; `limit` is per subject for multiple choice, the first N otherwise."""
    check_args(task, data, limit, shots, temperature)
    shots = DEFAULT_SHOTS[task] if shots is None else shots
    t0 = time.time()
    note = ""
    if task in ("mmlu", "cmmlu", "ceval"):
        mc = {"mmlu": D.load_mmlu, "cmmlu": D.load_cmmlu, "ceval": D.load_ceval}[task](data)
        note = mc.note
        if note:
            log(f"note: {note}")
        out = run_multiple_choice(model, mc, shots, limit, chat, batch_size)
        if limit is not None:
            note = (note + "; " if note else "") + f"a fixed seeded sample of up to {limit} questions per subject"
    elif task == "gsm8k":
        rows = D.load_gsm8k(data)
        out = run_gsm8k(model, rows[:limit] if limit else rows, shots, chat, batch_size)
    elif task == "humaneval":
        probs = D.load_humaneval(data)
        out = run_humaneval(model, probs[:limit] if limit else probs, chat, samples, temperature,
                            workers or max(1, min(4, os.cpu_count() or 1)), timeout_s, batch_size)
    else:
        out = run_perplexity(model, str(data), window, stride)
    result = {"task": task, "model": getattr(model, "name", str(model)), "n": out.pop("n"), "shots": shots,
              "metric": METRIC[task], "score": out.pop("score"), "chat": chat, "limit": limit,
              "wall_s": round(time.time() - t0, 2), "qianwen_version": __version__, "note": note,
              "dtype": str(getattr(model, "dtype", "")).replace("torch.", ""), **out}
    return result
