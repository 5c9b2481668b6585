"""Never a broken character: text cut by max_tokens or a stop drops an unfinished trailing UTF-8 sequence,
in the Python API, the engine, the CLI and the server (streamed and not)."""

from __future__ import annotations

import json

import httpx
import pytest

import qianwen
from qianwen.engine import LLM
from qianwen.server import ServerConfig, create_app

from ._server_fixtures import ThreadServer

PROMPTS = ["北京是中国的首都，", "请用中文介绍一下长城："]
LENGTHS = range(1, 9)


@pytest.fixture(scope="module")
def model(default_gguf):
    return qianwen.load(str(default_gguf))


@pytest.fixture(scope="module")
def longer(model) -> dict[str, str]:
    """The greedy 16-token completion of each prompt: every cut must be a prefix of it."""
    return {p: model.generate(p, max_tokens=16, temperature=0, ignore_eos=True) for p in PROMPTS}


def check_cut(text: str, full: str) -> None:
    assert "\ufffd" not in text, text
    assert full.startswith(text), (text, full)


def test_the_prompts_do_split_characters(model, longer):
    """The tests below mean something only if the model's tokens carry parts of characters here."""
    tok = model.tokenizer
    for p in PROMPTS:
        ids = tok.encode(p + longer[p])
        assert any(_partial(tok.id_to_token_bytes(i)) for i in ids)


def _partial(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def test_api_cut_by_max_tokens(model, longer):
    for p in PROMPTS:
        for n in LENGTHS:
            check_cut(model.generate(p, max_tokens=n, temperature=0, ignore_eos=True), longer[p])
            streamed = list(model.generate(p, stream=True, max_tokens=n, temperature=0, ignore_eos=True))
            assert all("\ufffd" not in s for s in streamed)
            check_cut("".join(streamed), longer[p])


def test_engine_cut_by_max_tokens(model, longer):
    llm = LLM(model)
    reqs = [{"prompt": p, "max_tokens": n, "temperature": 0, "ignore_eos": True} for p in PROMPTS for n in LENGTHS]
    for req, c in zip(reqs, llm.generate(reqs), strict=True):
        check_cut(c.text, longer[req["prompt"]])


def test_cut_by_a_stop_token_mid_character(model):
    """A stop token right after the first byte of a character: that byte is dropped, not shown as U+FFFD."""
    tok = model.tokenizer
    ids = tok.encode("龘")
    first = ids[0]
    assert _partial(tok.id_to_token_bytes(first))
    eos = min(model.stop_token_ids)

    def force(prompt_ids, output_ids, logits):  # the first byte of 龘, then the end of the sequence
        want = [first, eos][min(len(output_ids), 1)]
        logits[:] = float("-inf")
        logits[want] = 0.0
        return logits

    assert model.generate("Hi", max_tokens=5, temperature=0, logits_processors=[force]) == ""
    c = LLM(model).generate([{"prompt": "Hi", "max_tokens": 5, "temperature": 0, "logits_processors": [force]}])[0]
    assert c.text == "" and c.token_ids == [first, eos] and c.finish_reason == "stop"


def test_cli_cut_by_max_tokens(model, longer, default_gguf, capsys):
    from qianwen.cli.main import main

    p = PROMPTS[0]
    for n in (1, 2, 4, 7):
        assert main(["generate", p, "-m", str(default_gguf), "--max-tokens", str(n), "--temperature", "0"]) == 0
        out = capsys.readouterr().out
        assert out.endswith("\n")
        check_cut(out[:-1], longer[p])


def test_server_cut_by_max_tokens(model, longer):
    app = create_app(model, config=ServerConfig(model_name="m"))
    with ThreadServer(app) as s, httpx.Client(base_url=s.base, timeout=120) as http:
        for p in PROMPTS:
            for n in LENGTHS:
                body = {"model": "m", "prompt": p, "max_tokens": n, "temperature": 0, "ignore_eos": True}
                r = http.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
                check_cut(r.json()["choices"][0]["text"], longer[p])
                with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
                    lines = [ln for ln in resp.iter_lines() if ln.startswith("data: {")]
                pieces = [json.loads(ln[6:])["choices"][0]["text"] for ln in lines]
                assert all("\ufffd" not in x for x in pieces)
                check_cut("".join(pieces), longer[p])
        chat = {"model": "m", "messages": [{"role": "user", "content": PROMPTS[1]}], "temperature": 0}
        full = http.post("/v1/chat/completions", json={**chat, "max_tokens": 12}).json()["choices"][0]["message"]
        for n in (1, 3, 5):
            r = http.post("/v1/chat/completions", json={**chat, "max_tokens": n})
            check_cut(r.json()["choices"][0]["message"]["content"], full["content"])
