"""Results: a Markdown summary (per subject and overall, beside Qwen-7B's published score) and results.json."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

# docs/qwen-facts.md: Qwen-7B (v1.1) and Qwen-7B-Chat (BF16) as published
PUBLISHED = {
    "mmlu": {"Qwen-7B": 58.2, "Qwen-7B-Chat": 55.8},
    "ceval": {"Qwen-7B": 63.5, "Qwen-7B-Chat": 59.7},
    "cmmlu": {"Qwen-7B": 62.2},
    "gsm8k": {"Qwen-7B": 51.7, "Qwen-7B-Chat": 50.3},
    "humaneval": {"Qwen-7B": 29.9, "Qwen-7B-Chat": 37.2},
}


def reference_line(task: str) -> str:
    ref = PUBLISHED.get(task)
    if not ref:
        return ""
    return "Published for reference: " + ", ".join(f"{k} {v:.1f}" for k, v in ref.items())


def markdown(result: dict[str, Any]) -> str:
    """The summary table: one row per subject (where the task has subjects) and the overall score."""
    task, metric = result["task"], result["metric"]
    lines = [f"### {task} ({result['shots']}-shot, {result['n']} items) on {result['model']}", ""]
    subjects = result.get("subjects") or {}
    counts = result.get("subject_counts") or {}
    lines += ["| subject | n | " + metric + " |", "|---|---:|---:|"]
    for s, v in subjects.items():
        lines.append(f"| {s} | {counts.get(s, '')} | {v:.1f} |")
    overall = f"{result['score']:.2f}" if metric != "perplexity" else f"{result['score']:.3f}"
    lines.append(f"| **overall** | {result['n']} | **{overall}** |")
    for k, v in (result.get("scores") or {}).items():
        if k != metric:
            lines.append(f"| {k} | {result['n']} | {v:.2f} |")
    lines.append("")
    ref = reference_line(task)
    if ref:
        lines.append(ref + " (full test sets).")
    if result.get("note"):
        lines.append(f"Note: {result['note']}")
    lines.append(f"Wall time {result['wall_s']:.1f} s, qianwen {result['qianwen_version']}.")
    return "\n".join(lines) + "\n"


def write_json(path: str | Path, result: dict[str, Any]) -> None:
    """Write atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(result, f, ensure_ascii=False, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
