"""Tool calling end to end: the model's output is forced to a given text by a logits processor, so the
whole path (prompt, generation, parsing, tool_calls deltas, tool results back) runs for real."""

from __future__ import annotations

import json

import pytest

from qianwen.chat import tools as T
from qianwen.server import ServerConfig, create_app

from ._server_fixtures import ThreadServer, force, load_tiny
from .test_tools import WEATHER, official

NAME = "tiny"
ASK = [{"role": "user", "content": "What's the weather in Paris?"}]
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'


@pytest.fixture(scope="module")
def tools_dir(tmp_path_factory):
    from .conftest import save_tiny

    # tool prompts are long for a 384-token vocabulary: give the tiny model a longer context
    return save_tiny(tmp_path_factory.mktemp("tiny_tools"), "qwen2", max_position_embeddings=2048)


@pytest.fixture(scope="module")
def server(tools_dir):
    model = load_tiny(tools_dir, "float32")
    app = create_app(model, config=ServerConfig(model_name=NAME))
    with ThreadServer(app) as s:
        s.model, s.serving = model, app.state.serving
        yield s


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0)


def expected_ids(server, messages, tools) -> list[int]:
    return server.model.tokenizer.encode(official(messages, tools), allow_special=True)


def test_tool_call_round_trip(server, client):
    seen = force(server, CALL_TEXT)
    r = client.chat.completions.create(model=NAME, messages=ASK, tools=[WEATHER])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "c"}
    assert seen[0] == expected_ids(server, ASK, [WEATHER])  # the prompt is the official template's
    assert r.usage.completion_tokens == len(server.model.tokenizer.encode(CALL_TEXT)) + 1

    # the tool's result goes back in the model's format, and the model answers
    history = ASK + [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    seen = force(server, "It is 21 degrees in Paris.")
    r2 = client.chat.completions.create(model=NAME, messages=history, tools=[WEATHER])
    assert r2.choices[0].message.content == "It is 21 degrees in Paris."
    assert r2.choices[0].finish_reason == "stop" and not r2.choices[0].message.tool_calls
    assert seen[0] == expected_ids(server, history, [WEATHER])
    assert "<tool_response>\n{\"temperature\": 21}\n</tool_response>" in server.model.tokenizer.decode(seen[0])


def test_tool_call_streaming_deltas(server, client):
    force(server, "Checking.\n" + CALL_TEXT)
    chunks = list(client.chat.completions.create(model=NAME, messages=ASK, tools=[WEATHER], stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert content == "Checking."
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].index == 0 and deltas[0].id.startswith("call_") and deltas[0].type == "function"
    assert deltas[0].function.name == "get_weather"
    assert all(d.index == 0 for d in deltas)
    args = "".join(d.function.arguments or "" for d in deltas)
    assert json.loads(args) == {"city": "Paris", "unit": "c"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["tool_calls"]


def test_malformed_tool_call_cannot_be_written(server, client):
    """Calls are grammar-constrained: a model trying to write bad JSON in a call is held to valid JSON."""
    bad = '<tool_call>\n{"name": "get_weather", "arguments": {"city": Paris}}\n</tool_call>'
    force(server, bad)
    r = client.chat.completions.create(model=NAME, messages=ASK, tools=[WEATHER], max_tokens=60)
    assert r.choices[0].message.content != bad
    for call in r.choices[0].message.tool_calls or []:
        assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments), dict)


def test_tool_choice_none_and_named(server, client):
    seen = force(server, "No tools.")
    r = client.chat.completions.create(model=NAME, messages=ASK, tools=[WEATHER], tool_choice="none")
    assert r.choices[0].message.content == "No tools."
    assert seen[0] == server.model.encode_chat(ASK)  # the plain chat prompt, no tools in it

    seen = force(server, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>')
    r = client.chat.completions.create(model=NAME, messages=ASK, tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert r.choices[0].finish_reason == "tool_calls"
    assert json.loads(r.choices[0].message.tool_calls[0].function.arguments) == {"city": "Oslo"}
    assert seen[0] == expected_ids(server, ASK, [WEATHER])  # the call is constrained, not forced in the prompt




@pytest.fixture(scope="module")
def react(tools_dir):
    """The same tiny network presented as an original Qwen-7B-Chat (model_type `qwen`): ReAct prompts."""
    model = load_tiny(tools_dir, "float32")
    model.config.model_type = "qwen"
    app = create_app(model, config=ServerConfig(model_name=NAME))
    with ThreadServer(app) as s:
        s.model, s.serving = model, app.state.serving
        openai = pytest.importorskip("openai")
        s.client = openai.OpenAI(base_url=s.base + "/v1", api_key="unused", max_retries=0)
        yield s


def test_react_round_trip(react):
    client, tok = react.client, react.model.tokenizer
    seen = force(react, 'Thought: I need the weather.\nAction: get_weather\nAction Input: {"city": "Paris"}\n'
                        "Observation: (the model would invent one)")
    r = client.chat.completions.create(model=NAME, messages=ASK, tools=[WEATHER])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"  # stopped at "Observation:"
    assert choice.message.tool_calls[0].function.name == "get_weather"
    assert json.loads(choice.message.tool_calls[0].function.arguments) == {"city": "Paris"}
    prompt = tok.decode(seen[0])
    assert prompt == T.render_react(ASK, [WEATHER])
    assert "Question: What's the weather in Paris?" in prompt

    history = ASK + [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": choice.message.tool_calls[0].id, "content": "sunny"}]
    seen = force(react, " I now know the final answer.\nFinal Answer: It is sunny in Paris.")
    r2 = client.chat.completions.create(model=NAME, messages=history, tools=[WEATHER])
    assert r2.choices[0].message.content == "It is sunny in Paris." and r2.choices[0].finish_reason == "stop"
    assert tok.decode(seen[0]).endswith('Action Input: {"city": "Paris"}\nObservation: sunny\nThought:')
    chunks = list(client.chat.completions.create(model=NAME, messages=history, tools=[WEATHER], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "It is sunny in Paris."
