"""Prompt log-probs for scorers: /v1/completions with echo (+ logprobs, + max_tokens 0) in OpenAI's legacy
format, checked against `Model.logits`, and the exact requests lm-evaluation-harness's `local-completions`
model sends (captured from lm-eval 0.4.13; benchmarks/lm_eval_scoring.py runs lm-eval itself)."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from fastapi.testclient import TestClient

from qianwen.engine import EngineConfig
from qianwen.server import ServerConfig, create_app

from ._server_fixtures import load_tiny

NAME = "tiny"


def serve(model, name: str = NAME) -> TestClient:
    return TestClient(create_app(model, EngineConfig(max_num_seqs=8), ServerConfig(model_name=name, max_n=8)))


@pytest.fixture(scope="module")
def tiny(tiny_qwen2_dir):
    model = load_tiny(tiny_qwen2_dir, "float32")
    with serve(model) as client:
        yield model, client


def reference(model, ids: list[int], top: int) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """Log-probs of ids[1:] and the top alternatives, straight from Model.logits."""
    lp = torch.log_softmax(model.logits(ids).float(), dim=-1)
    values, idx = lp[:-1].topk(top, dim=-1) if top else (None, None)
    lps = [float(lp[k - 1, ids[k]]) for k in range(1, len(ids))]
    tops = [list(zip(i, v, strict=True)) for i, v in zip(idx.tolist(), values.tolist(), strict=True)] if top else []
    return lps, tops


def check_prompt_logprobs(model, ids: list[int], lp: dict, top: int, atol: float) -> None:
    tok = model.tokenizer
    text = lambda t: tok.id_to_token_bytes(t).decode("utf-8", errors="replace")
    n = len(ids)
    assert lp["tokens"][:n] == [text(t) for t in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing precedes the first
    want, want_top = reference(model, ids, top)
    got = lp["token_logprobs"][1:n]
    assert torch.allclose(torch.tensor(got), torch.tensor(want), atol=atol, rtol=0), (got, want)
    for k in range(1, n):
        expected = {}
        for t, v in want_top[k - 1]:
            expected.setdefault(text(t), v)  # tokens that print alike share one key, the best one kept
        assert lp["top_logprobs"][k].keys() == expected.keys()
        for key, v in expected.items():
            assert abs(lp["top_logprobs"][k][key] - v) < atol
    offsets = lp["text_offset"]
    assert offsets[0] == 0 and all(offsets[k + 1] == offsets[k] + len(lp["tokens"][k]) for k in range(len(offsets) - 1))


def test_echo_logprobs_string_prompt_max_tokens_0(tiny):
    model, client = tiny
    prompt = "The quick brown fox jumps over the lazy dog. 你好"
    r = client.post("/v1/completions", json={"model": NAME, "prompt": prompt, "echo": True, "logprobs": 3,
                                             "max_tokens": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    [choice] = body["choices"]
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    ids = model.tokenizer.encode(prompt)
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    assert len(choice["logprobs"]["tokens"]) == len(ids)
    check_prompt_logprobs(model, ids, choice["logprobs"], 3, 1e-5)


def test_echo_logprobs_token_prompts_n_and_generation(tiny):
    model, client = tiny
    prompts = [[10, 40, 80, 120, 160], [7, 300, 42], [99]]  # a one-token prompt has only the null entry
    r = client.post("/v1/completions", json={"model": NAME, "prompt": prompts, "echo": True, "logprobs": 2,
                                             "max_tokens": 3, "temperature": 0, "n": 2, "ignore_eos": True})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3, 4, 5]
    plain = client.post("/v1/completions", json={"model": NAME, "prompt": prompts, "logprobs": 2, "max_tokens": 3,
                                                 "temperature": 0, "ignore_eos": True}).json()["choices"]
    for i, c in enumerate(choices):
        ids, gen = prompts[i // 2], plain[i // 2]
        check_prompt_logprobs(model, ids, c["logprobs"], 2, 1e-5)
        assert c["text"] == model.tokenizer.decode(ids) + gen["text"]
        assert c["finish_reason"] == "length"
        lp = c["logprobs"]
        assert len(lp["tokens"]) == len(ids) + 3
        assert lp["tokens"][len(ids):] == gen["logprobs"]["tokens"]  # then the generated tokens, as without echo
        assert lp["token_logprobs"][len(ids):] == gen["logprobs"]["token_logprobs"]
        assert lp["text_offset"][len(ids)] == sum(len(t) for t in lp["tokens"][:len(ids)])


def test_echo_streamed_equals_whole(tiny):
    model, client = tiny
    body = {"model": NAME, "prompt": ["Hello world", "def add(a, b):"], "echo": True, "logprobs": 1,
            "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    whole = client.post("/v1/completions", json=body).json()["choices"]
    r = client.post("/v1/completions", json={**body, "stream": True})
    assert r.status_code == 200
    events = [json.loads(line[6:]) for line in r.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    for i, want in enumerate(whole):
        parts = [e["choices"][0] for e in events if e["choices"][0]["index"] == i]
        assert "".join(p["text"] for p in parts) == want["text"]
        assert parts[0]["text"] == ["Hello world", "def add(a, b):"][i]  # the echo comes first, whole
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            assert sum((p["logprobs"][key] for p in parts), []) == want["logprobs"][key]
        assert [p["finish_reason"] for p in parts if p["finish_reason"]] == ["length"]
    # echo only, streamed: one chunk per choice, finished by length
    r = client.post("/v1/completions", json={**body, "stream": True, "max_tokens": 0})
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert [(c["choices"][0]["text"], c["choices"][0]["finish_reason"]) for c in chunks] == [
        ("Hello world", "length"), ("def add(a, b):", "length")]


def test_echo_without_logprobs_and_max_tokens_0_rules(tiny):
    model, client = tiny
    r = client.post("/v1/completions", json={"model": NAME, "prompt": "abc", "echo": True, "max_tokens": 0})
    assert r.status_code == 200
    assert r.json()["choices"][0] == {"index": 0, "text": "abc", "logprobs": None, "finish_reason": "length"}
    r = client.post("/v1/completions", json={"model": NAME, "prompt": "abc", "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = client.post("/v1/chat/completions", json={"model": NAME, "max_tokens": 0,
                                                  "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = client.post("/v1/completions", json={"model": NAME, "prompt": "abc", "echo": True, "logprobs": 21,
                                             "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"
    for empty in ("", ["a", ""], [[]], [[5], []]):  # nothing to score or to continue
        r = client.post("/v1/completions", json={"model": NAME, "prompt": empty, "echo": True, "logprobs": 1,
                                                 "max_tokens": 0})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", (empty, r.text)
    # a prompt that fills the context cannot be scored either: a clear 400, not an allocation
    r = client.post("/v1/completions", json={"model": NAME, "prompt": [5] * (model.context_length + 1),
                                             "echo": True, "logprobs": 1, "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_scoring_runs_off_the_event_loop(tiny):
    model, client = tiny
    threads = []
    original = model.net.hidden_states

    def spy(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return original(*args, **kwargs)

    model.net.hidden_states = spy
    try:
        r = client.post("/v1/completions", json={"model": NAME, "prompt": ["ab", "cd ef"], "echo": True,
                                                 "logprobs": 0, "max_tokens": 0})
    finally:
        del model.net.hidden_states
    assert r.status_code == 200
    assert len(threads) == 2 and all(t.startswith("qianwen-score") for t in threads), threads
    assert r.json()["choices"][0]["logprobs"]["top_logprobs"] == [None, None]  # logprobs 0: no alternatives


def test_tokenizer_routes_for_lm_eval(tiny):
    """vLLM's /tokenize, /detokenize and /tokenizer_info, which lm-eval's remote tokenizer checks for and uses."""
    model, client = tiny
    tok = model.tokenizer
    info = client.get("/tokenizer_info").json()
    assert info["eos_token"] == "<|im_end|>" and info["model_max_length"] == model.context_length
    text = "Hello <|im_end|> 你好"
    r = client.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert r["tokens"] == tok.encode(text) and r["count"] == len(r["tokens"])  # plain text, as completions encode
    assert tok.eos_id not in r["tokens"]
    assert client.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": text}
    for bad in ({"tokens": [-1]}, {"tokens": [tok.vocab_size]}, {"tokens": "x"}, {"prompt": 5}, {}):
        route = "/detokenize" if "tokens" in bad else "/tokenize"
        e = client.post(route, json=bad)
        assert e.status_code == 400 and set(e.json()["error"]) == {"message", "type", "param", "code"}
    assert client.post("/tokenize", json={"model": "other", "prompt": "x"}).status_code == 404
    with TestClient(create_app(model, EngineConfig(), ServerConfig(model_name=NAME, api_keys=["k"]))) as locked:
        assert locked.post("/tokenize", json={"prompt": "x"}).status_code == 401
        assert locked.get("/tokenizer_info").status_code == 401
        ok = locked.post("/tokenize", json={"prompt": "x"}, headers={"Authorization": "Bearer k"})
        assert ok.status_code == 200


def lm_eval_parse_logprobs(out: dict, ctxlens: list[int]) -> list[tuple[float, bool]]:
    """lm-eval 0.4.13's LocalCompletionsAPI.parse_logprobs, verbatim in substance."""
    res = []
    for choice, ctxlen in zip(sorted(out["choices"], key=lambda c: c["index"]), ctxlens, strict=False):
        tokens_logprobs = choice["logprobs"]["token_logprobs"][ctxlen:-1]
        top_logprobs = choice["logprobs"]["top_logprobs"][ctxlen:-1]
        is_greedy = all(tok == max(top.values()) for tok, top in zip(tokens_logprobs, top_logprobs, strict=False))
        res.append((sum(tokens_logprobs), is_greedy))
    return res


