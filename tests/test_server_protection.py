"""Protections: API keys, body size, max_tokens / n limits, a full queue (429), CORS, default bind address."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from qianwen.engine import EngineConfig
from qianwen.server import ServerConfig, create_app

from ._server_fixtures import ThreadServer, load_tiny, metric

NAME = "tiny"
BODY = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


@pytest.fixture(scope="module")
def model(tiny_qwen2_dir):
    return load_tiny(tiny_qwen2_dir, "float32")


def openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_api_keys(model):
    app = create_app(model, config=ServerConfig(model_name=NAME, api_keys=["k-one", "k-two"]))
    with TestClient(app) as c:
        for path, method in (("/v1/models", "get"), ("/v1/chat/completions", "post"), ("/v1/completions", "post")):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "k-one"}):
                r = c.request(method, path, json=BODY, headers=headers)
                assert openai_error(r, 401)["code"] == "invalid_api_key"
        ok = {"Authorization": "Bearer k-two"}
        assert c.get("/v1/models", headers=ok).status_code == 200
        assert c.post("/v1/chat/completions", json=BODY, headers=ok).status_code == 200
        assert c.get("/health").status_code == 200  # not an API route
        assert c.get("/").status_code == 200
        assert c.get("/web-config.json").json()["auth"] is True


def test_api_keys_from_environment(monkeypatch):
    from qianwen.cli.main import build_parser
    from qianwen.cli.serve_cmd import api_keys

    monkeypatch.setenv("QIANWEN_API_KEY", "a, b,,c")
    args = build_parser().parse_args(["serve", "--api-key", "z"])
    assert api_keys(args) == ["z", "a", "b", "c"]
    assert args.host == "127.0.0.1"  # bound to this machine unless told otherwise


def test_limits(model):
    app = create_app(model, config=ServerConfig(model_name=NAME, max_body_bytes=2000, max_tokens_limit=10, max_n=2))
    with TestClient(app) as c:
        big = {**BODY, "messages": [{"role": "user", "content": "x" * 3000}]}
        assert openai_error(c.post("/v1/chat/completions", json=big), 413)["code"] == "request_too_large"

        def chunks():  # no Content-Length: the limit still holds while reading
            for _ in range(10):
                yield b" " * 500

        r = c.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
        openai_error(r, 413)
        assert openai_error(c.post("/v1/chat/completions", json={**BODY, "max_tokens": 11}), 400)["param"] == \
            "max_tokens"
        assert c.post("/v1/chat/completions", json={**BODY, "max_tokens": 10}).status_code == 200
        assert openai_error(c.post("/v1/chat/completions", json={**BODY, "n": 3}), 400)["param"] == "n"
        assert c.post("/v1/chat/completions", json={**BODY, "n": 2}).json()["choices"][1]["index"] == 1


def test_cors_is_off_unless_configured(model):
    pre = {"Origin": "http://elsewhere.example", "Access-Control-Request-Method": "POST"}
    with TestClient(create_app(model, config=ServerConfig(model_name=NAME))) as c:
        r = c.options("/v1/chat/completions", headers=pre)
        assert "access-control-allow-origin" not in r.headers
        r = c.post("/v1/chat/completions", json=BODY, headers={"Origin": "http://elsewhere.example"})
        assert "access-control-allow-origin" not in r.headers
    app = create_app(model, config=ServerConfig(model_name=NAME, cors_origins=["http://elsewhere.example"]))
    with TestClient(app) as c:
        r = c.options("/v1/chat/completions", headers=pre)
        assert r.headers["access-control-allow-origin"] == "http://elsewhere.example"


def test_full_queue_gets_429_with_retry_after(model):
    app = create_app(model, EngineConfig(max_num_seqs=1), ServerConfig(model_name=NAME, max_queue=1))
    gate = threading.Event()

    def hold(prompt_ids, output_ids, logits):  # keeps the engine busy with A until the gate opens
        gate.wait(timeout=60)
        return logits

    app.state.serving.logits_processors = [hold]
    with ThreadServer(app) as s, httpx.Client(base_url=s.base, timeout=60) as http:
        long = {**BODY, "max_tokens": 200, "ignore_eos": True, "stream": True}
        with http.stream("POST", "/v1/chat/completions", json=long) as running:
            next(running.iter_lines())  # A runs and holds the only slot (and the engine)
            deadline = time.time() + 30
            while metric(http.get("/metrics").text, "qianwen_running_sequences") < 1:
                assert time.time() < deadline, "request A never ran"
                time.sleep(0.05)
            waiting_result = {}

            def waiting():
                with httpx.Client(base_url=s.base, timeout=120) as h2:
                    waiting_result["r"] = h2.post("/v1/chat/completions", json=BODY)

            t = threading.Thread(target=waiting)
            t.start()
            deadline = time.time() + 30
            while metric(http.get("/metrics").text, "qianwen_queue_length") < 1:
                assert time.time() < deadline, "request B never queued"
                time.sleep(0.05)
            r = http.post("/v1/chat/completions", json=BODY)
            err = openai_error(r, 429)
            assert err["type"] == "rate_limit_error" and r.headers["retry-after"] == "1"
            gate.set()
        t.join(timeout=120)  # A was cancelled when its stream closed: B gets the slot
        assert waiting_result["r"].status_code == 200
        assert http.get("/health").status_code == 200
