"""HumanEval harness: canonical solutions pass, empty completions fail, pass@k, stop truncation."""

from __future__ import annotations

import math
import os
from itertools import combinations

import pytest

from qianwen.eval import humaneval as H
from qianwen.eval.data import load_humaneval
from qianwen.eval.sandbox import Limits, Sandbox

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox switches users (CI runs as root)")


@pytest.fixture(scope="module")
def problems() -> list[dict]:
    probs = load_humaneval()
    assert len(probs) == 164
    return probs


@needs_root
def test_canonical_solutions_pass_and_empty_fail(problems):
    workers = 4
    sandbox = Sandbox(workers=workers, limits=Limits(timeout_s=20.0, cpu_s=20))
    canon = [[p["canonical_solution"]] for p in problems]
    res = H.execute(problems, canon, sandbox, workers=workers)
    out = H.summarize(problems, canon, res)
    failed = [r["task_id"] for r in out["records"] if not r["passed"][0]]
    assert out["scores"]["pass@1"] == 100.0, failed
    empty = [[""] for _ in problems]
    res = H.execute(problems, empty, sandbox, workers=workers)
    out = H.summarize(problems, empty, res)
    assert out["scores"]["pass@1"] == 0.0
    assert all(r["status"] == ["failed"] for r in out["records"])


@needs_root
def test_wrong_solution_fails_and_samples_give_pass_at_k(problems):
    sandbox = Sandbox(workers=2, limits=Limits(timeout_s=10.0))
    probs = problems[:2]
    comps = [[p["canonical_solution"], "    return None\n", "    while True:\n        pass\n"] for p in probs]
    res = H.execute(probs, comps, sandbox, workers=2, timeout_s=3.0)
    assert [[r.passed for r in rs] for rs in res] == [[True, False, False]] * 2
    assert res[0][2].status == "timeout"
    out = H.summarize(probs, comps, res, ks=(1, 2, 3))
    assert out["scores"]["pass@1"] == pytest.approx(100 / 3)
    assert out["scores"]["pass@2"] == pytest.approx(100 * 2 / 3)
    assert out["scores"]["pass@3"] == pytest.approx(100.0)


def test_pass_at_k_matches_enumeration():
    for n in range(1, 7):
        for c in range(n + 1):
            for k in range(1, n + 1):
                subsets = list(combinations(range(n), k))
                brute = sum(any(i < c for i in s) for s in subsets) / len(subsets)
                assert math.isclose(H.pass_at_k(n, c, k), brute, abs_tol=1e-12)


def test_truncation_and_program(problems):
    body = "    return x + 1\n\n\ndef other():\n    pass\n"
    assert H.truncate_completion(body) == "    return x + 1\n\n"
    assert H.truncate_completion("    return 1\nif __name__ == '__main__':\n") == "    return 1"
    assert H.truncate_completion("    # keep indented comments\n    return 1\n# top level") == \
        "    # keep indented comments\n    return 1"
    p = problems[0]
    prog = H.program(p, p["canonical_solution"])
    assert prog.startswith(p["prompt"] + p["canonical_solution"]) and prog.endswith(f"check({p['entry_point']})\n")
