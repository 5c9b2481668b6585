"""MMLU, CMMLU and C-Eval: next-token log-probs of the answer letters (eval/multiple_choice.py)."""

from __future__ import annotations

from typing import Any

from ..registry import EvalTask, RunArgs, register

# the engine's size for scoring: many questions' rows a step (measured on the default model, MMLU 5-shot
# --limit 5, 2 threads: 31.8 s with these, 34.0 s with the offline defaults 16 / 512)
ENGINE_SEQS = 64
ENGINE_PREFILL_TOKENS = 2048


def run(model: Any, task_name: str, args: RunArgs) -> dict[str, Any]:
    from tqdm import tqdm

    from ...engine import LLM, EngineConfig
    from .. import data as D
    from .. import multiple_choice as MC
    from ..generate import encode_prompt

    task = {"mmlu": D.load_mmlu, "cmmlu": D.load_cmmlu, "ceval": D.load_ceval}[task_name](args.data)
    note = task.note
    if note:
        args.log(f"note: {note}")
    items = MC.stratified_sample(task, args.limit)
    prompts = MC.build_prompts(task, items, lambda text: encode_prompt(model, text.rstrip() if args.chat else text,
                                                                        args.chat), args.shots)
    letters = MC.letter_token_ids(model.tokenizer, task.language, args.chat)
    # on the CPU kernels the engine scores (prefix cache, packed rows); elsewhere score_prompts' torch forwards
    llm = LLM(model, EngineConfig(max_num_seqs=ENGINE_SEQS, max_prefill_tokens=ENGINE_PREFILL_TOKENS))
    with tqdm(total=len(prompts), desc=task.name, unit="q") as bar:
        if llm.engine.runner.rows:
            lps = MC.score_with_engine(llm, prompts, letters, max_len=model.context_length, progress=bar)
        else:
            lps = MC.score_prompts(model.net, prompts, letters, model.device, batch_size=args.batch_size,
                                   max_len=model.context_length, progress=bar)
    out = MC.summarize(task, items, lps)
    out["n"] = len(items)
    if args.limit is not None:
        note = (note + "; " if note else "") + f"a fixed seeded sample of up to {args.limit} questions per subject"
    out["note"] = note
    return out


def _task(name: str, needs_data: str | None = None) -> EvalTask:
    return register(EvalTask(name, 5, "accuracy", lambda model, args: run(model, name, args), needs_data))


_task("mmlu")
for _name in ("cmmlu", "ceval"):
    _task(_name, f"{_name} data is not available from any registry here: pass --data FOLDER in the published "
                 f"{_name} layout")