def reference_loglikelihood(model, ids: list[int], ctxlen: int) -> tuple[float, bool]:
    """What lm-eval computes from the answer, from Model.logits instead: the log-prob of ids[ctxlen:]
    given what precedes it, and whether each of those tokens is a most likely one (lm-eval compares
    logprobs, so ties count as greedy)."""
    lp = torch.log_softmax(model.logits(ids).float(), dim=-1)
    rows = range(ctxlen - 1, len(ids) - 1)
    return sum(float(lp[k, ids[k + 1]]) for k in rows), all(lp[k, ids[k + 1]] == lp[k].max() for k in rows)


def lm_eval_requests(model, name: str, pairs: list[tuple[str, str]]) -> tuple[dict, dict, list[int]]:
    """The two bodies lm-eval sends for a batch of (context, continuation) loglikelihood requests:
    token lists (tokenized_requests=True, the default) and strings (tokenized_requests=False), and the
    context lengths it slices the answers with."""
    tok = model.tokenizer
    encoded = [tok.encode(c) + tok.encode(x) for c, x in pairs]
    tokens_body = {"model": name, "prompt": encoded, "temperature": 0, "max_tokens": 1, "logprobs": 1,
                   "seed": 1234, "echo": True}
    strings_body = {**tokens_body, "prompt": [tok.decode(ids) for ids in encoded]}
    return tokens_body, strings_body, [len(tok.encode(c)) for c, _ in pairs]


