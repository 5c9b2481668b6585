"""The official `openai` client, unchanged, against `qianwen serve` running the default model."""

from __future__ import annotations

import pytest

from ._server_fixtures import (
    ProcessServer,
    check_chat_logprobs_and_seeded_sampling,
    check_chat_stream_equals_non_stream,
    check_completions_n_logprobs_stop,
)

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
    check_chat_stream_equals_non_stream(client, name)


def test_completions_n_logprobs_stop(client, name):
    check_completions_n_logprobs_stop(client, name)


def test_chat_logprobs_and_seeded_sampling(client, name):
    check_chat_logprobs_and_seeded_sampling(client, name)
