"""Multiple-choice scoring (MMLU, CMMLU, C-Eval): compare next-token log-probs of the answer letters.

Prompts follow Qwen's evaluate_mmlu.py / evaluate_ceval.py (and lm-eval-harness's MMLU format):
English: a header, k exemplars "Question: ...\\nA. ...\\n...\\nAnswer: B\\n\\n", then the question ending
"Answer:"; the candidates are the tokens " A" .. " D" (with the space, as the model would continue).
Chinese: "问题：...\\n答案：" and the letters without a space.

The header and exemplars are the same for every question of a subject: they run once through the
model into a `PrefixCache`, and batches of questions (right-padded) attend to it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import QianwenError
from ..models.cache import causal_attention
from .data import LETTERS, MCItem, MCTask

HEADERS = {
    "mmlu": "The following are multiple choice questions (with answers) about {subject}.\n\n",
    "cmmlu": "以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n",
    "ceval": "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n",
}
ANSWER_TAIL = {"en": ("Question: ", "\nAnswer:", " "), "zh": ("问题：", "\n答案：", "")}


def format_item(item: MCItem, language: str, with_answer: bool) -> str:
    q_prefix, tail, sep = ANSWER_TAIL[language]
    text = q_prefix + item.question.strip()
    for letter, choice in zip(LETTERS, item.choices, strict=True):
        text += f"\n{letter}. {str(choice).strip()}"
    text += tail
    return text + (f"{sep}{item.answer}\n\n" if with_answer else "")


def few_shot_prefix(task: MCTask, item: MCItem, shots: int) -> str:
    header = HEADERS.get(task.name, HEADERS["mmlu"]).format(subject=task.subject_name(item.subject))
    return header + "".join(format_item(x, task.language, True) for x in task.exemplars_for(item, shots))


def letter_token_ids(tokenizer: Any, language: str, chat: bool = False) -> list[int]:
    """The token the model emits for each letter right after the prompt's tail ("Answer:" + " A");
    through a chat template the letter starts the reply, so it has no space."""
    _, tail, sep = ANSWER_TAIL[language]
    if chat:
        tail, sep = "", ""
    base = tokenizer.encode(tail) if tail else []
    ids = []
    for letter in LETTERS:
        full = tokenizer.encode(tail + sep + letter)
        if full[: len(base)] != base or len(full) != len(base) + 1:
            raise QianwenError(f"this tokenizer does not spell {sep + letter!r} after {tail!r} as one token")
        ids.append(full[-1])
    if len(set(ids)) != 4:
        raise QianwenError("the answer letters do not map to four distinct tokens")
    return ids


def stratified_sample(task: MCTask, per_subject: int | None, seed: int = 1234) -> list[MCItem]:
    """All test items, or a fixed seeded sample of `per_subject` per subject (in subject, file order)."""
    out = []
    for subject, items in task.test.items():
        if per_subject is None or per_subject >= len(items):
            out.extend(items)
        else:
            rng = random.Random(f"{seed}:{task.name}:{subject}")
            out.extend(sorted(rng.sample(items, per_subject), key=lambda x: x.index))
    return out


class PrefixCache:
    """Cache interface: first records a shared prefix (batch 1), then serves it to batches of suffixes."""

    def __init__(self) -> None:
        self.extra: dict[str, Any] = {}
        self._k: dict[int, torch.Tensor] = {}
        self._v: dict[int, torch.Tensor] = {}
        self.recording = True

    @property
    def length(self) -> int:
        return 0 if self.recording or not self._k else self._k[0].shape[2]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.recording:
            self._k[layer], self._v[layer] = k, v
            return causal_attention(q, k, v)
        pk, pv = self._k[layer], self._v[layer]
        b = q.shape[0]
        keys = torch.cat([pk.expand(b, -1, -1, -1), k], dim=2)
        vals = torch.cat([pv.expand(b, -1, -1, -1), v], dim=2)
        return causal_attention(q, keys, vals, past=pk.shape[2])


@dataclass
class Prompt:
    prefix: list[int]  # shared by a group of questions
    suffix: list[int]
    item: MCItem


def _last_logprobs(net: torch.nn.Module, hidden: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    rows = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return F.log_softmax(net.compute_logits(rows), dim=-1)


@torch.inference_mode()
def score_prompts(net: torch.nn.Module, prompts: list[Prompt], letter_ids: list[int], device: Any,
                  batch_size: int = 8, max_len: int | None = None, pad_id: int = 0,
                  progress: Any = None) -> list[list[float]]:
    """Log-probs of the four letter tokens after each prompt (prefix + suffix)."""
    out: list[list[float] | None] = [None] * len(prompts)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(tuple(p.prefix), []).append(i)
    letters = torch.tensor(letter_ids, device=device)
    for prefix, idx in groups.items():
        fits = [i for i in idx if max_len is None or len(prefix) + len(prompts[i].suffix) <= max_len]
        for i in idx:
            if i not in fits:  # too long to share the prefix: keep the last max_len tokens, alone
                ids = (list(prefix) + prompts[i].suffix)[-max_len:]  # type: ignore[index]
                h = net.hidden_states(torch.tensor([ids], device=device))
                out[i] = _last_logprobs(net, h, torch.tensor([len(ids) - 1], device=device))[0, letters].tolist()
                if progress is not None:
                    progress.update(1)
        if not fits:
            continue
        cache = PrefixCache()
        if prefix:
            net.hidden_states(torch.tensor([prefix], device=device), cache=cache)
        cache.recording = False
        for s in range(0, len(fits), batch_size):
            chunk = fits[s: s + batch_size]
            lens = [len(prompts[i].suffix) for i in chunk]
            ids = torch.full((len(chunk), max(lens)), pad_id, dtype=torch.long)
            for r, i in enumerate(chunk):
                ids[r, : lens[r]] = torch.tensor(prompts[i].suffix)
            # right padding: each row's last real token never sees the pads after it
            h = net.hidden_states(ids.to(device), cache=cache if prefix else None)
            lp = _last_logprobs(net, h, torch.tensor(lens, device=device) - 1)[:, letters]
            for r, i in enumerate(chunk):
                out[i] = lp[r].tolist()
            if progress is not None:
                progress.update(len(chunk))
    return out  # type: ignore[return-value]


def build_prompts(task: MCTask, items: list[MCItem], encode: Callable[[str], list[int]],
                  shots: int) -> list[Prompt]:
    """Token ids for each question, split into a part shared with its subject's other questions and its own.

    `encode(text)` gives the model's input for a whole prompt (raw, or wrapped in the chat template).
    Each prompt is tokenized whole, exactly as the reference scripts do; the shared part is the longest
    run of leading tokens it has in common with the tokenized few-shot prefix (tokenizers such as
    GPT-2's split "\n\nQuestion" differently from "\n\n" + "Question", so the text boundary can't be used).
    """
    full: list[list[int]] = []
    pre_ids: dict[str, list[int]] = {}
    shared: dict[str, int] = {}
    keys = []
    for it in items:
        pre_text = few_shot_prefix(task, it, shots)
        ids = encode(pre_text + format_item(it, task.language, False))
        if pre_text not in pre_ids:
            pre_ids[pre_text] = encode(pre_text)
        pre = pre_ids[pre_text]
        n = 0
        while n < min(len(pre), len(ids) - 1) and pre[n] == ids[n]:
            n += 1
        shared[pre_text] = min(shared.get(pre_text, n), n)
        full.append(ids)
        keys.append(pre_text)
    return [Prompt(ids[: shared[k]], ids[shared[k]:], it) for it, ids, k in zip(items, full, keys, strict=True)]


def summarize(task: MCTask, items: list[MCItem], logprobs: list[list[float]]) -> dict[str, Any]:
    per: dict[str, list[int]] = {}
    records = []
    for it, lp in zip(items, logprobs, strict=True):
        pred = LETTERS[max(range(4), key=lambda j: lp[j])]
        per.setdefault(it.subject, []).append(int(pred == it.answer))
        records.append({"subject": it.subject, "index": it.index, "answer": it.answer, "pred": pred,
                        "logprobs": [round(x, 5) if math.isfinite(x) else x for x in lp]})
    subj = {s: 100.0 * sum(v) / len(v) for s, v in per.items()}
    micro = 100.0 * sum(sum(v) for v in per.values()) / max(1, len(items))
    macro = sum(subj.values()) / max(1, len(subj))
    # Qwen's scripts: MMLU/CMMLU average over questions, C-Eval over subjects
    score = macro if task.name == "ceval" else micro
    return {"score": score, "micro": micro, "macro": macro, "subjects": subj,
            "subject_counts": {s: len(v) for s, v in per.items()}, "records": records}
