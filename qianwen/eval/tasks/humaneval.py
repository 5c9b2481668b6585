"""HumanEval: complete the function, run the tests in the sandbox, pass@k (eval/humaneval.py)."""

from __future__ import annotations

from typing import Any

from ..registry import EvalTask, RunArgs, register


def run(model: Any, args: RunArgs) -> dict[str, Any]:
    from tqdm import tqdm

    from .. import data as D
    from .. import humaneval as H
    from ..generate import encode_prompt, generate_all
    from ..sandbox import Limits, Sandbox

    problems = D.load_humaneval(args.data)
    problems = problems[:args.limit] if args.limit else problems
    samples, workers = args.samples, args.workers
    sandbox = Sandbox(workers=workers, limits=Limits(timeout_s=args.timeout_s, cpu_s=int(args.timeout_s) + 1))
    temp = args.temperature if samples > 1 else 0.0
    prompts = []
    for p in problems:
        if args.chat:
            ids = encode_prompt(model, H.CHAT_INSTRUCTION + p["prompt"], True, "```python\n" + p["prompt"])
        else:
            ids = encode_prompt(model, p["prompt"], False)
        prompts += [ids] * samples
    seeds = [s for _ in problems for s in range(samples)] if samples > 1 else None
    flat = generate_all(model, prompts, H.STOP, H.MAX_TOKENS, temp, seeds, args.batch_size, desc="humaneval generate")
    completions = [[H.truncate_completion(t) for t in flat[i * samples:(i + 1) * samples]] for i in range(len(problems))]
    with tqdm(total=len(problems) * samples, desc="humaneval execute", unit="prog") as bar:
        results = H.execute(problems, completions, sandbox, workers=workers, progress=bar.update)
    ks = [k for k in (1, 10, 100) if k <= samples]
    out = H.summarize(problems, completions, results, ks)
    out["n"] = len(problems)
    return out


register(EvalTask("humaneval", 0, "pass@1", run))
