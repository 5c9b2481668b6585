"""The evaluation tasks: each module of `qianwen/eval/tasks/` registers its tasks here (name, default
shots, metric, run function), so adding a task is adding one module (docs/design.md has the checklist).

This module and the task modules import no torch at the top: the CLI lists the task names for its parser.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import QianwenError


@dataclass
class RunArgs:
    """What `qianwen eval` passes to a task's run function (the options a task doesn't use are ignored)."""

    data: str | None = None  # --data: a file or folder in the task's standard format
    limit: int | None = None
    shots: int = 0  # the task's default when the user gave none
    chat: bool = False
    batch_size: int = 8
    samples: int = 1
    temperature: float = 0.8
    workers: int = 1
    timeout_s: float = 10.0
    window: int | None = None
    stride: int | None = None
    log: Callable[[str], Any] = field(default=print, repr=False)


@dataclass(frozen=True)
class EvalTask:
    name: str
    shots: int  # default few-shot exemplars
    metric: str  # what `score` is: "accuracy", "pass@1", "perplexity"
    # (model, args) -> {"score": float, "n": items, "note": str (optional), ...more for results.json}
    run: Callable[[Any, RunArgs], dict[str, Any]]
    needs_data: str | None = None  # the error when --data is missing (None: the data is fetched)


_TASKS: dict[str, EvalTask] = {}


def register(task: EvalTask) -> EvalTask:
    if task.name in _TASKS:
        raise ValueError(f"eval task {task.name!r} registered twice")
    _TASKS[task.name] = task
    return task


def tasks() -> dict[str, EvalTask]:
    """Every registered task, by name (importing the modules of qianwen/eval/tasks/ on first use)."""
    from . import tasks as package

    for mod in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{mod.name}")
    return _TASKS


def get(name: str) -> EvalTask:
    found = tasks().get(name)
    if found is None:
        raise QianwenError(f"unknown task {name!r}; choose one of {', '.join(tasks())}")
    return found
