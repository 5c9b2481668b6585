"""Multiple-choice scoring (MMLU, CMMLU, C-Eval): compare next-token log-probs of the answer letters.

Prompts follow Qwen's evaluate_mmlu.py / evaluate_ceval.py (and lm-eval-harness's MMLU format):
English: a header, k exemplars "Question: ...\\nA. ...\\n...\\nAnswer: B\\n\\n", then the question ending
"Answer:"; the candidates are the tokens " A" .. " D" (with the space, as the model would continue).
Chinese: "问题：...\\n答案：" and the letters without a space.

The header and exemplars are the same for every question of a subject: they run once through the
model and the subject's questions attend to their keys and values. On the CPU kernels that is the serving
engine (`score_with_engine`: its prefix cache, its packed rows, the arithmetic of generation); elsewhere
`score_prompts` packs prefixes and questions into torch forwards itself (`PackedCache`).
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
from ..models.cache import attention_lse, blocked_causal_attention, merge_attention
from .data import LETTERS, MCItem, MCTask

HEADERS = {
    "mmlu": "The following are multiple choice questions (with answers) about {subject}.\n\n",
    "cmmlu": "以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n",
    "ceval": "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n",
}
PACK_TOKENS = 2048  # tokens per forward when scoring: past this, a bigger matmul gains little
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


@dataclass
class Segment:
    """A run of tokens in a packed forward: a shared prefix (kept as number `keep` for the questions that
    follow it) or a question's own tokens (attending to kept prefix number `prefix`, if any)."""

    start: int  # offset in the packed row
    end: int
    prefix: int | None = None
    keep: int | None = None


class PackedCache:
    """Cache interface for one forward over segments packed into one row (no padding): each segment
    attends causally to itself and, if it continues a prefix, to all of that prefix's kept keys and values
    (one flash call for the queries of every segment of the prefix, merged with each segment's causal
    part by log-sum-exp). A prefix segment keeps its keys and values in `store` for later segments, in
    this forward (layer by layer, it comes first) or later ones. The caller passes the positions."""

    def __init__(self, segments: list[Segment], store: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]]):
        self.extra: dict[str, Any] = {}
        self.store = store
        self.runs: list[list[Segment]] = []  # consecutive segments continuing the same prefix
        for seg in segments:
            if self.runs and seg.prefix is not None and self.runs[-1][-1].prefix == seg.prefix:
                self.runs[-1].append(seg)
            else:
                self.runs.append([seg])

    @property
    def length(self) -> int:
        return 0

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(q)
        for run in self.runs:
            lo, hi, prefix = run[0].start, run[-1].end, run[0].prefix
            if prefix is not None:
                pk, pv = self.store[prefix][layer]
                o1, lse1 = attention_lse(q[:, :, lo:hi], pk, pv, causal=False)
            for seg in run:
                s, e = seg.start, seg.end
                if prefix is None:
                    out[:, :, s:e] = blocked_causal_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e])
                else:
                    o2, lse2 = attention_lse(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], causal=True)
                    out[:, :, s:e] = merge_attention(o1[:, :, s - lo:e - lo], lse1[:, :, s - lo:e - lo], o2, lse2)
                if seg.keep is not None:
                    self.store.setdefault(seg.keep, {})[layer] = (k[:, :, s:e].contiguous(), v[:, :, s:e].contiguous())
        return out


@dataclass
class Prompt:
    prefix: list[int]  # shared by a group of questions
    suffix: list[int]
    item: MCItem


@dataclass
class _Piece:
    ids: list[int]
    first: int  # position of its first token
    prefix: int | None = None  # the kept prefix it continues
    keep: int | None = None  # a prefix: kept under this number
    question: int | None = None  # a question: its index in the prompts


