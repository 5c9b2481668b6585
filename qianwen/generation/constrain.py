"""Constrained decoding with llguidance: grammars from JSON schemas, regexes, choices and Lark, and a
logits processor that masks every token the grammar does not allow.

Why llguidance rather than xgrammar (measured side by side, BENCHMARKS.md "Structured output"): no
dependencies (xgrammar requires transformers, which this package must not import at run time, and triton),
a 7.6 MB install, schemas compiled in about 1 ms (xgrammar: about 110 ms, paid per new schema, i.e. per
request), and Lark grammars that mix free text with JSON (tool calls under `tool_choice` "auto"). xgrammar's
precomputed masks are faster per token (about 0.002 ms against llguidance's 0.5 ms mean), but both are far
below a decode step, and llguidance's mask is computed while the forward runs.

Any tokenizer backend works: llguidance sees each id's bytes (`id_to_token_bytes`), special tokens
marked as llguidance expects (a 0xFF byte in front), and the tokenizer's own `encode`.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import llguidance as llg
import numpy as np
import torch

from ..errors import QianwenError

# options of generate/chat (and offline engine requests) that constrain the output rather than sample it
CONSTRAINT_OPTIONS = ("response_format", "json_schema", "regex", "choice", "grammar")
# JSON as people (and small models) write it: `{"a": 1, "b": 2}`, no free whitespace to loop in
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

_lock = threading.Lock()
_tokenizers: dict[tuple[int, frozenset[int]], tuple[Any, llg.LLTokenizer]] = {}


class GrammarError(QianwenError):
    """A schema or grammar that cannot be enforced; the message names what is wrong."""


class _Vocab:
    """What llguidance.TokenizerWrapper reads from a tokenizer."""

    def __init__(self, tokenizer: Any, eos_ids: list[int]) -> None:
        specials = set(tokenizer.special_ids)
        self.tok = tokenizer
        self.eos_token_id = eos_ids[0]
        self.bos_token_id = tokenizer.bos_id
        self.tokens = [b"\xff" + tokenizer.id_to_token_bytes(i) if i in specials else tokenizer.id_to_token_bytes(i)
                       for i in range(tokenizer.vocab_size)]
        self.special_token_ids = sorted(specials)

    def __call__(self, text: bytes | str) -> list[int]:
        return self.tok.encode(text.decode("utf-8", "replace") if isinstance(text, bytes) else text)


def ll_tokenizer(tokenizer: Any, eos_ids: set[int] | list[int]) -> llg.LLTokenizer:
    """The llguidance view of `tokenizer` (built once per tokenizer and set of end tokens, ~1 s)."""
    eos = sorted(eos_ids)
    if not eos:
        raise QianwenError("constrained decoding needs the model's end-of-text token")
    key = (id(tokenizer), frozenset(eos))
    with _lock:
        hit = _tokenizers.get(key)
        if hit is None or hit[0] is not tokenizer:
            hit = (tokenizer, llg.LLTokenizer(llg.TokenizerWrapper(_Vocab(tokenizer, eos)), eos_token=eos))
            _tokenizers[key] = hit
        return hit[1]


# ---------------------------------------------------------------- grammars

def with_thinking(rules: str) -> str:
    """A Lark grammar whose `body` rule follows a `<think>...</think>` block (Qwen3 in thinking mode always
    writes one, empty after `/no_think`). The block is required: an optional one would be ambiguous with
    free text that starts the same way."""
    return 'start: "<think>" thought /[ \\t\\n]*/ body\n' + 'thought[stop="</think>"]: /(?s:.*)/\n' + rules


def json_schema_grammar(schema: dict[str, Any] | bool, think: bool = False) -> str:
    if not isinstance(schema, dict | bool):
        raise GrammarError("a JSON schema must be a JSON object")
    if think:
        return llg.LLMatcher.grammar_from_lark(with_thinking("body: " + lark_json(schema)))
    try:
        return llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=JSON_OPTIONS)
    except ValueError as e:
        raise GrammarError(f"invalid JSON schema: {e}") from None


def lark_json(schema: dict[str, Any] | bool) -> str:
    """A JSON schema embedded in a Lark grammar (same JSON style as `json_schema_grammar`)."""
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS})


def choice_grammar(choices: list[str], think: bool = False) -> str:
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise GrammarError("guided_choice must be a non-empty list of strings")
    body = " | ".join(json.dumps(c) for c in choices)
    return llg.LLMatcher.grammar_from_lark(with_thinking("body: " + body) if think else "start: " + body)


def grammar_from_request(response_format: dict[str, Any] | None = None, json_schema: Any = None,
                         regex: str | None = None, choice: list[str] | None = None,
                         grammar: str | None = None, think: bool = False) -> str | None:
    """The llguidance grammar for an OpenAI `response_format` or vLLM's guided_* options (at most one).
    `think`: a Qwen3 `<think>...</think>` block may come first (JSON schemas and choices; a regex or a
    grammar of the caller's applies from the first token)."""
    given = [k for k, v in (("response_format", response_format), ("json_schema", json_schema), ("regex", regex),
                            ("choice", choice), ("grammar", grammar)) if v is not None]
    if len(given) > 1:
        raise GrammarError(f"give at most one output constraint, got {', '.join(given)}")
    if response_format is not None:
        kind = response_format.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return json_schema_grammar({"type": "object"}, think)
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict) or "schema" not in spec and "json_schema" not in spec:
                raise GrammarError("response_format json_schema needs {'name': ..., 'schema': {...}}")
            return json_schema_grammar(spec.get("schema", spec.get("json_schema")), think)
        raise GrammarError(f"unknown response_format type {kind!r} (text, json_object or json_schema)")
    if json_schema is not None:
        if isinstance(json_schema, str):
            try:
                json_schema = json.loads(json_schema)
            except json.JSONDecodeError as e:
                raise GrammarError(f"the JSON schema is not valid JSON: {e}") from None
        return json_schema_grammar(json_schema, think)
    if regex is not None:
        return llg.LLMatcher.grammar_from_regex(regex)
    if choice is not None:
        return choice_grammar(choice, think)
    if grammar is not None:
        if "::=" in grammar:  # GBNF (llama.cpp's format): llguidance converts it
            from llguidance.gbnf_to_lark import gbnf_to_lark

            try:
                grammar = gbnf_to_lark(grammar)
            except Exception as e:  # noqa: BLE001 - the converter raises several kinds
                raise GrammarError(f"the GBNF grammar does not convert: {e}") from None
        return llg.LLMatcher.grammar_from_lark(grammar)
    return None


