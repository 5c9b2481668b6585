"""Hugging Face `tokenizer.json` tokenizers (Qwen2 and later, Llama, SmolLM, GGUF-derived)."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as RustTokenizer

from ..errors import QianwenError
from .base import Tokenizer, byte_to_unicode, unicode_to_byte, write_atomic

# Tried in order when tokenizer_config.json names no eos token.
_EOS_GUESSES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>")


def _token_name(value: Any) -> str | None:
    """tokenizer_config.json spells a token as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _decoder_types(state: Any) -> list[dict]:
    """Every decoder (with its options) inside a possibly nested decoder description."""
    if isinstance(state, dict):
        found = [state] if "type" in state else []
        for v in state.values():
            found += _decoder_types(v)
        return found
    if isinstance(state, list):
        return [d for v in state for d in _decoder_types(v)]
    return []


def pick_chat_template(value: Any) -> str | None:
    """A config's `chat_template`: a string, or a list of {"name", "template"} (take "default")."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default") or next(iter(named.values()), None)
    return None


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` plus what tokenizer_config.json adds (bos/eos/pad, chat template)."""

    def __init__(self, tok: RustTokenizer, config: dict | None = None, chat_template: str | None = None):
        self._tok = tok
        self._lock = threading.Lock()  # guards the encode_special_tokens switch
        self.config = dict(config or {})
        self._add_config_tokens()
        added = self._tok.get_added_tokens_decoder()
        self._added = {i: a.content for i, a in added.items()}
        self._added_ids = {a.content: i for i, a in added.items()}
        self.special_tokens = {a.content: i for i, a in added.items() if a.special}
        # added tokens are found before normalization and the pieces between them encode on their own, unless
        # one eats the whitespace beside it (base.py `split_tokens`)
        if not any(a.lstrip or a.rstrip or a.single_word for a in added.values()):
            self.split_tokens = {a.content: i for i, a in added.items() if not a.normalized}
        self._n = max([tok.get_vocab_size(with_added_tokens=False), *(i + 1 for i in added)])

        decoders = _decoder_types(json.loads(tok.decoder.__getstate__())) if tok.decoder is not None else []
        kinds = {d["type"] for d in decoders}
        if "ByteLevel" in kinds:
            self._mode = "bytelevel"
        elif kinds & {"Metaspace", "ByteFallback"} or any(d.get("pattern", {}).get("String") == "\u2581"
                                                         for d in decoders if d["type"] == "Replace"):
            self._mode = "sentencepiece"
            self.strip_leading_space = any(
                (d["type"] == "Strip" and d.get("content") == " " and d.get("start", 0) > 0)
                or (d["type"] == "Metaspace" and d.get("prepend_scheme", "always") != "never"
                    and d.get("add_prefix_space", True))
                for d in decoders)
        else:
            self._mode = "other"
        self._byte_fallback = "ByteFallback" in kinds
        self._bytes_cache: dict[int, bytes] = {}

        self.bos_id = self._config_id("bos_token")
        self.eos_id = self._config_id("eos_token")
        if self.eos_id is None:
            self.eos_id = next((self.token_to_id(t) for t in _EOS_GUESSES if self.token_to_id(t) is not None), None)
        self.pad_id = self._config_id("pad_token")
        if self.pad_id is None:
            self.pad_id = self.eos_id
        if isinstance(self.config.get("add_bos_token"), bool):
            self.add_bos = self.config["add_bos_token"] and self.bos_id is not None
        else:  # the post-processor (e.g. Llama 3's TemplateProcessing) says whether BOS goes first
            self.add_bos = self.bos_id is not None and tok.encode("a", add_special_tokens=True).ids[:1] == [self.bos_id]
        self.chat_template = chat_template or pick_chat_template(self.config.get("chat_template"))

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_file(cls, tokenizer_json: str | os.PathLike, config_json: str | os.PathLike | None = None,
                  chat_template: str | None = None) -> HFTokenizer:
        try:
            tok = RustTokenizer.from_file(str(tokenizer_json))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise QianwenError(f"cannot read {tokenizer_json}: {str(e).splitlines()[0] if str(e) else e}") from None
        config = {}
        if config_json is not None and Path(config_json).is_file():
            try:
                config = json.loads(Path(config_json).read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise QianwenError(f"cannot read {config_json}: {e}") from None
            if not isinstance(config, dict):
                raise QianwenError(f"{config_json} holds {type(config).__name__}, not a JSON object")
        return cls(tok, config=config, chat_template=chat_template)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> HFTokenizer:
        d = Path(folder)
        jinja = d / "chat_template.jinja"
        template = jinja.read_text(encoding="utf-8") if jinja.is_file() else None
        tok = cls.from_file(d / "tokenizer.json", d / "tokenizer_config.json")
        if tok.chat_template is None:
            tok.chat_template = template
        return tok

    def _add_config_tokens(self) -> None:
        """Added tokens tokenizer_config.json lists that tokenizer.json lacks (older exports)."""
        entries = self.config.get("added_tokens_decoder") or {}
        if not isinstance(entries, dict) or not all(str(k).isdigit() and isinstance(v, dict) for k, v in entries.items()):
            raise QianwenError("tokenizer_config.json 'added_tokens_decoder' must map token ids to token entries")
        for i, entry in sorted(((int(k), v) for k, v in entries.items()), key=lambda kv: kv[0]):
            name = _token_name(entry)
            if name is None or self._tok.token_to_id(name) is not None:
                continue
            if i != self._tok.get_vocab_size(with_added_tokens=True):
                continue  # cannot be given that id; leave the vocabulary as tokenizer.json has it
            tok = AddedToken(name, special=bool(entry.get("special", True)),
                             normalized=bool(entry.get("normalized", False)))
            if tok.special:
                self._tok.add_special_tokens([tok])
            else:
                self._tok.add_tokens([tok])

    def _config_id(self, key: str) -> int | None:
        name = _token_name(self.config.get(key))
        return None if name is None else self.token_to_id(name)

    # -- the interface --------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._n

    @property
    def backend(self) -> RustTokenizer:
        """The wrapped `tokenizers.Tokenizer` (its encode matches special tokens: prefer `encode`)."""
        return self._tok

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        # With encode_special_tokens, special added tokens are not matched in the text: the string
        # is pre-tokenized and merged like any other. Non-special added tokens (e.g. Qwen3's
        # <think>) still match, as transformers does with split_special_tokens=True.
        with self._lock:
            self._tok.encode_special_tokens = not allow_special
            return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], allow_special: bool = False) -> list[list[int]]:
        with self._lock:
            self._tok.encode_special_tokens = not allow_special
            return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        ids = [int(i) for i in ids]
        if any(not 0 <= i < self._n for i in ids):
            ids = [i for i in ids if 0 <= i < self._n]
        return self._tok.decode(ids, skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        if token in self._added_ids:
            return self._added_ids[token]
        if self._mode == "bytelevel":
            spell = byte_to_unicode()
            i = self._tok.token_to_id("".join(spell[b] for b in token.encode("utf-8")))
        elif self._mode == "sentencepiece":
            i = self._tok.token_to_id(token.replace(" ", "\u2581"))
        else:
            i = None
        return i if i is not None else self._tok.token_to_id(token)  # the vocabulary's own spelling

    def id_to_token_bytes(self, token_id: int) -> bytes:
        b = self._bytes_cache.get(token_id)
        if b is None:
            b = self._bytes_cache[token_id] = self._token_bytes(token_id)
        return b

    def _token_bytes(self, i: int) -> bytes:
        if i in self._added:
            return self._added[i].encode("utf-8")
        piece = self._tok.id_to_token(i) if 0 <= i < self._n else None
        if piece is None:
            return b""
        if self._mode == "bytelevel":
            inv = unicode_to_byte()
            return b"".join(bytes([inv[c]]) if c in inv else c.encode("utf-8") for c in piece)
        if self._mode == "sentencepiece":
            if self._byte_fallback and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                return bytes([int(piece[3:5], 16)])
            return piece.replace("\u2581", " ").encode("utf-8")
        return self._tok.decode([i], skip_special_tokens=False).encode("utf-8")

    def save(self, directory: str | os.PathLike) -> None:
        """tokenizer.json and tokenizer_config.json (with the chat template, when there is one)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        write_atomic(d / "tokenizer.json", self._tok.to_str(pretty=True))
        config = dict(self.config)
        config["added_tokens_decoder"] = {
            str(i): {"content": a.content, "lstrip": a.lstrip, "normalized": a.normalized, "rstrip": a.rstrip,
                     "single_word": a.single_word, "special": a.special}
            for i, a in sorted(self._tok.get_added_tokens_decoder().items())
        }
        for key, i in (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("pad_token", self.pad_id)):
            if key not in config:
                config[key] = self.id_to_token_bytes(i).decode("utf-8") if i is not None else None
        config.setdefault("add_bos_token", self.add_bos)
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        config.setdefault("clean_up_tokenization_spaces", False)
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        write_atomic(d / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
