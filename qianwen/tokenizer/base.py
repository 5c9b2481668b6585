"""The `Tokenizer` interface every backend implements, and small helpers they share."""

from __future__ import annotations

import bisect
import hashlib
import os
import re
import tempfile
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
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
    # The strings `encode(..., allow_special=True)` finds in the text before anything else, each becoming its
    # own token, with the text between them encoded piece by piece, independently (tiktoken's special tokens;
    # Hugging Face added tokens that are not normalized and strip no neighbouring whitespace). None: not
    # promised, and `encode_prompt` encodes every prompt whole.
    split_tokens: dict[str, int] | None = None

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

    def encode_prompt(self, text: str) -> list[int]:
        """`encode(text, allow_special=True)` for a rendered prompt, reusing the ids of a recent prompt that
        starts the same way (`PromptIds`): a chat's next turn resends the whole history."""
        return self._prompt_ids.encode(text) if self._prompt_ids is not None else self.encode(text, True)

    def encode_piece(self, text: str, allow_special: bool = False) -> list[int]:
        """`encode(text, allow_special)`, remembered (`RecentPieces`): a prompt encoded piece by piece (chat/
        template.py `encode_rendered`, once a message holds a special token's text) meets the same messages in
        every turn of its chat."""
        return self._pieces.encode(text, allow_special)

    @cached_property
    def _pieces(self) -> RecentPieces:
        return RecentPieces(self)

    @cached_property
    def _prompt_ids(self) -> PromptIds | None:
        split = self.split_tokens
        # a cut before an ASCII character never changes a Unicode normalization of the text before it
        if not split or any(not s or not s[0].isascii() for s in split):
            return None
        return PromptIds(self, split)

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


RECENT_PROMPTS = 16  # prompts whose ids `PromptIds` keeps
RECENT_PIECE_CHARS = 1 << 20  # characters of the texts whose ids `RecentPieces` keeps


class RecentPieces:
    """The ids of recently encoded texts, the least recently used dropped past `chars` characters in all."""

    def __init__(self, tokenizer: Tokenizer, chars: int = RECENT_PIECE_CHARS) -> None:
        self.tokenizer, self.chars = tokenizer, chars
        self.recent: OrderedDict[tuple[str, bool], list[int]] = OrderedDict()
        self.held = 0  # characters of the texts in `recent`
        self.lock = threading.Lock()

    def encode(self, text: str, allow_special: bool) -> list[int]:
        key = (text, allow_special)
        with self.lock:
            ids = self.recent.get(key)
            if ids is not None:
                self.recent.move_to_end(key)
        if ids is None:
            ids = self.tokenizer.encode(text, allow_special)
            with self.lock:
                if len(text) <= self.chars and key not in self.recent:
                    self.recent[key] = ids
                    self.held += len(text)
                    while self.held > self.chars:
                        self.held -= len(self.recent.popitem(last=False)[0][0])
        return list(ids)


class PromptIds:
    """Ids of recent prompts, to encode a prompt that starts as one of them did from where they part.

    A tokenizer with `split_tokens` encodes text cut just before one of those tokens to exactly the first ids
    of the whole text's, so a new prompt takes the ids of a recent one up to the last split token both have at
    the same place within their common start, and encodes only the rest. Each prompt's cuts are (place in the
    text, place in the ids) of its split tokens, found by counting: a prompt whose ids do not hold the id of
    each split token found in its text, in order, is encoded whole again and not kept.
    """

    def __init__(self, tokenizer: Tokenizer, split_tokens: dict[str, int], size: int = RECENT_PROMPTS) -> None:
        self.tokenizer, self.split, self.size = tokenizer, split_tokens, size
        self.split_ids = frozenset(split_tokens.values())
        # the leftmost, longest match at each place, as both backends find them
        self.pattern = re.compile("|".join(re.escape(t) for t in sorted(split_tokens, key=len, reverse=True)))
        self.recent: OrderedDict[str, tuple[list[int], list[int], list[int]]] = OrderedDict()  # text -> ids, cuts
        self.lock = threading.Lock()

    def _cuts(self, text: str, ids: list[int], at: tuple[int, int] = (0, 0)) -> tuple[list[int], list[int]] | None:
        """The places of the split tokens in text and in ids from at = (text place, ids place) on, or None when
        the ids do not hold them in order."""
        found = [(m.start(), self.split[m.group()]) for m in self.pattern.finditer(text, at[0])]
        where = [i for i in range(at[1], len(ids)) if ids[i] in self.split_ids]
        if len(where) != len(found) or any(ids[i] != t for i, (_, t) in zip(where, found, strict=True)):
            return None
        return [p for p, _ in found], where

    def encode(self, text: str) -> list[int]:
        with self.lock:
            recent = list(self.recent.items())
        reuse = None  # (ids, text cuts, ids cuts, k) of the recent prompt to cut before its k-th split token
        for old, (old_ids, text_cuts, id_cuts) in recent:
            at = reuse[1][reuse[3]] if reuse is not None else 0  # the longest cut found so far
            k = bisect.bisect_right(text_cuts, common_start(old, text)) - 1
            # the cut must stand before a split token of the new text too (the text before it is the same)
            while k >= 0 and text_cuts[k] > at and not self.pattern.match(text, text_cuts[k]):
                k -= 1
            if k >= 0 and text_cuts[k] > at:
                reuse = (old_ids, text_cuts, id_cuts, k)
        cuts = None
        if reuse is not None:  # the old ids and cuts before the cut, the rest encoded and checked now
            old_ids, text_cuts, id_cuts, k = reuse
            out = old_ids[:id_cuts[k]] + self.tokenizer.encode(text[text_cuts[k]:], allow_special=True)
            rest = self._cuts(text, out, (text_cuts[k], id_cuts[k]))
            if rest is not None:
                cuts = text_cuts[:k] + rest[0], id_cuts[:k] + rest[1]
        if cuts is None:  # nothing to reuse, or never trust a reuse the ids disagree with: encode it whole
            out = self.tokenizer.encode(text, allow_special=True)
            cuts = self._cuts(text, out)
        if cuts is not None and cuts[0]:
            with self.lock:
                self.recent[text] = (out, *cuts)
                self.recent.move_to_end(text)
                while len(self.recent) > self.size:
                    self.recent.popitem(last=False)
        return out


def common_start(a: Sequence, b: Sequence, limit: int | None = None, step: int = 4096) -> int:
    """How many first items (characters of two texts, ids of two token lists) a and b share, at most `limit`:
    compared a step at a time by slices (in C), then by halves within the step where they differ."""
    end = min(len(a), len(b), len(a) if limit is None else limit)
    n = 0
    while n < end and a[n:min(n + step, end)] == b[n:min(n + step, end)]:
        n = min(n + step, end)
    hi = min(n + step, end)
    while n < hi:
        mid = (n + hi + 1) // 2
        if a[n:mid] == b[n:mid]:
            n = mid
        else:
            hi = mid - 1
    return n


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
