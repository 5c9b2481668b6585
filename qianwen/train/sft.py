"""`qianwen train sft`: supervised fine-tuning on conversations, full or LoRA.

Input formats (JSON list or JSONL, detected per record):
- Qwen's own: `{"id", "conversations": [{"from": "system"|"user"|"assistant", "value"}]}`
  (`human`/`gpt` accepted as ShareGPT spellings);
- OpenAI: `{"messages": [{"role", "content"}]}`;
- Alpaca: `{"instruction", "input", "output"}` (+ optional `system`, `history` [[q, a], ...]).

Each conversation is rendered with the model's chat template, which must produce ChatML blocks
(`<|im_start|>role\\n...<|im_end|>\\n`, as every Qwen template does). Tokens are built block by block,
`<|im_start|>` + role + "\\n" + content + `<|im_end|>` + "\\n" as Qwen's finetune.py does, with message
content encoded as plain text. Loss falls only on assistant content and its closing `<|im_end|>`.
Examples are packed into sequences of --seq-len; attention never crosses examples and positions
restart at each one.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import QianwenError
from .loop import IGNORE, Row

ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "bot": "assistant", "tool": "tool", "function": "tool", "observation": "tool"}
BLOCK = re.compile(r"<\|im_start\|>([^\n]*)\n(.*?)<\|im_end\|>\n?", re.S)


@dataclass
class SftStats:
    examples: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, why: str) -> None:
        self.skipped[why] = self.skipped.get(why, 0) + 1

    def summary(self) -> str:
        return ", ".join(f"{n} {k}" for k, n in self.skipped.items())


def to_messages(rec: Any) -> list[dict[str, str]] | str:
    """One record in any supported format -> OpenAI-style messages, or a reason to skip it."""
    if not isinstance(rec, dict):
        return "record is not an object"
    if isinstance(rec.get("conversations"), list):
        msgs = []
        for turn in rec["conversations"]:
            if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
                return "malformed turn"
            role = ROLES.get(str(turn.get("from", "")).lower())
            if role is None:
                return f"unknown speaker '{turn.get('from')}'"
            msgs.append({"role": role, "content": turn["value"]})
        if isinstance(rec.get("system"), str) and not any(m["role"] == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": rec["system"]})
        return msgs
    if isinstance(rec.get("messages"), list):
        msgs = []
        for m in rec["messages"]:
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
                return "malformed message"
            msgs.append({"role": ROLES[m["role"]], "content": m["content"]})
        return msgs
    if "instruction" in rec or "output" in rec:
        ins, inp, out = rec.get("instruction"), rec.get("input") or "", rec.get("output")
        if not isinstance(ins, str) or not isinstance(inp, str):
            return "malformed instruction"
        if not isinstance(out, str) or not out:
            return "no assistant turn"
        msgs = [{"role": "system", "content": rec["system"]}] if isinstance(rec.get("system"), str) and rec["system"] else []
        for pair in rec.get("history") or []:
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                return "malformed history"
            msgs += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        user = f"{ins}\n{inp}" if inp else ins
        return msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": out}]
    return "unknown format (expected conversations, messages, or instruction/output)"


def read_records(paths: list[str]) -> list[Any]:
    records: list[Any] = []
    for spec in paths:
        p = Path(spec)
        if not p.is_file():
            raise QianwenError(f"no such file: {spec}")
        text = p.read_text(encoding="utf-8")
        if not text.strip():
            raise QianwenError(f"{p} is empty")
        if p.suffix in (".jsonl", ".ndjson"):
            bad = 0
            for line in text.splitlines():
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except ValueError:
                        bad += 1
                        records.append(None)
            if bad and bad == sum(1 for line in text.splitlines() if line.strip()):
                raise QianwenError(f"{p} holds no valid JSON lines")
        else:
            try:
                data = json.loads(text)
            except ValueError as e:
                raise QianwenError(f"{p} is not valid JSON ({e}); JSON Lines files should end in .jsonl") from None
            records += data if isinstance(data, list) else [data]
    return records


def encode_conversation(messages: list[dict[str, str]], tokenizer, template) -> tuple[list[int], list[bool]] | str:
    """Token ids of the rendered conversation and, per token, whether it is an assistant target."""
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant turn"
    text = template.render(messages, add_generation_prompt=False)
    blocks = list(BLOCK.finditer(text))
    if not blocks or "".join(b.group(0) for b in blocks).rstrip("\n") != text.rstrip("\n"):
        raise QianwenError("the model's chat template does not render ChatML (<|im_start|>role ... <|im_end|>); "
                           "SFT needs a ChatML template")
    n_assistant = sum(1 for m in messages if m["role"] == "assistant")
    if sum(1 for b in blocks if b.group(1) == "assistant") != n_assistant:
        return "content holding ChatML control strings"
    im_start, im_end = tokenizer.special_tokens.get("<|im_start|>"), tokenizer.special_tokens.get("<|im_end|>")
    if im_start is None or im_end is None:
        raise QianwenError("the tokenizer has no <|im_start|>/<|im_end|> tokens")
    nl = tokenizer.encode("\n")
    ids: list[int] = []
    mask: list[bool] = []
    for b in blocks:
        role, content = b.group(1), b.group(2)
        head = [im_start] + tokenizer.encode(role + "\n")
        body = tokenizer.encode(content) + [im_end]
        target = role == "assistant"
        ids += head + body + nl
        mask += [False] * len(head) + [target] * len(body) + [False] * len(nl)
    return ids, mask


@dataclass
class Example:
    ids: np.ndarray
    mask: np.ndarray  # bool per token: a target


def build_examples(records: list[Any], tokenizer, template, max_len: int, stats: SftStats) -> list[Example]:
    from tqdm import tqdm

    out = []
    for rec in tqdm(records, desc="tokenizing", unit="ex", disable=len(records) < 2000):
        msgs = to_messages(rec) if rec is not None else "malformed JSON line"
        if isinstance(msgs, str):
            stats.skip(msgs)
            continue
        enc = encode_conversation(msgs, tokenizer, template)
        if isinstance(enc, str):
            stats.skip(enc)
            continue
        ids, mask = enc
        if len(ids) - 1 > max_len:
            stats.skip(f"longer than --seq-len {max_len}")
            continue
        out.append(Example(np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)))
        stats.examples += 1
    return out


def example_row(ex: Example) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and next-token labels of one example (labels IGNORE where the next token is no target)."""
    x = ex.ids[:-1]
    y = np.where(ex.mask[1:], ex.ids[1:], IGNORE)
    return x, y


