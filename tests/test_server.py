"""The OpenAI-compatible server on a tiny model: endpoints, streaming, validation, load, disconnects."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from qianwen.engine import EngineConfig
from qianwen.server import ServerConfig, create_app

from ._server_fixtures import ThreadServer, load_tiny, metric

NAME = "tiny"


@pytest.fixture(scope="module")
def server(tiny_qwen2_dir):
    model = load_tiny(tiny_qwen2_dir, "float32")
    app = create_app(model, EngineConfig(max_num_seqs=16), ServerConfig(model_name=NAME, max_n=4, max_queue=64))
    with ThreadServer(app) as s:
        s.model = model
        yield s


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0)


def chat_body(content: str = "Hello", **kw) -> dict:
    return {"model": NAME, "messages": [{"role": "user", "content": content}], **kw}


def is_openai_error(r: httpx.Response) -> bool:
    try:
        err = r.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str) and err["message"]


def test_models_health_and_openapi(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(server.base + "/health").json()["status"] == "ok"
    spec = httpx.get(server.base + "/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"):
        assert path in spec["paths"]
    fields = spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    for f in ("messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p",
              "presence_penalty", "frequency_penalty", "repetition_penalty", "seed", "stop", "n", "logprobs",
              "top_logprobs", "user", "tools", "tool_choice", "stream", "stream_options"):
        assert f in fields, f


def test_chat_stream_equals_non_stream(client):
    kw = dict(model=NAME, messages=[{"role": "user", "content": "Tell me a story"}], temperature=0, max_tokens=20)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    assert full.usage.completion_tokens <= 20


def test_usage_counts_are_exact(server, client):
    model = server.model
    msgs = [{"role": "user", "content": "Count me"}]
    r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=7, temperature=0, logprobs=True)
    assert r.usage.prompt_tokens == len(model.encode_chat(msgs))
    assert r.usage.completion_tokens == len(r.choices[0].logprobs.content)
    c = client.completions.create(model=NAME, prompt="abc abc", max_tokens=5, temperature=0, extra_body={
        "ignore_eos": True})
    assert c.usage.prompt_tokens == len(model.tokenizer.encode("abc abc")) and c.usage.completion_tokens == 5
    assert c.choices[0].finish_reason == "length"


def test_completions_n_logprobs_and_stop(client):
    r = client.completions.create(model=NAME, prompt="The fox", max_tokens=12, temperature=0, n=2, logprobs=3,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text == r.choices[1].text  # greedy: both choices agree
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 12
    assert all(len(t) <= 3 for t in lp.top_logprobs)
    assert all(lp.token_logprobs[i] <= 0 for i in range(12))
    text = r.choices[0].text
    stop = text[4:6]
    if stop.strip():
        cut = client.completions.create(model=NAME, prompt="The fox", max_tokens=12, temperature=0, stop=[stop])
        assert cut.choices[0].text == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"
    # sampled choices with a seed are reproducible
    a = client.completions.create(model=NAME, prompt="The fox", max_tokens=8, temperature=1, seed=3, n=2)
    b = client.completions.create(model=NAME, prompt="The fox", max_tokens=8, temperature=1, seed=3, n=2)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]


def test_chat_logprobs_shape(client):
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.top_logprobs[0].logprob >= t.logprob for t in content)  # greedy picks the best


def test_prompt_longer_than_context(server):
    r = httpx.post(server.base + "/v1/chat/completions", json=chat_body("word " * 400))
    assert r.status_code == 400 and is_openai_error(r)
    msg = r.json()["error"]["message"]
    assert str(server.model.context_length) in msg and "tokens" in msg
    assert r.json()["error"]["code"] == "context_length_exceeded"
    r = httpx.post(server.base + "/v1/chat/completions", json=chat_body("hi", max_tokens=250))
    assert r.status_code == 400 and "in the completion" in r.json()["error"]["message"]


def malformed_requests() -> list[tuple[str, bytes | str, dict]]:
    """(path, body, headers): 100 requests that must each get a 4xx in OpenAI's error shape."""
    j = {"content-type": "application/json"}
    chat, comp = "/v1/chat/completions", "/v1/completions"
    bad: list[tuple[str, bytes | str, dict]] = []
    for body in ["{", "", "null", "[]", "42", '"text"', "{'model': 'x'}", '{"model": "tiny", "messages": [}',
                 "\x00\x01", '{"model": "tiny"', "\xff\xfe", "nan"]:
        bad += [(chat, body, j), (comp, body, j)]
    good = chat_body("hi")
    wrong = {"model": 5, "messages": "hi", "max_tokens": "many", "temperature": "hot", "top_p": [1], "top_k": 1.5,
             "min_p": "x", "presence_penalty": {}, "frequency_penalty": [], "repetition_penalty": "x", "seed": "s",
             "stop": 5, "n": "two", "logprobs": "yes", "top_logprobs": "x", "stream": "maybe", "user": 5,
             "tools": "none", "tool_choice": 5, "stream_options": 1, "max_completion_tokens": "x"}
    for k, v in wrong.items():
        bad.append((chat, json.dumps({**good, k: v}), j))
    bad += [(chat, json.dumps({"messages": good["messages"]}), j),  # missing model
            (chat, json.dumps({"model": NAME}), j),  # missing messages
            (chat, json.dumps({**good, "messages": []}), j),
            (chat, json.dumps({**good, "messages": [{"content": "no role"}]}), j),
            (chat, json.dumps({**good, "messages": [{"role": "wizard", "content": "x"}]}), j),
            (chat, json.dumps({**good, "messages": [{"role": "user"}]}), j),
            (chat, json.dumps({**good, "messages": [{"role": "user", "content": 5}]}), j),
            (chat, json.dumps({**good, "messages": ["hi"]}), j),
            (chat, json.dumps({**good, "model": "gpt-4"}), j),
            (chat, json.dumps({**good, "model": ""}), j),
            (comp, json.dumps({"model": "nope", "prompt": "x"}), j),
            (comp, json.dumps({"model": NAME}), j),
            (comp, json.dumps({"model": NAME, "prompt": []}), j),
            (comp, json.dumps({"model": NAME, "prompt": [10 ** 9]}), j),
            (comp, json.dumps({"model": NAME, "prompt": [-1]}), j),
            (comp, json.dumps({"model": NAME, "prompt": "x", "suffix": "y"}), j),
            (comp, json.dumps({"model": NAME, "prompt": {"a": 1}}), j),
            (comp, json.dumps({"model": NAME, "prompt": "x", "logprobs": 99}), j)]
    for k, v in [("max_tokens", -1), ("max_tokens", 0), ("max_completion_tokens", -5), ("n", 1000), ("n", 0),
                 ("n", -1), ("temperature", -1), ("temperature", 9), ("top_p", 0), ("top_p", 2), ("top_k", -2),
                 ("min_p", 2), ("presence_penalty", 5), ("frequency_penalty", -3), ("repetition_penalty", 0),
                 ("top_logprobs", 50), ("top_logprobs", 2), ("stop", ["a"] * 20), ("stop", [""]), ("stop", [1]),
                 ("tool_choice", "sometimes"), ("tool_choice", "required"),
                 ("tool_choice", {"type": "function", "function": {"name": "missing"}}),
                 ("tools", [{"type": "function"}]), ("tools", [{"type": "retrieval", "function": {"name": "f"}}]),
                 ("tools", [{"type": "function", "function": {"name": ""}}]), ("max_tokens", 10 ** 6),
                 ("stream_options", {"include_usage": "x"})]:
        bad.append((chat, json.dumps({**good, k: v}), j))
    for k, v in [("max_tokens", -1), ("n", 100), ("temperature", "x"), ("logprobs", -1), ("echo", "x")]:
        bad.append((comp, json.dumps({"model": NAME, "prompt": "x", k: v}), j))
    bad.append((chat, json.dumps(good), {"content-type": "text/plain"}))
    bad.append((chat, b"x" * (5 * 2**20), j))  # over the 4 MiB default body limit
    bad.append((chat, json.dumps({**good, "messages": [{"role": "user", "content": "x" * (5 * 2**20)}]}), j))
    bad.append(("/v1/nothing", json.dumps(good), j))
    bad.append(("/v1/embeddings", json.dumps(good), j))
    return bad


