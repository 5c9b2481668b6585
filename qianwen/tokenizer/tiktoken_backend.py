"""Qwen's original tokenizer: `qwen.tiktoken` ranks run by tiktoken (docs/qwen-facts.md section 2)."""

from __future__ import annotations

import base64
import binascii
import os
import shutil
import unicodedata
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import tiktoken

from ..errors import QianwenError
from .base import Tokenizer, byte_to_unicode

if TYPE_CHECKING:
    from .hf_backend import HFTokenizer

QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
NUM_EXTRA = 205


def qwen_special_tokens(n_ranks: int) -> dict[str, int]:
    """`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, `<|extra_0|>`.. numbered after the ranks."""
    names = [ENDOFTEXT, IM_START, IM_END] + [f"<|extra_{i}|>" for i in range(NUM_EXTRA)]
    return {name: n_ranks + i for i, name in enumerate(names)}


def load_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Read a `.tiktoken` file: one `base64(token) rank` per line."""
    ranks: dict[bytes, int] = {}
    n = 0
    try:
        with open(path, "rb") as f:
            for line in f:
                n += 1
                if not line.strip():
                    continue
                tok, rank = line.split()
                ranks[base64.b64decode(tok, validate=True)] = int(rank)
    except OSError as e:
        raise QianwenError(f"cannot read tokenizer file {path}: {e.strerror}") from e
    except (ValueError, binascii.Error):
        raise QianwenError(f"{path} line {n} is not 'base64 rank': not a tiktoken vocabulary") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise QianwenError(f"{path}: ranks are not 0..{len(ranks) - 1} without gaps")
    return ranks


class TiktokenTokenizer(Tokenizer):
    """Exactly the original `tokenization_qwen.py`: NFC, then tiktoken with Qwen's regex."""

    def __init__(self, path: str | os.PathLike, special_tokens: dict[str, int] | None = None):
        self.path = Path(path)
        self.ranks = load_ranks(self.path)
        self.special_tokens = special_tokens or qwen_special_tokens(len(self.ranks))
        self.split_tokens = self.special_tokens  # tiktoken finds them first, then encodes the text between
        self._enc = tiktoken.Encoding(
            name=f"qwen:{self.path.name}", pat_str=QWEN_PATTERN,
            mergeable_ranks=self.ranks, special_tokens=self.special_tokens,
        )
        self._id_to_special = {i: s.encode("utf-8") for s, i in self.special_tokens.items()}
        self._n = len(self.ranks) + len(self.special_tokens)
        self.eos_id = self.special_tokens.get(ENDOFTEXT)
        self.pad_id = self.eos_id
        self.bos_id = None
        self._hf: HFTokenizer | None = None

    @property
    def vocab_size(self) -> int:
        return self._n

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        text = unicodedata.normalize("NFC", text)
        if allow_special:
            return self._enc.encode(text, allowed_special="all")
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], allow_special: bool = False) -> list[list[int]]:
        texts = [unicodedata.normalize("NFC", t) for t in texts]
        if allow_special:
            return self._enc.encode_batch(texts, allowed_special="all")
        return self._enc.encode_ordinary_batch(texts)

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special or any(not 0 <= i < self._n for i in ids):
            ids = [i for i in ids if 0 <= i < self._n and not (skip_special and i in self._id_to_special)]
        return self._enc.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_to_id(self, token: str) -> int | None:
        if token in self.special_tokens:
            return self.special_tokens[token]
        return self.ranks.get(token.encode("utf-8"))

    def id_to_token_bytes(self, token_id: int) -> bytes:
        if token_id in self._id_to_special:
            return self._id_to_special[token_id]
        if 0 <= token_id < len(self.ranks):
            return self._enc.decode_single_token_bytes(token_id)
        return b""

    @cached_property
    def merges(self) -> list[tuple[bytes, bytes]]:
        """The BPE merges these ranks imply, in priority order (151,387 for qwen.tiktoken).

        Each token of rank r is the merge of the two pieces BPE reaches on its own bytes when only
        ranks below r are allowed; when only one split has both halves ranked below r, that is it.
        """
        ranks = self.ranks

        def bpe(tok: bytes, max_rank: int) -> list[bytes]:
            parts = [tok[i:i + 1] for i in range(len(tok))]
            while len(parts) > 1:
                best, best_rank = -1, max_rank
                for i in range(len(parts) - 1):
                    r = ranks.get(parts[i] + parts[i + 1])
                    if r is not None and r < best_rank:
                        best, best_rank = i, r
                if best < 0:
                    break
                parts[best:best + 2] = [parts[best] + parts[best + 1]]
            return parts

        out: list[tuple[bytes, bytes]] = []
        for tok, r in sorted(ranks.items(), key=lambda kv: kv[1]):
            if len(tok) < 2:
                continue
            splits = [(tok[:i], tok[i:]) for i in range(1, len(tok))
                      if ranks.get(tok[:i], r) < r and ranks.get(tok[i:], r) < r]
            if len(splits) != 1:
                splits = [tuple(p) for p in [bpe(tok, r)] if len(p) == 2]
            out.extend(splits)  # a token BPE cannot reach gets no merge (tiktoken takes it whole)
        return out

    def to_hf(self) -> HFTokenizer:
        """The same tokenizer as a Hugging Face byte-level BPE (what Qwen2's tokenizer.json is)."""
        if self._hf is None:
            self._hf = self._build_hf()
        return self._hf

    def _build_hf(self) -> HFTokenizer:
        from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
        from tokenizers import Tokenizer as RustTokenizer
        from tokenizers.models import BPE

        from .hf_backend import HFTokenizer

        spell = byte_to_unicode()
        s = lambda b: "".join(spell[x] for x in b)
        vocab = {s(b): r for b, r in self.ranks.items()}
        merges = [(s(a), s(b)) for a, b in self.merges]
        # ignore_merges: like tiktoken, a pre-token that is itself in the vocabulary stays whole
        tok = RustTokenizer(BPE(vocab, merges, dropout=None, unk_token=None, continuing_subword_prefix="",
                                end_of_word_suffix="", fuse_unk=False, byte_fallback=False, ignore_merges=True))
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
        specials = sorted(self.special_tokens.items(), key=lambda kv: kv[1])
        tok.add_special_tokens([AddedToken(name, special=True, normalized=False) for name, _ in specials])
        for name, i in specials:
            if tok.token_to_id(name) != i:
                raise QianwenError(f"special token {name} would get id {tok.token_to_id(name)}, not {i}")
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": ENDOFTEXT, "pad_token": ENDOFTEXT, "bos_token": None, "unk_token": None,
            "add_bos_token": False, "clean_up_tokenization_spaces": False, "model_max_length": 32768,
        }
        return HFTokenizer(tok, config=config)

    def save(self, directory: str | os.PathLike) -> None:
        """qwen.tiktoken, plus an equivalent tokenizer.json and tokenizer_config.json (~5 s)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.to_hf().save(d)
        target = d / "qwen.tiktoken"
        if target.resolve() != self.path.resolve():
            tmp = d / ".qwen.tiktoken.tmp"
            shutil.copyfile(self.path, tmp)
            os.replace(tmp, target)
