"""The default GGUF (SmolLM2-135M Q4_1, Q8_0 embedding) kept quantized, against the same file
dequantized to float32, and the fast decode path against the reference path."""

from __future__ import annotations

import copy

import pytest
import torch

import qianwen
from qianwen.fast import StaticKVCache, optimize
from qianwen.models.cache import KVCache
from qianwen.quant.linear import Int4Linear, QuantEmbedding

PROMPTS = [
    "<|im_start|>user\nTranslate to Chinese: good morning, how are you today?<|im_end|>\n<|im_start|>assistant\n",
    "The capital of France is Paris. 中国的首都是北京。Water boils at 100 degrees Celsius.",
]


@pytest.fixture(scope="module")
def ref(default_gguf):
    return qianwen.load(default_gguf, dtype="float32")


@pytest.fixture(scope="module")
def quant(default_gguf):
    return qianwen.load(default_gguf, dtype="bfloat16", quantized=True)


def test_weights_stay_quantized_within_budget(quant, default_gguf):
    net = quant.net
    assert isinstance(net.model.embed_tokens, QuantEmbedding)
    assert net.lm_head is net.model.embed_tokens.source  # tied: one copy
    assert isinstance(net.model.layers[0].self_attn.qkv_proj, Int4Linear)  # fused at load
    tensors = {t.data_ptr(): t.nbytes for t in [*net.parameters(), *net.buffers()]}
    assert sum(tensors.values()) <= 1.5 * default_gguf.stat().st_size


def test_top1_agrees_with_dequantized_float_model(ref, quant):
    agree = total = 0
    for p in PROMPTS:
        ids = ref.tokenizer.encode(p, allow_special=True)
        want, got = ref.logits(ids), quant.logits(ids)
        agree += (want.argmax(-1) == got.argmax(-1)).sum().item()
        total += len(ids)
        assert torch.allclose(torch.log_softmax(got, -1).exp(), torch.log_softmax(want, -1).exp(), atol=0.1)
    assert agree / total >= 0.9, f"top-1 agreement {agree}/{total}"


def test_fast_path_matches_reference_path(quant, default_gguf):
    from qianwen.loading.gguf import load_gguf_weights, open_reader

    plain = load_gguf_weights(open_reader(default_gguf), quant.config, torch.bfloat16, torch.device("cpu"), quantized=True)
    assert isinstance(plain.model.layers[0].self_attn.q_proj, Int4Linear)
    fast = optimize(copy.deepcopy(plain))
    assert hasattr(fast.model.layers[0].self_attn, "qkv_proj")
    ids = torch.tensor([quant.tokenizer.encode(PROMPTS[1])])
    with torch.inference_mode():
        want = plain(ids).float()
        got = fast(ids).float()
        assert (got - want).abs().max().item() <= 0.05 * want.abs().max().item()
        assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() >= 0.95
        # prefill + cached decode through the static cache equals the full forward's last rows
        cache = StaticKVCache.for_model(fast, 1, 64)
        fast(ids[:, :-3], cache=cache)
        steps = [fast(ids[:, i:i + 1], cache=cache).float() for i in range(ids.shape[1] - 3, ids.shape[1])]
        assert (torch.cat(steps, 1) - got[:, -3:]).abs().max().item() <= 0.05 * got.abs().max().item()


def test_batch_invariance_of_the_fast_path(quant):
    rows = torch.tensor([quant.tokenizer.encode(p)[:12] for p in PROMPTS] * 4)
    with torch.inference_mode():
        c1, cb = KVCache(30), KVCache(30)
        alone = quant.net(rows[:1], cache=c1)
        batch = quant.net(rows, cache=cb)
        assert torch.equal(alone[0], batch[0])
        nxt = torch.full((8, 1), 42)
        assert torch.equal(quant.net(nxt[:1], cache=c1)[0], quant.net(nxt, cache=cb)[0])


def test_long_prompt_prefill_dequantizes_and_stays_faithful(ref, quant, monkeypatch):
    from qianwen.quant import linear

    ids = ref.tokenizer.encode(" ".join(PROMPTS) * 3, allow_special=True)
    assert len(ids) >= linear.PREFILL_TOKENS  # so the bf16 prefill path runs
    want, got = ref.logits(ids), quant.logits(ids)
    agree = (want.argmax(-1) == got.argmax(-1)).float().mean().item()
    assert agree >= 0.9, f"top-1 agreement {agree:.2f}"
    assert torch.allclose(torch.log_softmax(got, -1).exp(), torch.log_softmax(want, -1).exp(), atol=0.1)
    monkeypatch.setattr(linear, "PREFILL_TOKENS", 10**9)  # the same forward through the int4 kernels
    kernel = quant.logits(ids)
    assert (got - kernel).abs().max().item() <= 0.05 * kernel.abs().max().item()
    assert (got.argmax(-1) == kernel.argmax(-1)).float().mean().item() >= 0.95


def test_weight_summary_counts_quantized_buffers(ref, quant, default_gguf):
    from qianwen.quant.summary import weight_summary

    r, q = weight_summary(ref.net), weight_summary(quant.net)
    assert r.quantized_weights == 0 and r.describe() == "not quantized"
    assert q.total == r.total  # the same model, however its weights are held
    assert q.quantized_weights > 0.99 * q.total and "int4" in q.describe()
    assert q.bytes_held <= 1.5 * default_gguf.stat().st_size < r.bytes_held
