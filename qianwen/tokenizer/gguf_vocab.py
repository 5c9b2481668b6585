"""Rebuild a Hugging Face tokenizer from a GGUF file's `tokenizer.*` metadata.

A GGUF carries no tokenizer.json, only llama.cpp's description of the vocabulary. For byte-level
BPE (`tokenizer.ggml.model == "gpt2"`) this builds the tokenizer transformers builds from the same
file (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`): the tokens re-spelled in the byte
alphabet, the file's merges, control tokens as special tokens, user-defined ones as added tokens,
and the split regex that `tokenizer.ggml.pre` names (GPT-2's byte-level regex otherwise).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
from tokenizers import Tokenizer as RustTokenizer
from tokenizers.models import BPE

from ..errors import QianwenError
from .base import byte_to_unicode
from .hf_backend import HFTokenizer
from .tiktoken_backend import QWEN_PATTERN

_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
           r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# `tokenizer.ggml.pre` -> split regex, as transformers maps them; others keep GPT-2's regex.
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"], _LLAMA3),
    "tekken": _TEKKEN,
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"], QWEN_PATTERN),
    "qwen35": _QWEN35,
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], _GPT4O),
}

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types


def tokenizer_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The `tokenizer.*` entries of a GGUF file's metadata (a `gguf_reader.GGUFFile` or a dict)."""
    return {k: v for k, v in metadata.items() if k.startswith("tokenizer.")}


def tokenizer_from_gguf(metadata: Mapping[str, Any]) -> HFTokenizer:
    """Build the tokenizer a GGUF file describes (byte-level BPE only)."""
    meta = tokenizer_metadata(metadata)
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise QianwenError(f"GGUF tokenizer type {kind!r:.40} is not supported (only byte-level BPE, 'gpt2')")
    for key, kinds in (("tokens", str), ("merges", str), ("token_type", int)):
        v = meta.get(f"tokenizer.ggml.{key}")
        if v is not None and (not isinstance(v, list) or not all(isinstance(x, kinds) for x in v)):
            raise QianwenError(f"GGUF 'tokenizer.ggml.{key}' is not a list of {kinds.__name__}s")
    for key in ("tokenizer.ggml.pre", "tokenizer.chat_template"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise QianwenError(f"GGUF '{key}' is {meta[key]!r:.40}; expected a string")
    tokens: list[str] = list(meta.get("tokenizer.ggml.tokens") or [])
    merges = meta.get("tokenizer.ggml.merges")
    if not tokens or not merges:
        raise QianwenError("GGUF file has no tokenizer.ggml.tokens or tokenizer.ggml.merges: cannot build its tokenizer")
    types = list(meta.get("tokenizer.ggml.token_type") or [])

    spell = byte_to_unicode()
    alphabet = set(spell.values())
    # tokens outside the byte alphabet (e.g. written as raw UTF-8) are re-spelled byte by byte
    vocab = {t if set(t) <= alphabet else "".join(spell[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    if any(len(p) != 2 for p in pairs):
        raise QianwenError("GGUF tokenizer.ggml.merges has an entry that is not 'left right'")
    try:
        tok = RustTokenizer(BPE(vocab, pairs, dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
                                fuse_unk=False))
    except Exception as e:  # tokenizers raises a bare Exception, e.g. for a merge of unknown tokens
        raise QianwenError(f"GGUF tokenizer.ggml.tokens and merges do not agree: {e}") from None
    split = PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre"))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()

    # A control token spelled outside the byte alphabet is a llama.cpp mislabel; adding it would
    # grow the vocabulary past the model's rows (transformers skips it too).
    control = [AddedToken(t, normalized=False, special=True)
               for t, ty in zip(tokens, types, strict=False) if ty == CONTROL and set(t) <= alphabet]
    if control:
        tok.add_special_tokens(control)
    user = [AddedToken(t, normalized=False, special=False)
            for t, ty in zip(tokens, types, strict=False) if ty == USER_DEFINED and t in vocab]
    if user:
        tok.add_tokens(user)

    def token_id(key: str) -> int | None:  # an id outside the vocabulary is ignored, as llama.cpp does
        i = meta.get(f"tokenizer.ggml.{key}")
        return i if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(tokens) else None

    def name(key: str) -> str | None:
        i = token_id(key)
        return None if i is None else tokens[i]

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name("bos_token_id"), "eos_token": name("eos_token_id"),
        "pad_token": name("padding_token_id"), "unk_token": name("unknown_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
    }
    out = HFTokenizer(tok, config=config, chat_template=meta.get("tokenizer.chat_template"))
    # the ids the file states are authoritative, whatever spelling the names have
    for attr, key in (("bos_id", "bos_token_id"), ("eos_id", "eos_token_id"), ("pad_id", "padding_token_id")):
        if (i := token_id(key)) is not None:
            setattr(out, attr, i)
    out.add_bos = out.add_bos and out.bos_id is not None
    return out
