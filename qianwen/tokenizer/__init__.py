"""Tokenizers: Qwen's qwen.tiktoken, Hugging Face tokenizer.json, GGUF vocabularies; streaming decode."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import QianwenError
from .base import Tokenizer
from .hf_backend import HFTokenizer
from .stream import StreamDecoder
from .tiktoken_backend import TiktokenTokenizer

__all__ = ["Tokenizer", "HFTokenizer", "TiktokenTokenizer", "StreamDecoder", "load_tokenizer", "tokenizer_from_gguf"]


def tokenizer_from_gguf(metadata: Mapping[str, Any]) -> HFTokenizer:
    """The tokenizer described by a GGUF file's metadata (a `gguf_reader.GGUFFile` or a dict; see gguf_vocab.py)."""
    from .gguf_vocab import tokenizer_from_gguf as build

    return build(metadata)


def load_tokenizer(folder: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a Hugging Face folder: tokenizer.json if present, else qwen.tiktoken.

    A path to one of those files works too, and so does a .gguf file (its metadata's vocabulary).
    """
    p = Path(folder).expanduser()
    if p.is_file():
        if p.name.endswith(".tiktoken"):
            return TiktokenTokenizer(p)
        if p.suffix == ".json":
            return HFTokenizer.from_file(p, p.with_name("tokenizer_config.json"))
        if p.suffix == ".gguf":
            from ..gguf_reader import GGUFFile

            return tokenizer_from_gguf(GGUFFile(p))
        raise QianwenError(f"{p} is not a tokenizer file (expected tokenizer.json, a .tiktoken or a .gguf file)")
    if not p.is_dir():
        raise QianwenError(f"no tokenizer at {p}: no such folder")
    if (p / "tokenizer.json").is_file():
        return HFTokenizer.from_folder(p)
    if (p / "qwen.tiktoken").is_file():
        return TiktokenTokenizer(p / "qwen.tiktoken")
    found = sorted(p.glob("*.tiktoken"))
    if len(found) == 1:
        return TiktokenTokenizer(found[0])
    raise QianwenError(f"no tokenizer in {p}: expected tokenizer.json or qwen.tiktoken")