def test_malformed_requests_get_openai_errors(server):
    cases = malformed_requests()
    assert len(cases) >= 100
    with httpx.Client(base_url=server.base, timeout=30) as http:
        for path, body, headers in cases:
            r = http.post(path, content=body, headers=headers)
            assert 400 <= r.status_code < 500, (path, str(body)[:80], r.status_code, r.text[:200])
            assert is_openai_error(r), (path, str(body)[:80], r.text[:200])
            assert "Traceback" not in r.text
        assert http.get("/health").status_code == 200
        ok = http.post("/v1/chat/completions", json=chat_body("still fine?", max_tokens=3))
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["role"] == "assistant"


async def _stream_text(http: httpx.AsyncClient, body: dict) -> tuple[str, str]:
    text, finish = [], None
    async with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            choice = chunk["choices"][0]
            text.append(choice["delta"].get("content") or "")
            finish = choice["finish_reason"] or finish
    return "".join(text), finish


def test_sixteen_concurrent_streams_match_sequential(server):
    """16 streaming clients at once, 3 rounds: all complete, greedy answers equal the sequential ones."""
    bodies = [chat_body(f"Question {i}: " + "why " * (i % 5), max_tokens=16 + i, temperature=0,
                        ignore_eos=True) for i in range(16)]
    with httpx.Client(base_url=server.base, timeout=120) as http:
        sequential = [http.post("/v1/chat/completions", json=b).json()["choices"][0]["message"]["content"]
                      for b in bodies]

    async def round_() -> list[tuple[str, str]]:
        async with httpx.AsyncClient(base_url=server.base, timeout=120) as http:
            return await asyncio.gather(*[_stream_text(http, b) for b in bodies])

    for _ in range(3):
        results = asyncio.run(round_())
        assert [t for t, _ in results] == sequential
        assert all(f == "length" for _, f in results)
    m = httpx.get(server.base + "/metrics").text
    assert metric(m, "qianwen_running_sequences") == 0
    assert metric(m, "qianwen_time_to_first_token_seconds_count") >= 64
    assert metric(m, "qianwen_inter_token_latency_seconds_count") > 0