def _pieces(prompts: list[Prompt], max_len: int | None) -> tuple[list[_Piece], dict[int, int]]:
    """Each distinct prefix once, followed by its questions; and for each prefix, the index of the
    piece of its last question (after which its keys and values can go)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(tuple(p.prefix), []).append(i)
    pieces: list[_Piece] = []
    last_use: dict[int, int] = {}
    for g, (prefix, idx) in enumerate(groups.items()):
        for i in idx:
            if max_len is not None and len(prefix) + len(prompts[i].suffix) > max_len:
                # too long to share the prefix: keep the last max_len tokens, alone
                pieces.append(_Piece((list(prefix) + prompts[i].suffix)[-max_len:], 0, question=i))
            elif not prefix:
                pieces.append(_Piece(prompts[i].suffix, 0, question=i))
            else:
                if g not in last_use:
                    pieces.append(_Piece(list(prefix), 0, keep=g))
                last_use[g] = len(pieces)
                pieces.append(_Piece(prompts[i].suffix, len(prefix), prefix=g, question=i))
    return pieces, last_use


@torch.inference_mode()
def score_with_engine(llm: Any, prompts: list[Prompt], letter_ids: list[int], max_len: int | None = None,
                      progress: Any = None) -> list[list[float]]:
    """Log-probs of the four letter tokens after each prompt, from the first-token logits of the engine
    `llm` (qianwen.engine.LLM: raw logits, no penalty). The first question of each shared prefix runs
    first and the rest after, so they find the prefix in the engine's prefix cache; a prompt longer than
    `max_len` - 1 keeps its last tokens (as `score_prompts`)."""
    out: list[list[float] | None] = [None] * len(prompts)
    letters = torch.tensor(letter_ids)

    def capture(i: int) -> Callable[[list[int], list[int], torch.Tensor], torch.Tensor]:
        def keep(prompt_ids: list[int], output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
            out[i] = F.log_softmax(logits.float(), dim=-1)[letters].tolist()
            if progress is not None:
                progress.update(1)
            return logits
        return keep

    first: list[dict[str, Any]] = []
    rest: list[dict[str, Any]] = []
    seen: set[tuple[int, ...]] = set()
    for i, p in enumerate(prompts):
        ids = p.prefix + p.suffix
        ids = ids[-(max_len - 1):] if max_len is not None and len(ids) >= max_len else ids
        (rest if tuple(p.prefix) in seen else first).append(
            {"prompt": ids, "max_tokens": 1, "temperature": 0.0, "repetition_penalty": 1.0,
             "presence_penalty": 0.0, "frequency_penalty": 0.0, "logits_processors": [capture(i)]})
        seen.add(tuple(p.prefix))
    for wave in (first, rest):
        for c in llm.generate(wave):
            if c.finish_reason == "error":
                raise QianwenError(f"scoring failed: {c.error}")
    return out  # type: ignore[return-value]


def score_prompts(net: torch.nn.Module, prompts: list[Prompt], letter_ids: list[int], device: Any,
                  batch_size: int = 8, max_len: int | None = None, progress: Any = None,
                  tokens: int = PACK_TOKENS) -> list[list[float]]:
    """Log-probs of the four letter tokens after each prompt (prefix + suffix).

    Each distinct prefix runs once and its questions attend to it. Prefixes and questions are packed one
    after another into forwards of one row, of up to `tokens` tokens (a longer prefix or question gets a
    forward of its own) and `batch_size` questions, so every projection is one matmul over real tokens."""
    out: list[list[float] | None] = [None] * len(prompts)
    letters = torch.tensor(letter_ids, device=device)
    pieces, last_use = _pieces(prompts, max_len)
    store: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    start = 0
    while start < len(pieces):
        end, n_tok, n_q = start, 0, 0
        while end < len(pieces) and (end == start or (n_tok + len(pieces[end].ids) <= tokens
                                                      and n_q + (pieces[end].question is not None) <= batch_size)):
            n_tok += len(pieces[end].ids)
            n_q += pieces[end].question is not None
            end += 1
        ids: list[int] = []
        positions: list[int] = []
        segments, rows, questions = [], [], []
        for piece in pieces[start:end]:
            segments.append(Segment(len(ids), len(ids) + len(piece.ids), piece.prefix, piece.keep))
            ids += piece.ids
            positions += range(piece.first, piece.first + len(piece.ids))
            if piece.question is not None:
                rows.append(len(ids) - 1)
                questions.append(piece.question)
        h = net.hidden_states(torch.tensor([ids], device=device), torch.tensor([positions], device=device),
                              PackedCache(segments, store))
        if rows:  # (none when the forward holds only a prefix)
            lp = F.log_softmax(net.compute_logits(h[0, torch.tensor(rows, device=device)]), dim=-1)[:, letters]
            for r, i in enumerate(questions):
                out[i] = lp[r].tolist()
        for g in [g for g in store if last_use[g] < end]:
            del store[g]
        if progress is not None:
            progress.update(len(questions))
        start = end
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
