"""Run one task on a loaded Model and return the result record (what results.json holds).

The tasks live in qianwen/eval/tasks/, one module each, registered in registry.py."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import QianwenError
from ..generation.params import check_option
from . import registry
from .generate import encode_prompt as _encode_prompt  # noqa: F401  (the names tests and callers used)
from .generate import generate_all  # noqa: F401
from .generate import requests as _requests  # noqa: F401


def check_args(task: str, data: str | None, limit: int | None = None, shots: int | None = None,
               temperature: float | None = None) -> None:
    """The checks that need no model, so that mistakes are reported before a slow load."""
    check_option("temperature", temperature)
    spec = registry.get(task)
    if limit is not None and limit < 1:
        raise QianwenError("--limit must be at least 1")
    if shots is not None and shots < 0:
        raise QianwenError("--shots must be 0 or more")
    if not data and spec.needs_data:
        raise QianwenError(spec.needs_data)
    if data and not any(c in data for c in "*?[") and not Path(data).exists():
        raise QianwenError(f"no such file or folder: {data}")


def run(model: Any, task: str, data: str | None = None, limit: int | None = None, shots: int | None = None,
        chat: bool = False, batch_size: int = 8, samples: int = 1, temperature: float = 0.8,
        workers: int | None = None, timeout_s: float = 10.0, window: int | None = None,
        stride: int | None = None, log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Evaluate `model` on `task`; `limit` is per subject for multiple choice, the first N otherwise."""
    check_args(task, data, limit, shots, temperature)
    spec = registry.get(task)
    args = registry.RunArgs(data=data, limit=limit, shots=spec.shots if shots is None else shots, chat=chat,
                            batch_size=batch_size, samples=samples, temperature=temperature,
                            workers=workers or max(1, min(4, os.cpu_count() or 1)), timeout_s=timeout_s,
                            window=window, stride=stride, log=log)
    t0 = time.time()
    out = spec.run(model, args)
    result = {"task": task, "model": getattr(model, "name", str(model)), "n": out.pop("n"), "shots": args.shots,
              "metric": spec.metric, "score": out.pop("score"), "chat": chat, "limit": limit,
              "wall_s": round(time.time() - t0, 2), "qianwen_version": __version__, "note": out.pop("note", ""),
              "dtype": str(getattr(model, "dtype", "")).replace("torch.", ""), **out}
    return result