def pack(examples: list[Example], seq_len: int, pad_id: int, packing: bool = True) -> list[Row]:
    """Greedy packing in the given order: examples fill a row until the next does not fit."""
    rows: list[Row] = []
    cur: list[tuple[np.ndarray, np.ndarray]] = []
    used = 0

    def flush() -> None:
        if not cur:
            return
        n = seq_len if packing else sum(len(x) for x, _ in cur)
        ids = np.full(n, pad_id, dtype=np.int64)
        labels = np.full(n, IGNORE, dtype=np.int64)
        pos = np.zeros(n, dtype=np.int64)
        seg = np.full(n, -1, dtype=np.int64)
        o = 0
        for k, (x, y) in enumerate(cur):
            ids[o:o + len(x)], labels[o:o + len(x)] = x, y
            pos[o:o + len(x)] = np.arange(len(x))
            seg[o:o + len(x)] = k
            o += len(x)
        rows.append(Row(ids, labels, pos, seg))
        cur.clear()

    for ex in examples:
        x, y = example_row(ex)
        if packing and used + len(x) > seq_len:
            flush()
            used = 0
        cur.append((x, y))
        used += len(x)
        if not packing:
            flush()
    flush()
    return rows


def pad_rows(rows: list[Row], pad_id: int) -> list[Row]:
    """Right-pad rows to the longest among them (unpacked batches)."""
    n = max(len(r.input_ids) for r in rows)
    out = []
    for r in rows:
        k = n - len(r.input_ids)
        out.append(Row(np.concatenate([r.input_ids, np.full(k, pad_id)]), np.concatenate([r.labels, np.full(k, IGNORE)]),
                       np.concatenate([r.positions, np.zeros(k, dtype=np.int64)]),
                       np.concatenate([r.segments, np.full(k, -1)])))
    return out


class PackedSource:
    """Rows of packed examples, visited in a (seed, epoch) permutation."""

    def __init__(self, rows: list[Row], eval_rows: list[Row], seed: int, pad_id: int) -> None:
        if not rows:
            raise QianwenError("no training examples left")
        self._rows, self._eval, self.seed, self.pad_id = rows, eval_rows, seed, pad_id
        self._perm: tuple[int, np.ndarray] | None = None

    def rows(self, step: int, n: int) -> list[Row]:
        out = []
        for g in range(step * n, (step + 1) * n):
            epoch, i = divmod(g, len(self._rows))
            if self._perm is None or self._perm[0] != epoch:
                self._perm = (epoch, np.random.default_rng([self.seed, epoch, 1]).permutation(len(self._rows)))
            out.append(self._rows[int(self._perm[1][i])])
        return pad_rows(out, self.pad_id)

    def eval_rows(self) -> list[Row]:
        return pad_rows(self._eval, self.pad_id) if self._eval else []


