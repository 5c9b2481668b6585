"""Every path on every weight format, in float32 and bfloat16.

Formats: Hugging Face float32 and bfloat16 folders, `qianwen quantize` int8 and int4 folders, and GGUF
files in F16, Q4_0, Q4_1, Q8_0, Q4_K and Q6_K (tests/_tiny_gguf.py), all from one tiny qwen2 checkpoint
(tied embeddings, as SmolLM2 and the small Qwen2.5 models have). Paths: the Python API, the engine
(`LLM`), `qianwen generate`, `qianwen chat` and the server. Each produces tokens, its greedy tokens are
the float32 reference's choices (the same file loaded in float32) up to near-ties, and its logits are
float32, within tolerance of the reference's and, in bfloat16, never rounded to bfloat16.
"""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
import torch

import qianwen
from qianwen.cli.main import main as cli_main
from qianwen.engine import LLM, EngineConfig
from qianwen.fast import StaticKVCache

from ._tiny_gguf import write_gguf
from .conftest import save_tiny

GGUF_TYPES = ("F16", "Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K")
FORMATS = ("hf-float32", "hf-bfloat16", "quant-int8", "quant-int4", *(f"gguf-{t}" for t in GGUF_TYPES))
DTYPES = ("float32", "bfloat16")
PROMPT = "The quick brown fox 你好"
N = 8
GREEDY = dict(max_tokens=N, temperature=0, repetition_penalty=1.0)  # no default penalty: plain argmax
# Tiny random models have flat distributions, so near-ties are common: a greedy token must be the
# reference's choice or within this many nats of it, and log-probs within LOGPROB_TOL of the reference's.
TIE_TOL = {"float32": 1e-3, "bfloat16": 0.05}
LOGPROB_TOL = {"float32": 1e-3, "bfloat16": 0.05}
TINY = dict(hidden_size=256, intermediate_size=512, tie_word_embeddings=True)  # K-quants need K % 256 == 0


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    from qianwen.convert import quantize_folder

    root = tmp_path_factory.mktemp("formats")
    hf = save_tiny(root / "hf-float32", "qwen2", **TINY)
    out = {"hf-float32": hf,
           "hf-bfloat16": save_tiny(root / "hf-bfloat16", "qwen2", dtype=torch.bfloat16, **TINY),
           "quant-int8": quantize_folder(hf, root / "int8", bits=8),
           "quant-int4": quantize_folder(hf, root / "int4", bits=4)}
    for t in GGUF_TYPES:  # Q6_K with a separate output.weight, as llama.cpp often writes it
        out[f"gguf-{t}"] = write_gguf(hf, root / f"tiny-{t}.gguf", t, tied=t != "Q6_K")
    return {k: str(v) for k, v in out.items()}


_models: dict[tuple[str, str], qianwen.Model] = {}


def model(files, fmt: str, dtype: str):
    key = (fmt, dtype)
    if key not in _models:
        _models[key] = qianwen.load(files[fmt], dtype=dtype)
    return _models[key]


def check_agrees(ref, prompt_ids: list[int], tokens: list[int], dtype: str) -> None:
    """Each greedy token is the float32 reference's top choice, up to a near-tie."""
    assert tokens, "no tokens"
    lp = torch.log_softmax(ref.logits(prompt_ids + tokens)[len(prompt_ids) - 1:-1], -1)
    gap = lp.max(-1).values - lp[torch.arange(len(tokens)), torch.tensor(tokens)]
    assert gap.max().item() <= TIE_TOL[dtype], f"greedy tokens {tokens} leave the reference by {gap.tolist()}"


def greedy(m, ids: list[int]) -> list[int]:
    return [s.token_id for s in m.stream_tokens(ids, m.params(**GREEDY, ignore_eos=True))]


