"""The original Qwen-7B layout: names mapped at load, both config schemas, dynamic NTK and LogN."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from qianwen.loading.hf import load_hf_weights, read_json
from qianwen.models import read_config
from qianwen.models.cache import KVCache

from .conftest import save_tiny

H, HEADS, D, LAYERS, FF = 64, 4, 16, 2, 128


def qwen_v1_config(schema: str, vocab: int, seq_length: int, ntk: bool, logn: bool) -> dict:
    if schema == "v1.1":
        return {"model_type": "qwen", "architectures": ["QWenLMHeadModel"], "hidden_size": H,
                "num_attention_heads": HEADS, "num_hidden_layers": LAYERS, "intermediate_size": 2 * FF,
                "kv_channels": D, "vocab_size": vocab, "seq_length": seq_length, "max_position_embeddings": seq_length,
                "rotary_emb_base": 10000, "rotary_pct": 1.0, "layer_norm_epsilon": 1e-6, "no_bias": True,
                "use_dynamic_ntk": ntk, "use_logn_attn": logn, "tie_word_embeddings": False}
    return {"model_type": "qwen", "n_embd": H, "n_head": HEADS, "n_layer": LAYERS, "ffn_hidden_size": 2 * FF,
            "padded_vocab_size": vocab, "n_positions": seq_length, "seq_length": seq_length, "kv_channels": D,
            "rotary_emb_base": 10000, "layer_norm_epsilon": 1e-6, "use_dynamic_ntk": ntk, "use_logn_attn": logn}


def to_qwen_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Qwen2 (HF) names -> the original Qwen-7B names, fusing q, k, v into c_attn."""
    out = {"transformer.wte.weight": sd["model.embed_tokens.weight"], "transformer.ln_f.weight": sd["model.norm.weight"],
           "lm_head.weight": sd["lm_head.weight"]}
    for i in range(LAYERS):
        p, q = f"model.layers.{i}.", f"transformer.h.{i}."
        a = p + "self_attn."
        out[q + "attn.c_attn.weight"] = torch.cat([sd[a + f"{x}_proj.weight"] for x in "qkv"])
        out[q + "attn.c_attn.bias"] = torch.cat([sd[a + f"{x}_proj.bias"] for x in "qkv"])
        out[q + "attn.c_proj.weight"] = sd[a + "o_proj.weight"]
        out[q + "ln_1.weight"] = sd[p + "input_layernorm.weight"]
        out[q + "ln_2.weight"] = sd[p + "post_attention_layernorm.weight"]
        out[q + "mlp.w2.weight"] = sd[p + "mlp.gate_proj.weight"]
        out[q + "mlp.w1.weight"] = sd[p + "mlp.up_proj.weight"]
        out[q + "mlp.c_proj.weight"] = sd[p + "mlp.down_proj.weight"]
        out[q + "attn.rotary_emb.inv_freq"] = torch.zeros(D // 2)  # present in real files, ignored on load
    return {k: v.contiguous() for k, v in out.items()}


@pytest.fixture(scope="module")
def qwen2_ref(tmp_path_factory):
    import transformers

    folder = save_tiny(tmp_path_factory.mktemp("q2"), "qwen2", hidden_size=H, num_attention_heads=HEADS,
                       num_key_value_heads=HEADS, intermediate_size=FF, rope_theta=10000.0)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    return folder, ref


def write_qwen(folder, ref, schema, seq_length=256, ntk=False, logn=False):
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ref.config.vocab_size
    (folder / "config.json").write_text(json.dumps(qwen_v1_config(schema, vocab, seq_length, ntk, logn)))
    save_file(to_qwen_names(ref.state_dict()), str(folder / "model.safetensors"))
    return read_config(read_json(folder / "config.json"))


@pytest.mark.parametrize("schema", ["v1.1", "v1.0"])
def test_qwen_layout_matches_qwen2_in_transformers(schema, qwen2_ref, tmp_path):
    _, ref = qwen2_ref
    config = write_qwen(tmp_path, ref, schema)
    assert config.intermediate_size == FF and config.num_key_value_heads == HEADS
    ours = load_hf_weights(tmp_path, config, torch.float32, torch.device("cpu"))
    ids = torch.randint(0, ref.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max().item() <= 1e-4


def reference_forward(w: dict[str, torch.Tensor], ids: torch.Tensor, seq_length: int, alpha: float,
                      logn: bool) -> torch.Tensor:
    """An independent Qwen-7B forward written from docs/qwen-facts.md, on the original parameter names."""

    def rms(x, g):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * g

    T = ids.shape[1]
    base = 10000 * alpha ** (D / (D - 2))
    inv = 1.0 / base ** (torch.arange(0, D, 2).float() / D)
    f = torch.outer(torch.arange(T).float(), inv)
    emb = torch.cat([f, f], -1)
    cos, sin = emb.cos(), emb.sin()

    def rot(t):  # t [T, heads, D]
        t1, t2 = t[..., : D // 2], t[..., D // 2:]
        return t * cos[:, None] + torch.cat([-t2, t1], -1) * sin[:, None]

    x = w["transformer.wte.weight"][ids[0]]
    for i in range(LAYERS):
        p = f"transformer.h.{i}."
        h = rms(x, w[p + "ln_1.weight"])
        qkv = h @ w[p + "attn.c_attn.weight"].T + w[p + "attn.c_attn.bias"]
        q, k, v = (t.view(T, HEADS, D) for t in qkv.split(H, -1))
        q, k = rot(q), rot(k)
        if logn:
            scale = torch.tensor([math.log(i + 1) / math.log(seq_length) if i + 1 > seq_length else 1.0
                                  for i in range(T)])
            q = q * scale[:, None, None]
        att = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(D)
        att = att.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf")).softmax(-1)
        o = torch.einsum("hqk,khd->qhd", att, v).reshape(T, H)
        x = x + o @ w[p + "attn.c_proj.weight"].T
        h = rms(x, w[p + "ln_2.weight"])
        mlp = (h @ w[p + "mlp.w1.weight"].T) * torch.nn.functional.silu(h @ w[p + "mlp.w2.weight"].T)
        x = x + mlp @ w[p + "mlp.c_proj.weight"].T
    return rms(x, w["transformer.ln_f.weight"]) @ w["lm_head.weight"].T


@pytest.mark.parametrize("T,alpha", [(12, 1), (24, 3), (40, 7), (70, 15)])  # seq_length 16
def test_dynamic_ntk_and_logn_beyond_seq_length(T, alpha, qwen2_ref, tmp_path):
    from qianwen.models.qwen import ntk_alpha

    _, ref = qwen2_ref
    seq_length = 16
    assert ntk_alpha(T, seq_length) == alpha
    config = write_qwen(tmp_path, ref, "v1.1", seq_length=seq_length, ntk=True, logn=True)
    ours = load_hf_weights(tmp_path, config, torch.float32, torch.device("cpu"))
    ids = torch.randint(0, ref.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(T))
    w = to_qwen_names(ref.state_dict())
    with torch.no_grad():
        want = reference_forward(w, ids, seq_length, alpha, logn=True)
        got = ours(ids)[0]
        assert (got - want).abs().max().item() <= 1e-4
        # alpha is fixed at prefill and reused while decoding
        cache = KVCache(LAYERS)
        prefill = ours(ids[:, :T - 4], cache=cache)
        steps = [ours(ids[:, i:i + 1], cache=cache) for i in range(T - 4, T)]
        want_prefix = reference_forward(w, ids[:, :T - 4], seq_length, ntk_alpha(T - 4, seq_length), logn=True)
    assert (prefill[0] - want_prefix).abs().max().item() <= 1e-4
    assert cache.extra["ntk_alpha"] == ntk_alpha(T - 4, seq_length)
    assert torch.isfinite(torch.cat(steps, 1)).all()
