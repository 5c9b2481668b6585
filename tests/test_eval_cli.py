"""`qianwen eval` end to end on a tiny checkpoint: results.json, the Markdown table, errors."""

from __future__ import annotations

import json
import os
import random

import pytest

from qianwen import __version__
from qianwen.cli.main import main
from tests.test_eval_mc import write_ceval


def test_ceval_cli_writes_results(tiny_qwen2_dir, tmp_path, capsys):
    # the conftest vocabulary spells "A".."D" as single tokens, as C-Eval's letters need (no space)
    write_ceval(tmp_path / "ceval", random.Random(2))
    out = tmp_path / "res" / "results.json"
    rc = main(["eval", "-m", str(tiny_qwen2_dir), "--task", "ceval", "--data", str(tmp_path / "ceval"),
               "--shots", "1", "--dtype", "float32", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| computer_network | 6 |" in printed and "| logic | 6 |" in printed and "**overall**" in printed
    assert "Qwen-7B 63.5" in printed
    res = json.loads(out.read_text())
    assert res["task"] == "ceval" and res["n"] == 12 and res["shots"] == 1 and res["metric"] == "accuracy"
    assert res["qianwen_version"] == __version__ and res["wall_s"] > 0 and res["model"]
    assert set(res["subjects"]) == {"computer_network", "logic"}
    assert res["score"] == pytest.approx(sum(res["subjects"].values()) / 2)  # C-Eval: mean over subjects


def test_gsm8k_runner_generates(tiny_qwen2_dir, tmp_path):
    import qianwen
    from qianwen.eval import runner

    data = tmp_path / "gsm.jsonl"
    data.write_text("\n".join(json.dumps({"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"})
                              for i in range(3)) + "\n")
    model = qianwen.load(str(tiny_qwen2_dir), dtype="float32", device="cpu")
    res = runner.run(model, "gsm8k", data=str(data), limit=2, shots=2)  # longer than its context: kept end
    assert res["n"] == 2 and len(res["records"]) == 2 and res["shots"] == 2
    for r in res["records"]:  # a random model writes anything, but never past a stop sequence
        assert "\n\n" not in r["completion"] and "Q:" not in r["completion"]
    assert res["score"] == 100.0 * sum(r["correct"] for r in res["records"]) / 2


def test_batched_generation_equals_one_by_one(tiny_qwen2_dir):
    import qianwen
    from qianwen.eval import gsm8k as G
    from qianwen.eval import runner

    model = qianwen.load(str(tiny_qwen2_dir), dtype="float32", device="cpu")
    prompts = [model.tokenizer.encode(G.build_prompt(q, 1)) for q in ("What is 2 + 3?", "How many eggs?", "Why?")]
    one = runner.generate_all(model, prompts, G.STOP, 24, batch_size=1)
    batched = runner.generate_all(model, prompts, G.STOP, 24, batch_size=3)
    assert one == batched and any(one)


@pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox switches users (CI runs as root)")
def test_humaneval_runner_scores_in_sandbox(tiny_qwen2_dir):
    import qianwen
    from qianwen.eval import runner

    model = qianwen.load(str(tiny_qwen2_dir), dtype="float32", device="cpu")
    res = runner.run(model, "humaneval", limit=2, workers=2)
    assert res["n"] == 2 and res["metric"] == "pass@1"
    assert res["score"] == 0.0  # random weights do not write working code
    assert all(r["status"][0] in ("failed", "timeout") for r in res["records"])


@pytest.mark.parametrize("argv,message", [
    (["--task", "cmmlu"], "--data"),
    (["--task", "mmlu", "--limit", "0"], "--limit"),
    (["--task", "perplexity"], "--data"),
    (["--task", "gsm8k", "--data", "/nonexistent/gsm.jsonl"], "no such file"),
    (["--task", "mmlu", "--shots", "-1"], "--shots"),
])
def test_errors_are_one_line(tmp_path, capsys, argv, message):
    # reported before any model is loaded: the model path does not even exist
    rc = main(["eval", "-m", str(tmp_path / "no-model"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err[-1].startswith("error: ") and message in err[-1]
    assert not any("Traceback" in line for line in err)


def test_missing_model_is_one_line(tmp_path, capsys):
    rc = main(["eval", "-m", str(tmp_path / "no-model"), "--task", "gsm8k", "--limit", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err[-1].startswith("error: ")