def check_grammar(grammar: str, lltok: llg.LLTokenizer) -> None:
    """Raise GrammarError naming what llguidance cannot enforce (unsupported keywords, bad syntax)."""
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, lltok)
    if is_error:
        raise GrammarError(f"the output constraint cannot be enforced: {messages[0].strip()}")


# ---------------------------------------------------------------- the logits processor

class GrammarProcessor:
    """fn(prompt_ids, output_ids, logits) -> logits with every token the grammar forbids at -inf.

    It follows `output_ids` (tokens it has not seen are fed to the matcher first). The mask is computed
    right there, after the forward: computing it in a thread during the forward was measured slower on
    the CPU (BENCHMARKS.md: the forward's OpenMP threads hold the cores, the mask waits for them). When
    the grammar is complete only end tokens remain; if the matcher ever fails (a token it did not allow,
    forced by an earlier processor), only end tokens remain too, so the answer ends instead of going astray.
    """

    def __init__(self, lltok: llg.LLTokenizer, grammar: str, vocab_size: int) -> None:
        self.matcher = llg.LLMatcher(lltok, grammar, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(f"the output constraint cannot be enforced: {self.matcher.get_error()}")
        self.eos = list(lltok.eos_tokens)
        self.n_words = (lltok.vocab_size + 31) // 32
        self.vocab_size = vocab_size
        self.seen = 0
        self._mask = np.empty(self.n_words, dtype=np.int32)

    def allowed(self, output_ids: list[int]) -> np.ndarray:
        """Bool [vocab_size]: which tokens may come after `output_ids`."""
        for t in output_ids[self.seen:]:
            if not self.matcher.is_error():
                self.matcher.consume_token(t)
        self.seen = len(output_ids)
        out = np.zeros(self.vocab_size, dtype=bool)
        if self.matcher.is_error():
            out[self.eos] = True
            return out
        self.matcher.unsafe_compute_mask_ptr(self._mask.ctypes.data, self._mask.nbytes)
        bits = np.unpackbits(self._mask.view(np.uint8), bitorder="little")
        n = min(bits.size, self.vocab_size)  # logits may have rows the tokenizer lacks (padded embeddings)
        out[:n] = bits[:n]
        return out

    def __call__(self, prompt_ids: list[int], output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        # numpy, one thread: torch's 2-thread kernels stall on a busy machine for work this small
        allowed = self.allowed(output_ids)
        out = logits.clone()
        view = out.numpy()
        view[~allowed] = -np.inf
        if not np.isfinite(view).any():  # an earlier processor ruled out every allowed token
            view[allowed] = 0.0
        return out


def make_processor(tokenizer: Any, stop_ids: set[int], grammar: str, vocab_size: int | None = None
                   ) -> GrammarProcessor:
    """A checked processor for `grammar`; the answer may end on any of `stop_ids` once it is complete."""
    lltok = ll_tokenizer(tokenizer, stop_ids)
    check_grammar(grammar, lltok)
    return GrammarProcessor(lltok, grammar, vocab_size or tokenizer.vocab_size)
