"""Structured output through the OpenAI server on the default model: response_format, vLLM's guided_*
extras, always-valid tool calls (Hermes and ReAct), the 400s, and the official client's `parse`."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from qianwen.server import ServerConfig, create_app

from ._server_fixtures import ThreadServer
from .structured_schemas import SCHEMAS

openai = pytest.importorskip("openai")

NAME = "smol"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
STOCK = {"type": "function", "function": {
    "name": "get_stock_price", "description": "The latest price of a stock.",
    "parameters": {"type": "object", "properties": {"ticker": {"type": "string", "pattern": "^[A-Z]{1,5}$"}},
                   "required": ["ticker"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What's the weather in Paris, and how is Apple's stock doing?"}]


@pytest.fixture(scope="module")
def server(default_gguf):
    import qianwen

    model = qianwen.load(default_gguf)
    app = create_app(model, config=ServerConfig(model_name=NAME))
    with ThreadServer(app) as s:
        s.model = model
        s.client = openai.OpenAI(base_url=s.base + "/v1", api_key="unused", max_retries=0)
        yield s


def _schema_of(tool: dict) -> dict:
    return tool["function"]["parameters"]


def _check_calls(message, tools: list[dict], name: str | None = None) -> None:
    assert message.tool_calls, message.content
    by_name = {t["function"]["name"]: t for t in tools}
    for call in message.tool_calls:
        assert call.function.name in by_name and (name is None or call.function.name == name)
        jsonschema.validate(json.loads(call.function.arguments), _schema_of(by_name[call.function.name]))


def test_response_format_json_schema_streamed_and_not(server):
    prompt, schema = SCHEMAS[6]
    rf = {"type": "json_schema", "json_schema": {"name": "report", "schema": schema, "strict": True}}
    kw = dict(model=NAME, messages=[{"role": "user", "content": prompt}], response_format=rf, temperature=0,
              max_tokens=120)
    r = server.client.chat.completions.create(**kw)
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    chunks = list(server.client.chat.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    r = server.client.chat.completions.create(**{**kw, "response_format": {"type": "json_object"}})
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_vllm_guided_extras(server):
    c = server.client
    msg = [{"role": "user", "content": "Is Paris in France?"}]
    r = c.chat.completions.create(model=NAME, messages=msg, max_tokens=5, temperature=0.9, seed=1,
                                  extra_body={"guided_choice": ["yes", "no"]})
    assert r.choices[0].message.content in ("yes", "no")
    r = c.completions.create(model=NAME, prompt="Phone number:", max_tokens=16, temperature=0.9, seed=2,
                             extra_body={"guided_regex": r"\d{3}-\d{4}"})
    assert len(r.choices[0].text) == 8 and r.choices[0].text[3] == "-"
    r = c.completions.create(model=NAME, prompt="A list:", max_tokens=16, temperature=0,
                             extra_body={"structured_outputs": {"json": {"type": "array", "maxItems": 2,
                                                                         "items": {"type": "integer"}}}})
    assert isinstance(json.loads(r.choices[0].text), list)
    r = c.completions.create(model=NAME, prompt="Answer:", max_tokens=8, temperature=0,
                             extra_body={"guided_grammar": 'start: "A" | "B" | "C"'})
    assert r.choices[0].text in ("A", "B", "C")


@pytest.mark.parametrize("body, needle", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "string", "format": "hostname-idn"}}}}}}, "format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "uniqueItems": True}}}}, "uniqueItems"),
    ({"response_format": {"type": "yaml"}}, "yaml"),
    ({"guided_regex": "(a", "guided_choice": ["a"]}, "at most one"),
    ({"guided_grammar": "start: ("}, "cannot be enforced"),
    ({"structured_outputs": {"xml": "<a/>"}}, "xml"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "tool_choice"),
])
def test_what_cannot_be_enforced_is_a_400(server, body, needle):
    r = httpx.post(server.base + "/v1/chat/completions", json={
        "model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **body}, timeout=60)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]
    assert httpx.get(server.base + "/health").status_code == 200


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_stock_price"}}])
def test_forced_tool_calls_always_valid(server, choice):
    name = choice["function"]["name"] if isinstance(choice, dict) else None
    tools = [WEATHER, STOCK]
    r = server.client.chat.completions.create(model=NAME, messages=ASK, tools=tools, tool_choice=choice,
                                              temperature=0, max_tokens=120)
    assert r.choices[0].finish_reason == "tool_calls"
    _check_calls(r.choices[0].message, tools, name)
    r = server.client.chat.completions.create(model=NAME, messages=ASK, tools=tools, tool_choice=choice, n=4,
                                              temperature=1.0, seed=11, max_tokens=120,
                                              parallel_tool_calls=False)
    for ch in r.choices:  # every sampled try
        assert ch.finish_reason == "tool_calls" and len(ch.message.tool_calls) == 1
        _check_calls(ch.message, tools, name)
    chunks = list(server.client.chat.completions.create(model=NAME, messages=ASK, tools=tools, tool_choice=choice,
                                                        temperature=0, max_tokens=120, stream=True))
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or []) if tc.index == 0]
    called = next(tc.function.name for tc in deltas if tc.function.name)
    args = "".join(tc.function.arguments or "" for tc in deltas)
    jsonschema.validate(json.loads(args), _schema_of(WEATHER if called == "get_weather" else STOCK))


def test_auto_may_answer_in_text_or_a_valid_call(server):
    tools = [WEATHER, STOCK]
    r = server.client.chat.completions.create(model=NAME, messages=ASK, tools=tools, n=4, temperature=1.0,
                                              seed=5, max_tokens=120)
    for ch in r.choices:
        if ch.finish_reason == "tool_calls":
            _check_calls(ch.message, tools)
        else:  # text: no half-written call left in it
            assert "<tool_call>" not in (ch.message.content or "")


def test_react_calls_always_valid(server):
    server.model.config.model_type = "qwen"  # present it as the original Qwen-7B-Chat: ReAct prompts
    try:
        tools = [WEATHER, STOCK]
        r = server.client.chat.completions.create(model=NAME, messages=ASK, tools=tools, tool_choice="required",
                                                  n=3, temperature=1.0, seed=3, max_tokens=120)
        for ch in r.choices:
            assert ch.finish_reason == "tool_calls"
            _check_calls(ch.message, tools)
    finally:
        server.model.config.model_type = "llama"


def test_openai_client_parse_with_pydantic(server):
    from pydantic import BaseModel, Field

    class City(BaseModel):
        name: str = Field(max_length=20)
        country: str = Field(max_length=20)
        population_millions: float

    r = server.client.chat.completions.parse(model=NAME, messages=[
        {"role": "user", "content": "Describe Paris as JSON."}], response_format=City, temperature=0,
        max_tokens=80)
    city = r.choices[0].message.parsed
    assert isinstance(city, City) and city.name