def not_bf16(t: torch.Tensor) -> bool:
    return not torch.equal(t, t.bfloat16().float())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_api(files, fmt, dtype):
    m, ref = model(files, fmt, dtype), model(files, fmt, "float32")
    ids = m.tokenizer.encode(PROMPT)
    logits = m.logits(ids)
    assert logits.dtype == torch.float32
    diff = (torch.log_softmax(logits, -1) - torch.log_softmax(ref.logits(ids), -1)).abs().max().item()
    assert diff <= LOGPROB_TOL[dtype], f"log-probs differ from the float32 reference by {diff}"
    if dtype == "bfloat16":
        assert not_bf16(logits), "the logits were rounded to bfloat16"
    tokens = greedy(m, ids)
    assert len(tokens) == N
    check_agrees(ref, ids, tokens, dtype)
    # the text API and the chat API run the same loop
    text = m.generate(PROMPT, **GREEDY, ignore_eos=True)
    assert text == "".join(s.text for s in m.stream_tokens(ids, m.params(**GREEDY, ignore_eos=True)))
    chat_ids = m.encode_chat([{"role": "user", "content": PROMPT}])
    check_agrees(ref, chat_ids, greedy(m, chat_ids), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_decode_step_logits_are_float32(files, fmt, dtype):
    """The cached one-token step (the fused C step where it is installed) returns unrounded float32."""
    m, ref = model(files, fmt, dtype), model(files, fmt, "float32")
    ids = m.tokenizer.encode(PROMPT)
    net = m.net
    with torch.inference_mode():
        cache = StaticKVCache.for_model(net, 1, len(ids) + 1)
        first = net.compute_logits(net.hidden_states(torch.tensor([ids[:-1]]), cache=cache)[:, -1])
        step = net(torch.tensor([ids[-1:]]), cache=cache)[0, -1]
    assert first.dtype == step.dtype == torch.float32
    if dtype == "bfloat16":
        assert not_bf16(first) and not_bf16(step)
    want = torch.log_softmax(ref.logits(ids)[-2:], -1)
    got = torch.log_softmax(torch.stack([first[0], step]), -1)
    assert (got - want).abs().max().item() <= LOGPROB_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_engine(files, fmt, dtype):
    m, ref = model(files, fmt, dtype), model(files, fmt, "float32")
    prompts = [PROMPT, "Qwen is a large language model. 通义千问"]
    llm = LLM(m, EngineConfig(max_num_seqs=4, kv_cache_mb=8))
    outs = llm.generate([{"prompt": p, **GREEDY, "ignore_eos": True} for p in prompts])
    for p, o in zip(prompts, outs, strict=True):
        assert len(o.token_ids) == N
        check_agrees(ref, m.tokenizer.encode(p), o.token_ids, dtype)
    seq = llm.engine.make_sequence(m.tokenizer.encode(PROMPT), m.params(max_tokens=1))
    logits = llm.engine.runner.prefill(seq)
    assert logits.dtype == torch.float32 and (dtype == "float32" or not_bf16(logits))


def run_cli(capsys, monkeypatch, stdin: str, *argv: str) -> str:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    capsys.readouterr()
    rc = cli_main(list(argv))
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_cli_generate_and_chat(files, fmt, dtype, capsys, monkeypatch):
    m = model(files, fmt, dtype)
    opts = ("-m", files[fmt], "--dtype", dtype, "--max-tokens", str(N), "--temperature", "0",
            "--repetition-penalty", "1")
    out = run_cli(capsys, monkeypatch, "", "generate", PROMPT, *opts)
    assert out == m.generate(PROMPT, **GREEDY) + "\n"
    out = run_cli(capsys, monkeypatch, PROMPT + "\n", "chat", *opts)
    assert out == m.chat([{"role": "user", "content": PROMPT}], **GREEDY) + "\n"


SERVER_CASES = [(f, "bfloat16") for f in FORMATS] + [("quant-int4", "float32"), ("gguf-Q4_K", "float32")]


@pytest.mark.parametrize(("fmt", "dtype"), SERVER_CASES)
def test_server(files, fmt, dtype):
    from fastapi.testclient import TestClient

    from qianwen.server import ServerConfig, create_app

    m = model(files, fmt, dtype)
    request = {"prompt": PROMPT, **GREEDY, "ignore_eos": True}
    want = LLM(m).generate([request])[0].text  # the engine offline (test_engine checks its tokens)
    app = create_app(m, EngineConfig(max_num_seqs=4, kv_cache_mb=8), ServerConfig(model_name="tiny"))
    with TestClient(app) as client:
        for _ in range(2):  # a second request: the engine is still alive
            r = client.post("/v1/completions", json={"model": "tiny", **request})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == want
        r = client.post("/v1/chat/completions", json={"model": "tiny", **GREEDY,
                                                      "messages": [{"role": "user", "content": PROMPT}]})
        assert r.status_code == 200, r.text
        assert client.get("/health").status_code == 200


def test_quantize_then_generate_in_the_default_dtype(files, tmp_path):
    """The reported failure, end to end: `qianwen quantize` -> `qianwen generate -m OUT` in bfloat16."""
    out = tmp_path / "q4"
    cmd = [sys.executable, "-m", "qianwen.cli.main"]
    r = subprocess.run([*cmd, "quantize", "-m", files["hf-float32"], "--out", str(out), "--bits", "4"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([*cmd, "generate", PROMPT, "-m", str(out), "--dtype", "bfloat16", "--max-tokens", str(N),
                        "--temperature", "0", "--repetition-penalty", "1"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    m = qianwen.load(out, dtype="bfloat16")
    assert r.stdout == m.generate(PROMPT, **GREEDY) + "\n"


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("kind", ["int4", "int8-row", "int8-block"])
def test_quantized_heads_give_float32(kind, native, monkeypatch):
    """`forward_f32` (a quantized lm_head): float32 out for a few rows (C kernel, or torch's kernels without
    it) and for many (dequantized blocks), bias included once, equal to the float32 matmul."""
    from qianwen import native as native_mod
    from qianwen.quant.linear import PREFILL_TOKENS, Int4Linear, Int8Linear

    if not native:
        monkeypatch.setattr(native_mod, "lib", lambda: None)
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 320)
    if kind == "int4":
        q = Int4Linear.from_float(lin, 32)
    elif kind == "int8-row":
        q = Int8Linear.from_float(lin)
    else:
        qw, s = Int8Linear.quantize(lin.weight.detach())
        q = Int8Linear(qw, s[:, None].expand(-1, 8) * torch.linspace(0.5, 1.5, 8), lin.bias.detach().clone())
    w = q.dequantize()
    for shape in ((1, 256), (3, 256), (2, PREFILL_TOKENS, 256)):  # the last: many tokens per sequence
        x = torch.randn(shape)
        y = q.forward_f32(x)
        want = x @ w.T + q.bias.float()
        assert y.dtype == torch.float32 and not_bf16(y)
        assert (y - want).abs().max().item() <= 1e-4 * want.abs().max().item(), shape
    x = torch.randn(3, PREFILL_TOKENS, 256)  # a sequence's logits do not depend on its batch
    assert torch.equal(q.forward_f32(x)[1], q.forward_f32(x[1:2])[0])


def test_default_model_answers_as_float32_does(default_gguf):
    """On the default GGUF in bf16 (quantized, the default path) the first-token log-probs of "L" and "The"
    for this question tied exactly once logits were rounded to bf16, and greedy chat answered
    "L'Étoile (The City) ..."; with float32 logits it answers as the float32 reference does."""
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    m = qianwen.load(default_gguf, dtype="bfloat16")
    ids = m.encode_chat(msgs)
    got = m.logits(ids)[-1]
    assert got.dtype == torch.float32 and not_bf16(got)
    want = qianwen.load(default_gguf, dtype="float32").logits(ids)[-1]
    assert got.argmax().item() == want.argmax().item() == m.tokenizer.encode("The")[0]
    assert m.chat(msgs, temperature=0, max_tokens=8).startswith("The capital of France is Paris")
