"""Tool-call and output grammars, checked token by token with llguidance on a small real tokenizer:
what they accept and what they refuse (no model needed)."""

from __future__ import annotations

import llguidance as llg
import pytest

from qianwen.chat.tools import call_grammar
from qianwen.generation.constrain import GrammarError, grammar_from_request, ll_tokenizer
from qianwen.tokenizer import load_tokenizer

from .conftest import make_tokenizer

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
    "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time"}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'
TIME_CALL = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    make_tokenizer(folder)
    return load_tokenizer(folder)


def accepts(tok, grammar: str, text: str) -> bool:
    """Whether `text` is a complete answer under `grammar` (the end token may follow)."""
    lltok = ll_tokenizer(tok, {tok.token_to_id("<|im_end|>")})
    m = llg.LLMatcher(lltok, grammar, log_level=0)
    ids = tok.encode(text)  # as the model would write it: plain text
    return m.try_consume_tokens(ids) == len(ids) and m.is_accepting()


@pytest.mark.parametrize("choice, text, ok", [
    ("required", CALL, True),
    ("required", TIME_CALL, True),
    ("required", CALL + "\n" + TIME_CALL, True),
    ("required", "It is sunny.", False),
    ("required", CALL.replace('"Paris"', "Paris"), False),
    ("required", CALL.replace('"c"', '"kelvin"'), False),
    ("required", CALL.replace(', "unit": "c"', ', "extra": 1'), False),
    ("required", '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>', False),  # city required
    ("required", '<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>', False),
    ({"type": "function", "function": {"name": "get_time"}}, TIME_CALL, True),
    ({"type": "function", "function": {"name": "get_time"}}, CALL, False),
    ("auto", "It is sunny, <b>really</b>.", True),
    ("auto", "Let me check.\n" + CALL, True),
    ("auto", "Let me check. " + CALL.replace('"Paris"', "Paris"), False),
    ("auto", CALL, True),
])
def test_hermes_calls(tok, choice, text, ok):
    assert accepts(tok, call_grammar("hermes", [WEATHER, TIME], choice), text) is ok


def test_one_call_unless_parallel(tok):
    g = call_grammar("hermes", [WEATHER, TIME], "required", parallel=False)
    assert accepts(tok, g, CALL) and not accepts(tok, g, CALL + "\n" + TIME_CALL)


def test_none_or_no_tools_is_free():
    assert call_grammar("hermes", [WEATHER], "none") is None and call_grammar("hermes", [], "auto") is None


@pytest.mark.parametrize("choice, in_thought, text, ok", [
    ("required", False, 'Thought: weather.\nAction: get_weather\nAction Input: {"city": "Paris"}\nObservation:', True),
    ("required", False, 'Thought: weather.\nAction: get_weather\nAction Input: {city: Paris}\nObservation:', False),
    ("required", False, "Thought: easy.\nFinal Answer: 4", False),
    ("auto", False, "Thought: easy.\nFinal Answer: 4", True),
    ("auto", False, 'Thought: t.\nAction: get_time\nAction Input: {}\nObservation:', True),
    ("auto", False, 'Thought: t.\nAction: get_rain\nAction Input: {}\nObservation:', False),
    ("auto", True, " I now know the final answer.\nFinal Answer: sunny", True),
])
def test_react_calls(tok, choice, in_thought, text, ok):
    g = call_grammar("react", [WEATHER, TIME], choice, in_thought=in_thought)
    assert accepts(tok, g, text) is ok


def test_thinking_comes_first_and_is_free(tok):
    g = call_grammar("hermes", [WEATHER], "required", think=True)
    assert accepts(tok, g, "<think>\nMaybe {not json} <tool_call> here.\n</think>\n\n" + CALL)
    assert not accepts(tok, g, CALL)  # thinking mode: the think block is required
    j = grammar_from_request(json_schema={"type": "object", "properties": {"a": {"type": "integer"}}}, think=True)
    assert accepts(tok, j, '<think>\nok\n</think>\n\n{"a": 1}') and not accepts(tok, j, '<think>\nok\n</think>\n\nno')


@pytest.mark.parametrize("spec, text, ok", [
    ({"json_schema": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9}},
                      "required": ["n"]}}, '{"n": 5}', True),
    ({"json_schema": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9}},
                      "required": ["n"]}}, '{"n": 10}', False),
    ({"json_schema": {"$defs": {"p": {"type": "string", "enum": ["a", "b"]}}, "type": "array",
                      "items": {"$ref": "#/$defs/p"}}}, '["a", "b"]', True),
    ({"json_schema": {"$defs": {"p": {"type": "string", "enum": ["a", "b"]}}, "type": "array",
                      "items": {"$ref": "#/$defs/p"}}}, '["c"]', False),
    ({"response_format": {"type": "json_object"}}, '{"x": [1, 2]}', True),
    ({"response_format": {"type": "json_object"}}, "[1]", False),
    ({"regex": r"\d{3}-\d{4}"}, "555-1234", True),
    ({"regex": r"\d{3}-\d{4}"}, "555-12345", False),
    ({"choice": ["yes", "no"]}, "no", True),
    ({"choice": ["yes", "no"]}, "nope", False),
    ({"grammar": 'root ::= "a" "b"*'}, "abbb", True),
    ({"grammar": 'start: "x" NUM\nNUM: /[0-9]+/'}, "x12", True),
])
def test_request_grammars(tok, spec, text, ok):
    assert accepts(tok, grammar_from_request(**spec), text) is ok


def test_choice_must_be_strings():
    with pytest.raises(GrammarError, match="list of strings"):
        grammar_from_request(choice=[1, 2])


def test_tiktoken_backend(qwen_tiktoken):
    """The same adapter serves the tiktoken backend (qwen.tiktoken, 151,851 ids with Qwen's specials)."""
    from qianwen.tokenizer.tiktoken_backend import TiktokenTokenizer

    tt = TiktokenTokenizer(qwen_tiktoken)
    end = tt.token_to_id("<|im_end|>")
    lltok = ll_tokenizer(tt, {end})
    assert lltok.vocab_size == tt.vocab_size
    g = grammar_from_request(json_schema={"type": "object", "properties": {"城市": {"enum": ["北京", "上海"]}},
                                          "required": ["城市"], "additionalProperties": False})
    assert accepts(tt, g, '{"城市": "上海"}') and not accepts(tt, g, '{"城市": "广州"}')
    hermes = call_grammar("hermes", [WEATHER], "required")
    assert accepts(tt, hermes, CALL) and not accepts(tt, hermes, "It is sunny.")
