"""Chat prompts: the checkpoint's Jinja template (sandboxed) or built-in ChatML.

Encoding keeps user text plain: template text may contain control tokens (`<|im_start|>`), but each
message's content is encoded with special tokens disallowed, so a typed `<|im_end|>` stays text.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import QianwenError

QWEN_DEFAULT_SYSTEM = "You are a helpful assistant."
QWEN25_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."  # Qwen2.5's, for tools

CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' and default_system %}"
    "{{ '<|im_start|>system\\n' + default_system + '<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _raise(message: str) -> None:
    raise TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


_env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
_env.filters["tojson"] = _tojson
_env.globals["raise_exception"] = _raise
_env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)


class ChatTemplate:
    def __init__(self, source: str | None = None, default_system: str | None = None,
                 special_tokens: dict[str, str] | None = None) -> None:
        self.builtin = source is None
        self.source = source if source is not None else CHATML
        self.default_system = default_system
        self.special_tokens = special_tokens or {}
        try:
            self._tpl = _env.from_string(self.source)
        except TemplateError as e:
            raise QianwenError(f"the chat template does not parse: {e}") from None

    @property
    def supports_tools(self) -> bool:
        return not self.builtin and "tools" in self.source

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
               tools: list[dict[str, Any]] | None = None, **kwargs: Any) -> str:
        for m in messages:
            if not isinstance(m, dict) or "role" not in m:
                raise QianwenError("each message needs a 'role' (and usually 'content')")
        try:
            return self._tpl.render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                    default_system=self.default_system, **self.special_tokens, **kwargs)
        except TemplateError as e:
            raise QianwenError(f"chat template error: {e}") from None

    def encode(self, tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
               tools: list[dict[str, Any]] | None = None, **kwargs: Any) -> list[int]:
        text = self.render(messages, add_generation_prompt, tools, **kwargs)
        return encode_rendered(tokenizer, text, [m.get("content") for m in messages])


def encode_rendered(tokenizer, text: str, contents: list[Any]) -> list[int]:
    """Encode a rendered prompt: template text with special tokens allowed, message contents as plain
    text. When no content holds a special-token string the whole text is encoded at once (exactly as
    transformers would; `Tokenizer.encode_prompt` reuses the ids of a recent prompt for the start they share);
    otherwise contents are found in order and encoded apart as plain text (`Tokenizer.encode_piece`)."""
    specials = list(getattr(tokenizer, "special_tokens", {}) or {})
    if not any(isinstance(c, str) and any(s in c for s in specials) for c in contents):
        return tokenizer.encode_prompt(text)
    spans: list[tuple[int, int]] = []
    pos = 0
    for c in contents:
        if not isinstance(c, str) or not c:
            continue
        i = text.find(c, pos)
        if i >= 0:
            spans.append((i, i + len(c)))
            pos = i + len(c)
    ids: list[int] = []
    pos = 0
    for a, b in spans:  # the same messages come again in each turn of a chat: their ids are remembered
        ids += tokenizer.encode_piece(text[pos:a], allow_special=True) if a > pos else []
        ids += tokenizer.encode_piece(text[a:b], allow_special=False)
        pos = b
    if pos < len(text):
        ids += tokenizer.encode_piece(text[pos:], allow_special=True)
    return ids