def check_lm_eval_body(model, client, body: dict, ctxlens: list[int], atol: float) -> list[tuple[float, bool]]:
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    got = lm_eval_parse_logprobs(r.json(), ctxlens)
    tok = model.tokenizer
    scored = [p if isinstance(p, list) else tok.encode(p) for p in body["prompt"]]  # what the server scored
    want = [reference_loglikelihood(model, ids, n) for ids, n in zip(scored, ctxlens, strict=True)]
    for (g, g_greedy), (w, w_greedy) in zip(got, want, strict=True):
        assert abs(g - w) < atol and g_greedy == w_greedy, (got, want)
    return got


PAIRS = [("Question: What is the capital of France?\nAnswer:", " Paris"),
         ("Question: What is the capital of France?\nAnswer:", " London"),
         ("The quick brown fox jumps over the", " lazy dog."),
         ("通义千问是一个", "大语言模型。")]


def test_lm_eval_request_shape_tiny(tiny):
    model, client = tiny
    tokens_body, strings_body, ctxlens = lm_eval_requests(model, NAME, PAIRS)
    check_lm_eval_body(model, client, tokens_body, ctxlens, 1e-4)
    check_lm_eval_body(model, client, strings_body, ctxlens, 1e-4)


def test_default_model_echo_and_lm_eval_shape(default_gguf):
    import qianwen

    model = qianwen.load(str(default_gguf))
    with serve(model, "default") as client:
        prompt = "The capital of France is Paris. 北京是中国的首都。"
        r = client.post("/v1/completions", json={"model": "default", "prompt": prompt, "echo": True, "logprobs": 5,
                                                 "max_tokens": 0})
        assert r.status_code == 200, r.text
        ids = model.tokenizer.encode(prompt)
        check_prompt_logprobs(model, ids, r.json()["choices"][0]["logprobs"], 5, 1e-3)
        tokens_body, _, ctxlens = lm_eval_requests(model, "default", PAIRS)
        got = check_lm_eval_body(model, client, tokens_body, ctxlens, 5e-3)
        assert got[0][0] > got[1][0]  # the model prefers Paris
