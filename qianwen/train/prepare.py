"""`qianwen data prepare`: text, JSONL, JSON and Parquet files -> tokenized shards.

Documents are read one at a time (a text file line by line, Parquet batch by batch), tokenized in
batches and appended to the shard writer, so corpora larger than memory work. Each document ends
with the tokenizer's end-of-text token. A fixed fraction of documents (chosen by a hash of the
document's position, so the split is reproducible) goes to a held-out `val` split.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import QianwenError
from .shards import ShardWriter, tokenizer_info

TEXT_SUFFIXES = (".txt", ".md", ".text")
TEXT_FIELDS = ("text", "content")


@dataclass
class ReadStats:
    documents: int = 0
    skipped: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def skip(self, why: str) -> None:
        self.skipped += 1
        self.reasons[why] = self.reasons.get(why, 0) + 1


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files, and the supported files inside folders (sorted, recursively)."""
    out: list[Path] = []
    for spec in inputs:
        p = Path(spec)
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.is_file() and _kind(q) is not None)
        elif p.is_file():
            out.append(p)
        else:
            raise QianwenError(f"no such file or folder: {spec}")
    if not out:
        raise QianwenError(f"no input files in {', '.join(inputs)}")
    return out


def _kind(p: Path) -> str | None:
    name = p.name.lower()
    if name.endswith(".jsonl") or name.endswith(".ndjson"):
        return "jsonl"
    if name.endswith(".json"):
        return "json"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    return None


def _text_of(obj: Any, text_field: str | None) -> str | None:
    if isinstance(obj, str):
        return obj
    if not isinstance(obj, dict):
        return None
    for key in ([text_field] if text_field else TEXT_FIELDS):
        v = obj.get(key)
        if isinstance(v, str):
            return v
    return None


def iter_documents(paths: list[Path], text_field: str | None = None, text_unit: str = "paragraph",
                   stats: ReadStats | None = None) -> Iterator[str]:
    """Yield the documents in `paths`. Text files split by `text_unit` (file, paragraph, line);
    JSON/JSONL records give their `text_field` (default `text`, then `content`)."""
    stats = stats if stats is not None else ReadStats()
    for path in paths:
        kind = _kind(path) or "text"
        before, skipped = stats.documents, dict(stats.reasons)
        for doc in _iter_file(path, kind, text_field, text_unit, stats):
            if doc.strip():
                stats.documents += 1
                yield doc
            else:
                stats.skip("empty document")
        if stats.documents == before:
            why = {k: v - skipped.get(k, 0) for k, v in stats.reasons.items() if v > skipped.get(k, 0)}
            detail = ", ".join(f"{n} {k}" for k, n in why.items()) or "empty file"
            raise QianwenError(f"{path} holds no documents ({detail})")


def _iter_file(path: Path, kind: str, text_field: str | None, text_unit: str, stats: ReadStats) -> Iterator[str]:
    if kind == "text":
        yield from _iter_text(path, text_unit)
    elif kind == "jsonl":
        yield from _texts_of(_jsonl_records(path, stats), text_field, stats)
    elif kind == "json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise QianwenError(f"{path} is not valid JSON: {e}") from None
        yield from _texts_of(data if isinstance(data, list) else [data], text_field, stats)
    elif kind == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise QianwenError("reading Parquet needs pyarrow: pip install pyarrow") from None
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises its own ArrowInvalid
            raise QianwenError(f"{path} is not a Parquet file: {e}") from None
        col = text_field or next((c for c in TEXT_FIELDS if c in pf.schema_arrow.names), None)
        if col is None or col not in pf.schema_arrow.names:
            raise QianwenError(f"{path} has no column '{text_field or 'text'}' (columns: {', '.join(pf.schema_arrow.names)})")
        for batch in pf.iter_batches(columns=[col], batch_size=1024):
            for text in batch.column(0).to_pylist():
                if isinstance(text, str):
                    yield text
                else:
                    stats.skip("null text")


