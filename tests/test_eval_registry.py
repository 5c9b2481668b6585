"""Evaluation tasks register themselves: the CLI, the argument checks and the runner find them by name."""

from __future__ import annotations

import pytest

from qianwen.errors import QianwenError
from qianwen.eval import registry, runner


def test_builtin_tasks_and_their_defaults():
    tasks = registry.tasks()
    assert {"mmlu", "cmmlu", "ceval", "gsm8k", "humaneval", "perplexity"} <= set(tasks)
    assert (tasks["mmlu"].shots, tasks["gsm8k"].shots, tasks["humaneval"].shots) == (5, 8, 0)
    assert (tasks["mmlu"].metric, tasks["humaneval"].metric, tasks["perplexity"].metric) == \
        ("accuracy", "pass@1", "perplexity")
    with pytest.raises(QianwenError, match="needs --data"):
        runner.check_args("perplexity", None)
    with pytest.raises(QianwenError, match="unknown task 'nope'; choose one of .*mmlu"):
        runner.check_args("nope", None)


def test_a_new_task_is_one_registration(monkeypatch):
    seen = {}

    def run(model, args):
        seen["args"] = args
        return {"score": 50.0, "n": 2, "note": "toy", "records": [1, 2]}

    monkeypatch.setitem(registry._TASKS, "toy", registry.EvalTask("toy", 3, "accuracy", run))
    res = runner.run(object(), "toy", limit=2, log=lambda _: None)
    assert seen["args"].shots == 3 and seen["args"].limit == 2
    assert (res["task"], res["score"], res["n"], res["metric"], res["note"], res["records"]) == \
        ("toy", 50.0, 2, "accuracy", "toy", [1, 2])
    with pytest.raises(ValueError, match="twice"):
        registry.register(registry.EvalTask("toy", 0, "accuracy", run))


def test_the_cli_offers_every_registered_task():
    import argparse

    from qianwen.cli import eval_cmd

    parser = argparse.ArgumentParser()
    eval_cmd.register(parser.add_subparsers())
    action = next(a for a in parser._subparsers._group_actions[0].choices["eval"]._actions if a.dest == "task")
    assert set(action.choices) == set(registry.tasks())