def test_disconnect_mid_stream_frees_the_slot(server):
    before = httpx.get(server.base + "/metrics").text
    aborted0 = float(next((ln.split()[1] for ln in before.splitlines()
                           if ln.startswith("qianwen_requests_aborted_total ")), 0))
    with httpx.Client(base_url=server.base, timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions",
                         json=chat_body("go on forever", max_tokens=200, ignore_eos=True, stream=True)) as r:
            got = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    got += 1
                if got >= 3:
                    break  # leave mid-stream: the connection closes
    deadline = time.time() + 30
    while time.time() < deadline:
        m = httpx.get(server.base + "/metrics").text
        if (metric(m, "qianwen_running_sequences") == 0 and metric(m, "qianwen_kv_cache_used_tokens") == 0
                and metric(m, "qianwen_requests_aborted_total") > aborted0):
            break
        time.sleep(0.2)
    else:
        pytest.fail("the cancelled sequence still holds its slot:\n" + m)
    assert httpx.get(server.base + "/health").status_code == 200


def test_metrics_text(server):
    r = httpx.get(server.base + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    for name in ("qianwen_requests_total", "qianwen_prompt_tokens_total", "qianwen_generation_tokens_total",
                 "qianwen_queue_length", "qianwen_running_sequences", "qianwen_time_to_first_token_seconds_bucket",
                 "qianwen_inter_token_latency_seconds_bucket"):
        assert name in r.text


def test_web_page_is_served_as_utf8(server):
    r = httpx.get(server.base + "/")
    assert r.status_code == 200 and r.headers["content-type"] == "text/html; charset=utf-8"
    assert "<textarea" in r.text
    for name in ("app.js", "markdown.js", "style.css"):
        f = httpx.get(server.base + "/web/" + name)
        assert f.status_code == 200 and "charset=utf-8" in f.headers["content-type"]
    assert httpx.get(server.base + "/web/../app.py").status_code == 404
    assert httpx.get(server.base + "/web/missing.js").status_code == 404


@pytest.mark.parametrize("with_usage", [True, False])
def test_stream_chunks_serialised_once_equal_the_dict(with_usage):
    """A stream's chunk text (head serialised once, then one choice per chunk) is exactly the JSON of the
    whole chunk, and the official client parses it."""
    from openai.types import Completion as OpenAICompletion
    from openai.types.chat import ChatCompletionChunk

    from qianwen.server.serving import ChunkFormat, sse

    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 5, "model": "m \"你\"",
            "system_fingerprint": None}
    fmt = ChunkFormat(head, with_usage)
    lp = {"content": [{"token": "你", "logprob": -0.5, "bytes": [228, 189, 160], "top_logprobs": []}]}
    for choice in ({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None},
                   {"index": 1, "delta": {"content": "好\n\"x\""}, "logprobs": lp, "finish_reason": None},
                   {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}):
        text = fmt(choice)
        assert text == sse({**head, "choices": [choice], **({"usage": None} if with_usage else {})})
        parsed = ChatCompletionChunk.model_validate_json(text[len("data: "):])
        assert parsed.choices[0].index == choice["index"] and parsed.model == head["model"]
    head = {"id": "cmpl-1", "object": "text_completion", "created": 5, "model": "m", "system_fingerprint": None}
    choice = {"index": 0, "text": "好", "logprobs": None, "finish_reason": "length"}
    text = ChunkFormat(head, with_usage)(choice)
    assert text == sse({**head, "choices": [choice], **({"usage": None} if with_usage else {})})
    assert OpenAICompletion.model_validate_json(text[len("data: "):]).choices[0].text == "好"