def make_source(records: list[Any], tokenizer, template, seq_len: int, seed: int, packing: bool = True,
                val_fraction: float = 0.0) -> tuple[PackedSource, SftStats]:
    stats = SftStats()
    examples = build_examples(records, tokenizer, template, seq_len, stats)
    if not examples:
        raise QianwenError(f"no usable examples ({stats.summary() or 'empty data'})")
    held = [zlib.crc32(f"{seed}:{i}".encode()) / 0xFFFFFFFF < val_fraction for i in range(len(examples))]
    train_ex = [e for e, h in zip(examples, held, strict=True) if not h]
    val_ex = [e for e, h in zip(examples, held, strict=True) if h]
    order = np.random.default_rng([seed, 12345]).permutation(len(train_ex))
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    rows = pack([train_ex[i] for i in order], seq_len, pad_id, packing)
    return PackedSource(rows, pack(val_ex, seq_len, pad_id, packing), seed, pad_id), stats


def base_config(model) -> dict[str, Any]:
    """The base model's config.json as shipped (a folder), else the one our ModelConfig writes."""
    path = Path(getattr(model, "path", "") or "")
    if path.is_dir() and (path / "config.json").is_file():
        cfg = json.loads((path / "config.json").read_text())
        ours = model.config.to_hf_dict()
        return cfg if cfg.get("model_type") == ours["model_type"] else ours  # Qwen-7B's is remote code
    return model.config.to_hf_dict()


def run_sft(args: Any) -> int:
    import torch

    from ..api import load
    from ..loading.export import export_hf
    from . import distributed as ddist
    from .loop import TrainConfig, train
    from .lora import adapter_tensors, apply_lora, lora_config, save_adapter
    from .pretrain import _train_dtype

    d = ddist.init(args.device)
    try:
        model = load(args.model, dtype="float32", device="cpu", fast=False)
        tok, template = model.tokenizer, model.chat_template
        config = base_config(model)
        if args.seq_len > model.context_length:
            raise QianwenError(f"--seq-len {args.seq_len} exceeds the model's context ({model.context_length})")
        source, stats = make_source(read_records(args.data), tok, template, args.seq_len, args.seed,
                                    packing=not args.no_packing, val_fraction=args.val_fraction)
        if d.main:
            print(f"{stats.examples} examples in {len(source._rows)} rows of up to {args.seq_len} tokens"
                  + (f"; skipped {stats.summary()}" if stats.skipped else ""))
        net = model.net
        net.requires_grad_(True)
        lcfg = None
        if args.lora:
            lcfg = lora_config(args.lora_r, args.lora_alpha, args.lora_dropout,
                               args.lora_targets.split(",") if args.lora_targets else None, base=str(model.path))
            torch.manual_seed(args.seed)  # LoRA's A is drawn at random: same on every rank
            net = apply_lora(net, lcfg)
        net = ddist.shard(net.to(d.device), d)
        c = TrainConfig(out=args.out, max_steps=args.max_steps, global_batch=args.global_batch,
                        micro_batch=args.micro_batch, lr=args.lr, min_lr_ratio=args.min_lr_ratio, warmup=args.warmup,
                        weight_decay=args.weight_decay, grad_clip=args.grad_clip, save_every=args.save_every,
                        eval_every=args.eval_every if args.val_fraction > 0 else 0, keep=args.keep, seed=args.seed,
                        dtype=_train_dtype(args, d), resume=args.resume, progress=not args.no_progress,
                        stop_at=args.stop_at)
        save_dtype = getattr(torch, args.save_dtype)

        def export(state: dict[str, torch.Tensor], step: int) -> None:
            if lcfg is not None:
                save_adapter(Path(args.out) / "adapter", lcfg, adapter_tensors(state))
            else:
                export_hf(Path(args.out) / "model", config, state, tok, save_dtype, model.generation_config,
                          copy_from=model.path if Path(model.path).is_dir() else None)

        keep = (lambda k: ".lora_" in k) if lcfg is not None else None
        records = train(net, source, c, d, export, meta={"kind": "sft", "lora": bool(lcfg), "base": str(model.path)},
                        state_filter=keep)
        if d.main and records:
            tps = [r["tok_s"] for r in records[1:]] or [records[0]["tok_s"]]
            where = Path(args.out) / ("adapter" if lcfg is not None else "model")
            print(f"step {records[-1]['step']}: loss {records[-1]['loss']:.4f}; {np.median(tps):.0f} tokens/s "
                  f"(median); {'adapter' if lcfg is not None else 'model'} -> {where}")
    finally:
        ddist.shutdown(d)
    return 0
