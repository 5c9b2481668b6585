"""Tool calling: prompts equal the official Qwen2.5 template; parsers handle recorded answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qianwen.chat import tools as T

# a verbatim copy of the official Qwen2.5-Instruct chat template
TEMPLATE = Path(__file__).parent / "data" / "qwen2.5-instruct.jinja"

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "城市名"},
                                                    "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Current time <UTC> & date.",
                                         "parameters": {"type": "object", "properties": {}}}}

CONVERSATIONS = {
    "plain_no_system": ([{"role": "user", "content": "Hello!"}], None),
    "plain_system_multiturn": ([
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "你好吗？"}], None),
    "tools_no_system": ([{"role": "user", "content": "Weather in Paris?"}], [WEATHER]),
    "tools_system_two_tools": ([{"role": "system", "content": "You are a bot."},
                                {"role": "user", "content": "Weather and time in 北京?"}], [WEATHER, TIME]),
    "tool_round_trip": ([
        {"role": "user", "content": "Weather in Paris and the time?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
        {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
        {"role": "assistant", "content": "It is 21C at 12:00."},
        {"role": "user", "content": "Thanks"}], [WEATHER, TIME]),
    "assistant_content_and_call": ([
        {"role": "user", "content": "Paris?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c", "content": "sunny"}], [WEATHER]),
}

# Recorded once from the official template (transformers' renderer) and kept verbatim.
RECORDED_TOOLS_NO_SYSTEM = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n# Tools\n\n"
    "You may call one or more functions to assist with the user query.\n\nYou are provided with function "
    "signatures within <tools></tools> XML tags:\n<tools>\n"
    '{"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city.", '
    '"parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "城市名"}, '
    '"unit": {"type": "string", "enum": ["c", "f"]}}, "required": ["city"]}}}\n</tools>\n\n'
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
    'XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
    "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n")


def official(messages, tools, add_generation_prompt=True) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template([T.prepare_messages(messages)], tools=tools,
                                        chat_template=TEMPLATE.read_text(),
                                        add_generation_prompt=add_generation_prompt)
    return rendered[0]


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("gen", [True, False])
def test_hermes_equals_official_template(name, gen):
    messages, tools = CONVERSATIONS[name]
    ours = T.render_hermes(T.prepare_messages(messages), tools, add_generation_prompt=gen)
    assert ours == official(messages, tools, gen)


def test_recorded_rendering():
    messages, tools = CONVERSATIONS["tools_no_system"]
    assert official(messages, tools) == RECORDED_TOOLS_NO_SYSTEM
    assert T.render_hermes(messages, tools) == RECORDED_TOOLS_NO_SYSTEM


def test_prepare_messages_parses_argument_strings_without_touching_input():
    messages, _ = CONVERSATIONS["tool_round_trip"]
    out = T.prepare_messages(messages)
    assert out[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris", "unit": "c"}
    assert isinstance(messages[1]["tool_calls"][0]["function"]["arguments"], str)
    parts = T.prepare_messages([{"role": "user", "content": [{"type": "text", "text": "a"},
                                                             {"type": "text", "text": "b"}]}])
    assert parts[0]["content"] == "ab"


def test_tool_format_choice():
    from qianwen.models import architecture

    def fmt(model_type: str, source: str | None) -> str:
        return T.tool_format(architecture(model_type).tool_format, source)

    assert fmt("qwen2", "{% if tools %}...{% endif %}") == "template"
    assert fmt("llama", "{{ messages }}") == "hermes"
    assert fmt("llama", None) == "hermes"
    assert fmt("qwen", None) == "react"
    assert fmt("qwen", "{% if tools %}...{% endif %}") == "template"


# ------------------------------------------------------------------ Hermes parsing (recorded answers)

HERMES_ANSWERS = [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     None, [("get_weather", {"city": "Paris"})]),
    ('I will check both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京", "unit": "c"}}\n'
     '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
     "I will check both.", [("get_weather", {"city": "北京", "unit": "c"}), ("get_time", {})]),
    # arguments given as a JSON string: parsed a second time
    ('<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}\n</tool_call>',
     None, [("get_weather", {"city": "Oslo"})]),
    # the model stopped before the closing tag
    ('<tool_call>\n{"name": "get_time", "arguments": {}}', None, [("get_time", {})]),
    # malformed JSON: plain content, never an error
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>',
     '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>', []),
    ("<tool_call>\nnot json at all", "<tool_call>\nnot json at all", []),
    ("The answer is 42.", "The answer is 42.", []),
    ("Use <tool_ to call", "Use <tool_ to call", []),
    ('<tool_call>\n{"arguments": {}}\n</tool_call>', '<tool_call>\n{"arguments": {}}\n</tool_call>', []),
]


@pytest.mark.parametrize("text,content,calls", HERMES_ANSWERS)
def test_parse_hermes(text, content, calls):
    got_content, got_calls = T.parse_hermes(text)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got_calls] == calls
    assert all(c.id.startswith("call_") for c in got_calls)
    assert len({c.id for c in got_calls}) == len(got_calls)


def _stream(parser, text: str, step: int):
    deltas = []
    for i in range(0, len(text), step):
        deltas += parser.feed(text[i:i + step])
    return deltas + parser.finish()


@pytest.mark.parametrize("text,content,calls", HERMES_ANSWERS)
@pytest.mark.parametrize("step", [1, 3, 7])
def test_hermes_streaming_matches_non_streaming(text, content, calls, step):
    deltas = _stream(T.HermesStreamParser(), text, step)
    got_content, got_calls = T._collect(deltas)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got_calls] == calls
    # each call streams as OpenAI does: first id/type/name with empty arguments, then argument text
    firsts = [d["tool_calls"][0] for d in deltas if "tool_calls" in d and "id" in d["tool_calls"][0]]
    assert [f["index"] for f in firsts] == list(range(len(calls)))
    assert all(f["type"] == "function" and f["function"]["arguments"] == "" for f in firsts)


def test_hermes_stream_passes_content_early():
    p = T.HermesStreamParser()
    assert p.feed("Hello wor") == [{"content": "Hello wor"}]
    assert p.feed("ld <tool") == [{"content": "ld"}]  # "<tool" could open a call: held back
    assert p.feed("box>") == [{"content": " <toolbox>"}]


# ------------------------------------------------------------------ ReAct (Qwen-7B-Chat)

def test_react_prompt_layout():
    prompt = T.render_react([{"role": "user", "content": "Weather in Paris?"}], [WEATHER])
    assert prompt.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                             "Answer the following questions as best you can. You have access to the following tools:")
    assert ("get_weather: Call this tool to interact with the get_weather API. What is the get_weather API useful "
            "for? Get the current weather in a city. Parameters: " +
            json.dumps(WEATHER["function"]["parameters"], ensure_ascii=False) +
            " Format the arguments as a JSON object.") in prompt
    assert "Action: the action to take, should be one of [get_weather]" in prompt
    assert prompt.endswith("Begin!\n\nQuestion: Weather in Paris?<|im_end|>\n<|im_start|>assistant\n")


def test_react_tool_result_continues_assistant_turn():
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "I should look it up.", "tool_calls": [
                    {"id": "c", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "c", "content": "sunny, 21C"}]
    prompt = T.render_react(messages, [WEATHER])
    assert prompt.endswith('<|im_start|>assistant\nThought: I should look it up.\nAction: get_weather\n'
                           'Action Input: {"city": "Paris"}\nObservation: sunny, 21C\nThought:')
    assert "Question: Weather in Paris?<|im_end|>" in prompt


def test_react_without_tools_is_chatml():
    prompt = T.render_react([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                             {"role": "assistant", "content": "A"}, {"role": "user", "content": "Q2"}])
    assert prompt == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA"
                      "<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n")


REACT_ANSWERS = [
    ('Thought: I need the weather.\nAction: get_weather\nAction Input: {"city": "Paris"}\nObservation:',
     "Thought: I need the weather.", [("get_weather", {"city": "Paris"})]),
    ('Thought: look up\nAction: get_time\nAction Input: {}', "Thought: look up", [("get_time", {})]),
    ("Thought: I now know the final answer\nFinal Answer: 巴黎今天晴。", "巴黎今天晴。", []),
    ("Thought: x\nAction: get_weather\nAction Input: city=Paris",
     "Thought: x\nAction: get_weather\nAction Input: city=Paris", []),
    ("Just text.", "Just text.", []),
]


@pytest.mark.parametrize("text,content,calls", REACT_ANSWERS)
def test_parse_react(text, content, calls):
    got_content, got_calls = T.parse_react(text)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got_calls] == calls


@pytest.mark.parametrize("text,content,calls", REACT_ANSWERS)
@pytest.mark.parametrize("step", [1, 5])
def test_react_streaming_matches_non_streaming(text, content, calls, step):
    got_content, got_calls = T._collect(_stream(T.ReactStreamParser(), text, step))
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got_calls] == calls
