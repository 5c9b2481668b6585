"""Tokenized shards: `name.bin` (little-endian uint32 token ids) + `name.json` (the index).

The index records the tokenizer's identity, the document offsets and the token count, so a reader
can refuse shards written with another vocabulary. Shards are written streaming (documents are
appended as they come) and appear atomically: both files are written under temporary names and
renamed when the shard is complete, the index last.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import QianwenError

FORMAT = "qianwen-shard"
VERSION = 1
DTYPE = np.dtype("<u4")


def tokenizer_info(tokenizer: Any, name: str = "") -> dict[str, Any]:
    """What the index stores about the tokenizer: its identity hash, vocabulary size, eos id."""
    return {"name": name, "identity": tokenizer.identity, "vocab_size": int(tokenizer.vocab_size),
            "eos_id": tokenizer.eos_id}


class ShardWriter:
    """Append documents (lists of ids) to `prefix-00000.bin`, `prefix-00001.bin`, ...

    A new shard starts once `max_tokens` is reached (documents are never split across shards).
    Call `close()` (or use as a context manager) to finish the last shard.
    """

    def __init__(self, prefix: str | os.PathLike, tokenizer: dict[str, Any], max_tokens: int = 1 << 28) -> None:
        self.prefix = Path(prefix)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.paths: list[Path] = []
        self.total_tokens = 0
        self.total_documents = 0
        self._f = None
        self._offsets: list[int] = []
        self._n = 0

    def _open(self) -> None:
        path = self.prefix.parent / f"{self.prefix.name}-{len(self.paths):05d}.bin"
        self._path = path
        self._f = open(path.with_name(path.name + ".tmp"), "wb")
        self._offsets, self._n = [0], 0

    def add(self, ids: list[int] | np.ndarray) -> None:
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size == 0:
            return
        vocab = self.tokenizer.get("vocab_size")
        if arr.min() < 0 or (vocab is not None and arr.max() >= vocab):
            raise QianwenError(f"token id out of range for a vocabulary of {vocab}")
        if self._f is None:
            self._open()
        assert self._f is not None
        self._f.write(arr.astype(DTYPE).tobytes())
        self._n += arr.size
        self._offsets.append(self._n)
        self.total_tokens += arr.size
        self.total_documents += 1
        if self._n >= self.max_tokens:
            self._finish()

    def _finish(self) -> None:
        if self._f is None:
            return
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        self._f = None
        tmp_bin = self._path.with_name(self._path.name + ".tmp")
        os.replace(tmp_bin, self._path)
        index = {"format": FORMAT, "version": VERSION, "dtype": "uint32-le", "tokenizer": self.tokenizer,
                 "num_tokens": self._n, "num_documents": len(self._offsets) - 1, "doc_offsets": self._offsets}
        jpath = self._path.with_suffix(".json")
        tmp_json = jpath.with_name(jpath.name + ".tmp")
        tmp_json.write_text(json.dumps(index, separators=(",", ":")) + "\n", encoding="utf-8")
        os.replace(tmp_json, jpath)
        self.paths.append(self._path)

    def close(self) -> list[Path]:
        self._finish()
        return self.paths

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._f is not None:  # leave nothing half-written behind
            self._f.close()
            self._path.with_name(self._path.name + ".tmp").unlink(missing_ok=True)
            self._f = None


@dataclass
class Shard:
    path: Path  # the .bin
    index: dict[str, Any]
    tokens: np.ndarray  # memory-mapped uint32

    @property
    def doc_offsets(self) -> np.ndarray:
        return np.asarray(self.index["doc_offsets"], dtype=np.int64)

    @property
    def num_tokens(self) -> int:
        return int(self.index["num_tokens"])

    def documents(self) -> Iterator[np.ndarray]:
        off = self.doc_offsets
        for a, b in zip(off[:-1], off[1:], strict=True):
            yield self.tokens[a:b]


def read_shard(path: str | os.PathLike) -> Shard:
    """Open one shard given its .bin or .json path; the token array is memory-mapped."""
    p = Path(path)
    bin_path, json_path = p.with_suffix(".bin"), p.with_suffix(".json")
    if not json_path.is_file() or not bin_path.is_file():
        raise QianwenError(f"{bin_path.with_suffix('')} is not a token shard (needs .bin and .json)")
    try:
        index = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise QianwenError(f"cannot read shard index {json_path}: {e}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise QianwenError(f"{json_path} is not a {FORMAT} index")
    n = int(index.get("num_tokens", -1))
    size = bin_path.stat().st_size
    if size != n * DTYPE.itemsize:
        raise QianwenError(f"{bin_path} has {size} bytes, its index says {n} tokens: truncated or corrupt")
    tokens = np.memmap(bin_path, dtype=DTYPE, mode="r") if n else np.zeros(0, dtype=DTYPE)
    return Shard(bin_path, index, tokens)


def find_shards(spec: str | os.PathLike) -> list[Path]:
    """A shard path, a folder of shards, or a glob (e.g. `data/train-*.bin`) -> sorted .bin paths."""
    p = Path(spec)
    if p.is_dir():
        paths = sorted(p.glob("*.bin"))
    elif any(c in str(spec) for c in "*?["):
        paths = sorted(Path(q) for q in glob.glob(str(spec)) if q.endswith(".bin"))
    elif p.with_suffix(".bin").is_file():
        paths = [p.with_suffix(".bin")]
    else:
        raise QianwenError(f"no token shards at {spec}")
    if not paths:
        raise QianwenError(f"no token shards (*.bin) in {spec}")
    return paths


class TokenStream:
    """The shards at a spec as one read-only token sequence, without loading them: each shard stays
    memory-mapped and a slice copies only the tokens it covers (joining across shard boundaries), so
    a corpus larger than memory can be trained on. Same indices as the concatenation of the shards."""

    def __init__(self, shards: list[Shard]) -> None:
        self.shards = [s for s in shards if s.num_tokens]
        self.starts = np.cumsum([0] + [s.num_tokens for s in self.shards], dtype=np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("TokenStream supports contiguous slices only")
        a, b, _ = key.indices(len(self))
        if b <= a:
            return np.zeros(0, dtype=DTYPE)
        first = int(np.searchsorted(self.starts, a, side="right")) - 1
        parts = []
        i = first
        while i < len(self.shards) and self.starts[i] < b:
            lo, hi = max(a, self.starts[i]) - self.starts[i], min(b, self.starts[i + 1]) - self.starts[i]
            parts.append(self.shards[i].tokens[lo:hi])
            i += 1
        return np.array(parts[0]) if len(parts) == 1 else np.concatenate(parts)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:  # np.asarray(stream): everything, in memory
        arr = self[:]
        return arr if dtype is None else arr.astype(dtype)


def open_tokens(spec: str | os.PathLike, identity: str | None = None) -> tuple[TokenStream, dict[str, Any]]:
    """The shards at `spec` as one memory-mapped TokenStream, and the tokenizer info of their index.
    Checks that every shard was written with the same tokenizer (and `identity`, if given)."""
    shards = [read_shard(p) for p in find_shards(spec)]
    ids = {s.index["tokenizer"].get("identity") for s in shards}
    if len(ids) > 1:
        raise QianwenError(f"shards at {spec} were written with different tokenizers")
    tok = shards[0].index["tokenizer"]
    if identity is not None and tok.get("identity") != identity:
        raise QianwenError(f"shards at {spec} were tokenized with another vocabulary "
                           f"({tok.get('name') or tok.get('identity')}); prepare them with this model's tokenizer")
    return TokenStream(shards), tok


def load_tokens(spec: str | os.PathLike, identity: str | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """All tokens of the shards at `spec`, concatenated into one array in memory (small corpora,
    evaluation); training reads through `open_tokens` instead."""
    stream, tok = open_tokens(spec, identity)
    return stream[:], tok
