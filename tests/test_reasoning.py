"""Qwen3 thinking mode on a tiny Qwen3 checkpoint with the official template (tests/data/qwen3.jinja):
chat_template_kwargs reach the template, `<think>` goes to reasoning_content (message and stream deltas),
never into content or tool-call parsing; the parser alone; the CLI dims thinking."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from qianwen.chat.reasoning import ReasoningParser, split_reasoning
from qianwen.server import ServerConfig, create_app

from ._server_fixtures import ThreadServer, force, forcing_processor, load_tiny

TEMPLATE = (Path(__file__).parent / "data" / "qwen3.jinja").read_text()
NAME = "tiny3"
ASK = [{"role": "user", "content": "What is 2+2?"}]
THOUGHT = "<think>\nThe user asks 2+2.\nThat is 4.\n</think>\n\n"


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    from .conftest import save_tiny

    folder = save_tiny(tmp_path_factory.mktemp("tiny_qwen3"), "qwen3", max_position_embeddings=2048)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = TEMPLATE
    cfg_path.write_text(json.dumps(cfg))
    return folder


@pytest.fixture(scope="module")
def server(qwen3_dir):
    model = load_tiny(qwen3_dir, "float32")
    app = create_app(model, config=ServerConfig(model_name=NAME))
    with ThreadServer(app) as s:
        s.model, s.serving = model, app.state.serving
        openai = pytest.importorskip("openai")
        s.client = openai.OpenAI(base_url=s.base + "/v1", api_key="unused", max_retries=0)
        yield s


@pytest.mark.parametrize("text, reasoning, content", [
    (THOUGHT + "It is 4.", "The user asks 2+2.\nThat is 4.", "It is 4."),
    ("<think>\n\n</think>\n\nIt is 4.", None, "It is 4."),
    ("It is 4.", None, "It is 4."),
    ("It is <think> 4.", None, "It is <think> 4."),
    ("<think>\nstill thinking", "still thinking", ""),
])
def test_split_whole_and_streamed(text, reasoning, content):
    assert split_reasoning(text) == (reasoning, content)
    for size in (1, 3, 7):
        p = ReasoningParser()
        deltas = [d for i in range(0, len(text), size) for d in p.feed(text[i:i + size])] + p.finish()
        assert "".join(d.get("reasoning_content", "") for d in deltas) == (reasoning or "")
        assert "".join(d.get("content", "") for d in deltas) == content


def test_enable_thinking_reaches_the_template(server):
    tok = server.model.tokenizer
    seen = force(server, "It is 4.")
    server.client.chat.completions.create(model=NAME, messages=ASK, max_tokens=20,
                                          extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert tok.decode(seen[0]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    server.client.chat.completions.create(model=NAME, messages=ASK, max_tokens=20)
    assert tok.decode(seen[1]).endswith("<|im_start|>assistant\n")
    ask = [{"role": "user", "content": "What is 2+2? /no_think"}]  # the soft switch reaches the model as typed
    server.client.chat.completions.create(model=NAME, messages=ask, max_tokens=20)
    assert tok.decode(seen[2]).endswith("What is 2+2? /no_think<|im_end|>\n<|im_start|>assistant\n")


def test_reasoning_content_in_message_and_stream(server):
    force(server, THOUGHT + "It is 4.")
    r = server.client.chat.completions.create(model=NAME, messages=ASK, max_tokens=60)
    msg = r.choices[0].message
    assert msg.content == "It is 4."
    assert msg.reasoning_content == "The user asks 2+2.\nThat is 4."
    chunks = list(server.client.chat.completions.create(model=NAME, messages=ASK, max_tokens=60, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == msg.reasoning_content
    assert "".join(d.content or "" for d in deltas) == "It is 4."


def test_tool_call_in_thinking_is_not_a_call(server):
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    thought = ('<think>\nI could write <tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
               "</tool_call> but no.\n</think>\n\n")
    force(server, thought + "No call needed.")
    r = server.client.chat.completions.create(model=NAME, messages=ASK, tools=[weather], max_tokens=400)
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
    assert r.choices[0].message.content == "No call needed."
    assert "<tool_call>" in r.choices[0].message.reasoning_content
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    force(server, "<think>\nCall it.\n</think>\n\n" + call)
    r = server.client.chat.completions.create(model=NAME, messages=ASK, tools=[weather], max_tokens=400)
    assert r.choices[0].finish_reason == "tool_calls"
    assert r.choices[0].message.reasoning_content == "Call it."
    assert json.loads(r.choices[0].message.tool_calls[0].function.arguments) == {"city": "Oslo"}


def test_cli_chat_dims_thinking(qwen3_dir):
    from qianwen.cli.chat_cmd import ChatSession

    model = load_tiny(qwen3_dir, "float32")
    ids = model.tokenizer.encode(THOUGHT + "It is 4.")
    end = model.tokenizer.token_to_id("<|im_end|>")
    session = ChatSession(model, None, {"max_tokens": 60, "temperature": 0,
                                        "logits_processors": [forcing_processor(ids, end)]})
    out = io.StringIO()
    answer = session.answer("What is 2+2?", out=out, dim=True)
    assert answer == "It is 4."
    assert "\x1b[2mThe user asks 2+2.\nThat is 4.\x1b[0m\nIt is 4." in out.getvalue()
    assert out.getvalue().rstrip().endswith("It is 4.")
    assert session.history[-1] == {"role": "assistant", "content": "It is 4."}