def _jsonl_records(path: Path, stats: ReadStats) -> Iterator[Any]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                stats.skip("malformed JSON line")
                continue
            yield obj


def _texts_of(records: Iterable[Any], text_field: str | None, stats: ReadStats) -> Iterator[str]:
    for obj in records:
        text = _text_of(obj, text_field)
        if text is None:
            stats.skip(f"record without '{text_field or 'text'}'")
            continue
        yield text


def _iter_text(path: Path, unit: str) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        if unit == "line":
            for line in f:
                yield line.rstrip("\n")
            return
        if unit == "file":
            yield f.read()
            return
        buf: list[str] = []
        for line in f:
            if line.strip():
                buf.append(line)
            elif buf:
                yield "".join(buf).rstrip("\n")
                buf = []
        if buf:
            yield "".join(buf).rstrip("\n")


def is_validation(doc_index: int, val_fraction: float, seed: int = 0) -> bool:
    if val_fraction <= 0:
        return False
    h = zlib.crc32(f"{seed}:{doc_index}".encode()) / 0xFFFFFFFF
    return h < val_fraction


def document_separator(tokenizer) -> int | None:
    """`<|endoftext|>` where the vocabulary has it (Qwen's pretraining separator), else eos."""
    i = getattr(tokenizer, "special_tokens", {}).get("<|endoftext|>")
    return i if i is not None else tokenizer.eos_id


def load_any_tokenizer(spec: str | None):
    """A model folder, a tokenizer.json / .tiktoken file, or None for Qwen's vocabulary (qwen.tiktoken)."""
    from ..tokenizer import load_tokenizer

    if spec is None:
        from ..artifacts import QWEN_TIKTOKEN, fetch
        return load_tokenizer(fetch(QWEN_TIKTOKEN))
    return load_tokenizer(spec)


def prepare(inputs: list[str], out: str | os.PathLike, tokenizer, tokenizer_name: str = "",
            text_field: str | None = None, text_unit: str = "paragraph", val_fraction: float = 0.0,
            shard_tokens: int = 1 << 28, batch_docs: int = 256, progress: bool = True) -> dict[str, Any]:
    """Tokenize every document into `out/train-NNNNN.bin` (and `out/val-NNNNN.bin`); returns a summary."""
    from tqdm import tqdm

    paths = expand_inputs(inputs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("train-*.bin")) + list(out.glob("val-*.bin")):  # a re-run replaces the split
        old.unlink()
        old.with_suffix(".json").unlink(missing_ok=True)
    info = tokenizer_info(tokenizer, tokenizer_name)
    eos = document_separator(tokenizer)
    if eos is None:
        raise QianwenError("the tokenizer has no end-of-text token to separate documents")
    stats = ReadStats()
    total_bytes = sum(p.stat().st_size for p in paths)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=not progress)
    train = ShardWriter(out / "train", info, shard_tokens)
    val = ShardWriter(out / "val", info, shard_tokens)
    n_doc = 0
    batch: list[str] = []

    def flush() -> None:
        nonlocal n_doc
        for ids in tokenizer.encode_batch(batch):
            (val if is_validation(n_doc, val_fraction) else train).add(ids + [eos])
            n_doc += 1
        bar.update(sum(len(d.encode("utf-8")) for d in batch))
        bar.set_postfix(docs=n_doc, tokens=train.total_tokens + val.total_tokens)
        batch.clear()

    with train, val:
        for doc in iter_documents(paths, text_field, text_unit, stats):
            batch.append(doc)
            if len(batch) >= batch_docs:
                flush()
        if batch:
            flush()
    bar.close()
    if train.total_documents == 0:
        raise QianwenError("no training documents left (all went to validation?); lower --val-fraction")
    return {"files": len(paths), "documents": stats.documents, "skipped": stats.skipped, "reasons": stats.reasons,
            "train_tokens": train.total_tokens, "val_tokens": val.total_tokens,
            "train_shards": [str(p) for p in train.paths], "val_shards": [str(p) for p in val.paths]}
