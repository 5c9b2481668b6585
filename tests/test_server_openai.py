"""The official `openai` client, unchanged, against `qianwen serve` running the default model."""

from __future__ import annotations

import pytest

from ._server_fixtures import ProcessServer

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def client(default_gguf):
    with ProcessServer("--model", str(default_gguf), "--max-num-seqs", "8") as server:
        yield openai.OpenAI(base_url=server.base + "/v1", api_key="sk-anything", max_retries=0)


@pytest.fixture(scope="module")
def name(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct.Q4_1"]  # the file name, without .gguf
    return models[0].id


def test_chat_stream_equals_non_stream(client, name):
    kw = dict(model=name, messages=[{"role": "user", "content": "What is the capital of France?"}],
              temperature=0, max_tokens=24)
    full = client.chat.completions.create(**kw)
    answer = full.choices[0].message.content
    assert answer.strip() and full.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens > 5


def test_completions_n_logprobs_stop(client, name):
    r = client.completions.create(model=name, prompt="The three primary colors are", max_tokens=12,
                                  temperature=0, n=2, logprobs=2)
    assert len(r.choices) == 2 and r.choices[0].text == r.choices[1].text
    assert r.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in r.choices)
    assert "".join(r.choices[0].logprobs.tokens).startswith(r.choices[0].text[:3])
    text = r.choices[0].text
    word = text.split()[1] if len(text.split()) > 1 else text.split()[0]
    cut = client.completions.create(model=name, prompt="The three primary colors are", max_tokens=12,
                                    temperature=0, stop=[word])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[:text.find(word)]


def test_chat_logprobs_and_sampling(client, name):
    r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Say hi"}], max_tokens=5,
                                       logprobs=True, top_logprobs=3, temperature=0.8, seed=1, n=2)
    assert len(r.choices) == 2
    for c in r.choices:
        assert len(c.logprobs.content) >= 1 and all(len(t.top_logprobs) == 3 for t in c.logprobs.content)
    again = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Say hi"}],
                                           max_tokens=5, temperature=0.8, seed=1, n=2)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]
