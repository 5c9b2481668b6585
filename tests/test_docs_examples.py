"""The docs as a user reads them: their shell examples run as written, and every file they or the code's
comments cite is in the repository.

Which examples run, by one rule: every line of a ```bash block in README.md or docs/*.md that starts with
`qianwen` (or pipes into it), in the order the documents show them, in one scratch folder with this
checkout's `qianwen` on the PATH; `NAME=value` lines are kept for the lines after them. A command shown
twice runs once. Answers from `generate` and `chat` are cut at a few tokens unless the line sets
`--max-tokens`. The lines that cannot run here are listed in NOT_RUN with the reason.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# a substring of a documented command -> why the test does not run it
NOT_RUN = {
    "qianwen serve": "runs until stopped (tests/test_server*.py start the server)",
    "~/models/": "a checkpoint the reader has downloaded",
    "qianwen data sample": "fetches corpora from package registries",
    "$S/": "reads the corpus `qianwen data sample` fetches",
    "runs/": "trains for minutes (tests/test_train_*.py cover training)",
    "--task mmlu": "fetches the task data and runs for hours",
    "--task gsm8k": "fetches the task data and runs for hours",
    "--task humaneval": "fetches the task data and runs for hours",
    "--data ceval-exam/": "the reader's copy of C-Eval",
    "--data cmmlu/": "the reader's copy of CMMLU",
    "--data book.txt": "the reader's own text",
    "-m model.gguf": "stands for any GGUF file",
}
SAMPLED = ("generate", "chat")  # commands whose answers are cut at a few tokens here


def bash_lines(doc: Path) -> list[tuple[int, str]]:
    """(line number, logical line) of every ```bash block, continuation lines joined, comments dropped."""
    out, block, pending, start = [], False, "", 0
    for n, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("```"):
            block = line.strip() == "```bash"
            continue
        if not block:
            continue
        if not pending:
            start = n
        text = re.sub(r"\s+#\s.*$", "", line).strip()
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        if (pending + text).strip():
            out.append((start, pending + text))
        pending = ""
    return out


def runs_qianwen(line: str) -> bool:
    return line.startswith("qianwen ") or bool(re.search(r"\|\s*qianwen ", line))


def examples() -> list[tuple[str, str]]:
    """(id, command) in document order; `NAME=value` lines are prefixed to every later command."""
    seen, out, env = set(), [], []
    for doc in DOCS:
        for n, line in bash_lines(doc):
            if re.match(r"^[A-Z_]+=\S+$", line):
                env.append(line)
            elif runs_qianwen(line) and not any(s in line for s in NOT_RUN) and line not in seen:
                seen.add(line)
                out.append((f"{doc.relative_to(ROOT)}:{n}", "; ".join([*env, line])))
    return out


def test_the_rule_picks_the_examples_and_the_skip_list_is_current():
    lines = [line for doc in DOCS for _, line in bash_lines(doc)]
    for pattern in NOT_RUN:
        assert any(pattern in line for line in lines if runs_qianwen(line)), f"NOT_RUN has a stale entry {pattern!r}"
    ran = [cmd for _, cmd in examples()]
    for sub in ("chat", "generate", "info", "convert", "quantize"):
        assert any(re.search(rf"qianwen {sub}\b", cmd) for cmd in ran), sub


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, default_gguf) -> tuple[Path, dict[str, str]]:
    """A scratch folder and an environment whose `qianwen` is this checkout's (the default model cached)."""
    work, bin_dir = tmp_path_factory.mktemp("docs"), tmp_path_factory.mktemp("bin")
    exe = bin_dir / "qianwen"
    exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m qianwen.cli.main "$@"\n')
    exe.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return work, env


@pytest.mark.parametrize("command", [c for _, c in examples()], ids=[i for i, _ in examples()])
def test_example_runs_as_written(command, workdir):
    work, env = workdir
    last = command.rsplit("; ", 1)[-1]
    if re.search(rf"qianwen ({'|'.join(SAMPLED)})\b", last) and "--max-tokens" not in last:
        command += " --max-tokens 8"
    r = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=work, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, f"{command}\n{r.stderr[-2000:]}"
    assert "Traceback" not in r.stderr
    assert r.stdout.strip() or "wrote " in r.stderr, "the example printed nothing"


# ---------------------------------------------------------------------------------------------------------
# Citations: docs and comments name only files that are in the repository.

SCANNED = [ROOT / "README.md", ROOT / "BENCHMARKS.md", ROOT / "pyproject.toml", *sorted((ROOT / "docs").glob("*.md"))]
SCANNED += [p for d in ("qianwen", "tests", "benchmarks") for p in sorted((ROOT / d).rglob("*"))
            if p.suffix in (".py", ".c", ".h", ".js", ".html", ".md", ".toml", ".sh") and p.is_file()]
MD_PATH = re.compile(r"(?<![\w./-])([\w./-]*\w\.md)\b")


def cited(text: str) -> list[str]:
    return MD_PATH.findall(re.sub(r"https?://\S+", "", text))


def test_the_citation_rule_finds_citations():
    assert cited("see docs/conventions.md, README.md and [x](../BENCHMARKS.md)") == \
        ["docs/conventions.md", "README.md", "../BENCHMARKS.md"]
    assert cited("files .txt/.md, https://github.com/QwenLM/Qwen/blob/main/README.md") == []


@pytest.mark.parametrize("path", SCANNED, ids=[str(p.relative_to(ROOT)) for p in SCANNED])
def test_cited_markdown_files_exist(path):
    text = path.read_text(encoding="utf-8", errors="replace")
    assert not re.search(r"shared/+reference", text), "cites a folder outside the repository"
    missing = [c for c in cited(text) if not (ROOT / c).is_file() and not (path.parent / c).is_file()]
    assert not missing, f"cites files that are not in the repository: {missing}"
