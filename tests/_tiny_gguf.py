"""Tiny GGUF files written with the `gguf` package from a tiny Hugging Face checkpoint (tests/conftest.py),
in each weight type qianwen loads: F16, Q4_0, Q4_1, Q8_0 (quantized by gguf-py itself) and Q4_K, Q6_K
(which gguf-py only dequantizes: quantized here with a plain min/max per sub-block, and checked against
gguf-py's own dequantization when written)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .conftest import CHATML_TEMPLATE

NAMES = [  # Hugging Face name -> GGUF name (the inverse of qianwen/loading/gguf.py's table)
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
    ("model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight"),
    *[(f"model.layers.{{i}}.self_attn.{p}_proj.{w}", f"blk.{{i}}.attn_{p}.{w}")
      for p in "qkv" for w in ("weight", "bias")],
    ("model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight"),
    *[(f"model.layers.{{i}}.mlp.{p}_proj.weight", f"blk.{{i}}.ffn_{p}.weight")
      for p in ("gate", "up", "down")],
]


def _fp16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def quantize_q4_k(w: np.ndarray) -> np.ndarray:
    """[N, K] float -> Q4_K blocks [N, K/256 * 144]: w = d*sc*q - dmin*m per 32-weight sub-block."""
    n, k = w.shape
    x = w.reshape(n, k // 256, 8, 32).astype(np.float32)
    lo, hi = np.minimum(x.min(-1), 0), x.max(-1)
    scale, offset = (hi - lo) / 15, -lo
    d = _fp16(scale.max(-1) / 63).astype(np.float32)
    dmin = _fp16(offset.max(-1) / 63).astype(np.float32)
    sc = np.clip(np.round(np.divide(scale, d[..., None], out=np.zeros_like(scale),
                                    where=d[..., None] > 0)), 0, 63)
    mn = np.clip(np.round(np.divide(offset, dmin[..., None], out=np.zeros_like(offset),
                                    where=dmin[..., None] > 0)), 0, 63)
    s_eff, o_eff = d[..., None] * sc, dmin[..., None] * mn
    q = np.clip(np.round(np.divide(x + o_eff[..., None], s_eff[..., None], out=np.zeros_like(x),
                                   where=s_eff[..., None] > 0)), 0, 15).astype(np.uint8)
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    scales = np.concatenate([(sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6),  # ggml's get_scale_min_k4 layout
                             (mn[..., :4] & 63) | ((mn[..., 4:] >> 4) << 6),
                             (sc[..., 4:] & 15) | ((mn[..., 4:] & 15) << 4)], -1)
    q = q.reshape(n, k // 256, 4, 2, 32)  # chunk c: 32 low nibbles (weights 64c..), then 32 high
    qs = (q[:, :, :, 0] | (q[:, :, :, 1] << 4)).reshape(n, k // 256, 128)
    heads = [_fp16(d).view(np.uint8).reshape(n, -1, 2), _fp16(dmin).view(np.uint8).reshape(n, -1, 2)]
    return np.concatenate([*heads, scales, qs], -1).reshape(n, -1)


def quantize_q6_k(w: np.ndarray) -> np.ndarray:
    """[N, K] float -> Q6_K blocks [N, K/256 * 210]: w = d*sc*(q - 32) per 16-weight sub-block."""
    n, k = w.shape
    x = w.reshape(n, k // 256, 16, 16).astype(np.float32)
    s = np.abs(x).max(-1) / 31
    d = _fp16(s.max(-1) / 127).astype(np.float32)
    sc = np.clip(np.round(np.divide(s, d[..., None], out=np.zeros_like(s), where=d[..., None] > 0)), 0, 127)
    s_eff = d[..., None] * sc
    q = (np.clip(np.round(np.divide(x, s_eff[..., None], out=np.zeros_like(x),
                                    where=s_eff[..., None] > 0)), -32, 31)
         + 32).astype(np.uint8).reshape(n, k // 256, 2, 4, 32)  # half h, group g: weights 128h + 32g + j
    q0, q1, q2, q3 = (q[:, :, :, g] for g in range(4))
    ql = np.concatenate([(q0 & 15) | ((q2 & 15) << 4), (q1 & 15) | ((q3 & 15) << 4)], -1)  # [N, nb, 2, 64]
    qh = (q0 >> 4) | ((q1 >> 4) << 2) | ((q2 >> 4) << 4) | ((q3 >> 4) << 6)  # [N, nb, 2, 32]
    parts = [ql.reshape(n, -1, 128), qh.reshape(n, -1, 64), sc.astype(np.int8).view(np.uint8),
             _fp16(d).view(np.uint8).reshape(n, -1, 2)]
    return np.concatenate(parts, -1).reshape(n, -1)


def encode(w: np.ndarray, qtype: str) -> tuple[np.ndarray, object]:
    """A 2-D weight in `qtype`: (the array gguf's writer takes, its GGML type)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    t = GGMLQuantizationType[qtype]
    data = {"Q4_K": quantize_q4_k, "Q6_K": quantize_q6_k}.get(qtype, lambda a: quantize(a, t))(w)
    back = dequantize(data, t).reshape(w.shape)  # our own quantizers decode right by ggml's formulas
    assert np.abs(back - w).max() <= 0.15 * np.abs(w).max() + 1e-6, qtype
    return data, t


def write_gguf(folder: Path, out: Path, qtype: str, tied: bool = True) -> Path:
    """The qwen2 checkpoint in `folder` as a GGUF with its 2-D weights in `qtype` (norms, biases: F32).
    `tied=False` writes a separate `output.weight` (as llama.cpp does, often in another type)."""
    import gguf
    from safetensors.torch import load_file

    cfg = json.loads((folder / "config.json").read_text())
    weights = {k: v.float().numpy() for k, v in load_file(folder / "model.safetensors").items()}
    if not tied:
        weights.setdefault("lm_head.weight", weights["model.embed_tokens.weight"].copy())
    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    specials = {a["content"] for a in tok.get("added_tokens", []) if a.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]

    w = gguf.GGUFWriter(str(out), "qwen2")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])  # 3: control
    w.add_token_merges(merges)
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_pad_token_id(vocab["<|endoftext|>"])
    w.add_chat_template(CHATML_TEMPLATE)
    for i in range(cfg["num_hidden_layers"]):
        for hf, gg in NAMES[3:]:
            if (name := hf.format(i=i)) in weights:
                _add(w, gg.format(i=i), weights.pop(name), qtype)
    for hf, gg in NAMES[:3]:
        if hf in weights:
            _add(w, gg, weights.pop(hf), qtype)
    assert not weights, f"unmapped tensors: {sorted(weights)}"
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _add(w, name: str, a: np.ndarray, qtype: str) -> None:
    if a.ndim == 2 and qtype == "F16":
        w.add_tensor(name, a.astype(np.float16))
    elif a.ndim == 2:
        data, t = encode(a, qtype)
        w.add_tensor(name, data, raw_dtype=t)
    else:
        w.add_tensor(name, a.astype(np.float32))
