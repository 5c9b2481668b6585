"""The `Tokenizer` interface every backend implements, and small helpers they share."""

from __future__ import annotations

import hashlib
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from functools import cached_property, lru_cache
from pathlib import Path

from ..paths import share_like_new_file


class Tokenizer(ABC):
    """Text <-> token ids for one vocabulary.

    `encode` treats its input as plain text unless `allow_special` is set: a user typing
    `<|im_end|>` gets ordinary tokens, never the control token. `encode` never adds a BOS token;
    `add_bos` says whether the model expects one in front of a raw prompt.
    """

    special_tokens: dict[str, int]  # content -> id of every special (control) token
    eos_id: int | None
    bos_id: int | None
    pad_id: int | None
    add_bos: bool = False
    chat_template: str | None = None  # the Jinja template shipped with the vocabulary, if any
    # SentencePiece-style decoders drop the space that starts the first token; streams must too.
    strip_leading_space: bool = False

    @abstractmethod
    def encode(self, text: str, allow_special: bool = False) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str: ...

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included."""

    @abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """Id of the special token named `token`, or of the regular token whose text is `token`."""

    @abstractmethod
    def id_to_token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (a special token: its name). Unknown ids give b""."""

    @abstractmethod
    def save(self, directory: str | os.PathLike) -> None:
        """Write files a Hugging Face folder can use (tokenizer.json, tokenizer_config.json, ...)."""

    def encode_batch(self, texts: Sequence[str], allow_special: bool = False) -> list[list[int]]:
        return [self.encode(t, allow_special) for t in texts]

    @cached_property
    def special_ids(self) -> frozenset[int]:
        return frozenset(self.special_tokens.values())

    @cached_property
    def identity(self) -> str:
        """16 hex digits naming the vocabulary: a hash of what every id decodes to.

        Two tokenizers with the same identity give every id the same meaning, so token shards
        written with one can be read with the other (e.g. qwen.tiktoken and Qwen2's tokenizer.json).
        """
        h = hashlib.sha256()
        for i in range(self.vocab_size):
            b = self.id_to_token_bytes(i)
            h.update(len(b).to_bytes(4, "little"))
            h.update(b)
        return h.hexdigest()[:16]

    def __len__(self) -> int:
        return self.vocab_size


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte spelled as a printable character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


@lru_cache(maxsize=1)
def unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_unicode().items()}


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write `data` to `path` through a temporary file in the same folder and `os.replace`."""
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        share_like_new_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
