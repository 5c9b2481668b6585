"""`qianwen serve --engine vllm`: the conformance tests with the official `openai` client against BOTH
engines on the same Hugging Face folder (the default model converted to bfloat16), and the greedy answers
of the two engines compared.

vLLM runs from QIANWEN_VLLM_PYTHON (`./dev.sh test` makes its environment once, cached under
$QIANWEN_HOME/vllm-venv, and sets it). Without it the vLLM tests FAIL when CI is set (a CI that could not
install vLLM must say so) and skip with that reason on a developer's machine. One vLLM server is started
for the whole module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from ._server_fixtures import (
    ProcessServer,
    check_chat_logprobs_and_seeded_sampling,
    check_chat_stream_equals_non_stream,
    check_completions_n_logprobs_stop,
    metric,
)

openai = pytest.importorskip("openai")

KEY = "sk-conformance"
NAME = "smol"
PROMPTS = ["What is the capital of France?", "Name three fruits.", "Write one sentence about the sea.",
           "What is 2 + 2?", "Say hello in French.", "Give me a synonym for happy.",
           "What color is the sky?", "Tell me a fun fact about cats.", "How many days are in a week?",
           "What is the opposite of cold?", "Describe a cup of tea.", "Who wrote Romeo and Juliet?"]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Get the weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}


def vllm_python() -> str:
    python = os.environ.get("QIANWEN_VLLM_PYTHON")
    if python:
        return python
    reason = ("QIANWEN_VLLM_PYTHON is not set: `./dev.sh vllm-env` makes vLLM's environment (once, about 3.5 GB) "
              "and prints the Python to set it to")
    if os.environ.get("CI"):
        pytest.fail("CI could not set up vLLM (see ./dev.sh's output): " + reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def smol_hf(tmp_path_factory) -> Path:
    """The default GGUF as a bfloat16 Hugging Face folder (`qianwen convert`), which both engines load (and run
    in float32: COMMON)."""
    out = tmp_path_factory.mktemp("smol") / "smollm2-hf"
    subprocess.run([sys.executable, "-m", "qianwen.cli.main", "convert", "--out", str(out), "--dtype", "bfloat16"],
                   check=True, timeout=600)
    return out


COMMON = ("--served-model-name", NAME, "--api-key", KEY, "--dtype", "float32", "--max-num-seqs", "8")


@pytest.fixture(scope="module")
def qianwen_server(smol_hf):
    with ProcessServer("--model", str(smol_hf), *COMMON) as server:
        yield server


@pytest.fixture(scope="module")
def vllm_server(smol_hf):
    python = vllm_python()
    with ProcessServer("--model", str(smol_hf), *COMMON, "--engine", "vllm", "--vllm-python", python,
                       "--max-model-len", "2048", "--kv-cache-mb", "2048", timeout=1500) as server:
        yield server


@pytest.fixture(scope="module", params=["qianwen", "vllm"])
def server(request):
    return request.getfixturevalue(f"{request.param}_server")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0, timeout=600)


# ---------------------------------------------------------------- conformance, on both engines

def test_models_and_wrong_key(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    bad = openai.OpenAI(base_url=server.base + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"


def test_chat_stream_equals_non_stream(client):
    check_chat_stream_equals_non_stream(client, NAME)


def test_completions_n_logprobs_stop(client):
    check_completions_n_logprobs_stop(client, NAME, tokens_spell_text=False)


def test_chat_logprobs_and_seeded_sampling(client):
    check_chat_logprobs_and_seeded_sampling(client, NAME)


def test_tools_named_choice(client):
    """SmolLM2's template has no tools section: both engines render qianwen's Hermes prompt and parse the
    answer; tool_choice names the function, so the answer is that call, constrained by its grammar (on vLLM
    the gateway hands the same llguidance grammar to vLLM's structured outputs)."""
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    plain = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=1, temperature=0)
    r = client.chat.completions.create(model=NAME, messages=msgs, tools=[WEATHER], temperature=0, max_tokens=80,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert r.usage.prompt_tokens > plain.usage.prompt_tokens + 40  # the tool's schema is in the prompt
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.tool_calls[0].function.name == "get_weather"
    assert c.message.tool_calls[0].id.startswith("call_")
    assert isinstance(json.loads(c.message.tool_calls[0].function.arguments), dict)
    chunks = list(client.chat.completions.create(
        model=NAME, messages=msgs, tools=[WEATHER], temperature=0, max_tokens=80, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    streamed = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
    assert bool(streamed) == bool(c.message.tool_calls)
    if streamed:
        assert streamed[0].function.name == "get_weather"
        assert len({tc.index for tc in streamed}) == len(c.message.tool_calls)  # parallel calls are allowed
        assert ("".join(tc.function.arguments or "" for tc in streamed if tc.index == 0)
                == c.message.tool_calls[0].function.arguments)


@pytest.mark.parametrize("body, status", [
    ({"model": NAME}, 400),                                                              # no messages
    ({"model": NAME, "messages": []}, 400),
    ({"model": NAME, "messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}, 400),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "n": 99}, 400),     # over --max-n
    ({"model": "other", "messages": [{"role": "user", "content": "hi"}]}, 404),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER],
      "tool_choice": {"type": "function", "function": {"name": "nope"}}}, 400),
])
def test_bad_input_is_openai_shaped_4xx(server, body, status):
    r = httpx.post(server.base + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] in ("invalid_request_error", "not_found_error")


def test_context_overflow_is_400(server):
    r = httpx.post(server.base + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                   json={"model": NAME, "prompt": "word " * 9000, "max_tokens": 4})
    assert r.status_code == 400, r.text
    assert "context" in r.json()["error"]["message"]


def test_health_metrics_and_page(server, client):
    assert httpx.get(server.base + "/health", timeout=30).status_code == 200
    client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    text = httpx.get(server.base + "/metrics", timeout=30).text
    assert metric(text, 'qianwen_requests_total{route="/v1/chat/completions",status="200"}') >= 1
    page = httpx.get(server.base + "/", timeout=30)
    assert page.status_code == 200 and "<html" in page.text.lower()
    assert httpx.get(server.base + "/web-config.json", timeout=30).json()["model"] == NAME


# ---------------------------------------------------------------- the two engines side by side

@pytest.mark.timeout(1800)
def test_greedy_answers_agree(qianwen_server, vllm_server):
    """Same folder, same prompt tokens, float32 on both, the same sampling defaults (the gateway fills in the
    checkpoint's, as our engine applies them). Measured here: 12 of 12 answers equal. (In bfloat16 vLLM's CPU
    path rounds where ours keeps float32 logits, and near-ties part the answers; before the gateway filled
    in the defaults, vLLM ran without the repetition penalty ours applies: 0 of 12 equal.)"""
    from concurrent.futures import ThreadPoolExecutor

    def answers(server: ProcessServer) -> list[tuple[str, int]]:
        c = openai.OpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0, timeout=1200)

        def one(p: str) -> tuple[str, int]:
            r = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": p}], temperature=0,
                                          max_tokens=16)
            return r.choices[0].message.content, r.usage.prompt_tokens

        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            return list(pool.map(one, PROMPTS))

    ours, theirs = answers(qianwen_server), answers(vllm_server)
    assert [n for _, n in ours] == [n for _, n in theirs]  # the same prompts, as many tokens
    same = sum(a == b for (a, _), (b, _) in zip(ours, theirs, strict=True))
    start = sum(a.split()[:1] == b.split()[:1] for (a, _), (b, _) in zip(ours, theirs, strict=True))
    print(f"\ngreedy answers of {len(PROMPTS)} prompts: {same} equal, {start} with the same first word")
    for (a, _), (b, _) in zip(ours, theirs, strict=True):
        if a != b:
            print(f"  qianwen: {a!r}\n  vllm:    {b!r}")
    assert same > len(PROMPTS) // 2  # most answers agree in full


# ---------------------------------------------------------------- without vLLM

def test_without_vllm_one_line_and_exit_1(tmp_path):
    no_vllm = tmp_path / "python"
    no_vllm.write_text("#!/bin/sh\nexit 1\n")  # a "Python" in which `import vllm` fails
    no_vllm.chmod(0o755)
    r = subprocess.run([sys.executable, "-m", "qianwen.cli.main", "serve", "--engine", "vllm", "--vllm-python",
                        str(no_vllm)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'qianwen[vllm]'" in lines[0], r.stderr


def test_vllm_command_line(tmp_path):
    from qianwen.chat.template import ChatTemplate
    from qianwen.server.vllm_gateway import VllmOptions, vllm_command

    opts = VllmOptions(dtype="bfloat16", tensor_parallel_size=4, pipeline_parallel_size=2, max_model_len=4096,
                       extra_args=["--enforce-eager"])
    qwen3 = ChatTemplate("{% if tools %}{{ tools | tojson }}{% endif %}{{ messages }}")
    cmd = vllm_command("py", tmp_path, "q3", "qwen3", qwen3, 1234, opts)
    assert cmd[:3] == ["py", "-m", "vllm.entrypoints.openai.api_server"]
    joined = " ".join(cmd)
    for part in ("--served-model-name q3", "--host 127.0.0.1 --port 1234", "--dtype bfloat16",
                 "--tensor-parallel-size 4", "--pipeline-parallel-size 2", "--max-model-len 4096",
                 "--enable-auto-tool-choice --tool-call-parser hermes --exclude-tools-when-tool-choice-none",
                 "--reasoning-parser qwen3"):
        assert part in joined
    assert cmd[-1] == "--enforce-eager"
    # Qwen-7B-Chat (no tools in its template): qianwen's ReAct layer, so no vLLM tool parser, no reasoning
    old = vllm_command("py", tmp_path, "q", "qwen", ChatTemplate(None), 1234, VllmOptions())
    assert "--tool-call-parser" not in old and "--reasoning-parser" not in old and "--dtype" not in old
