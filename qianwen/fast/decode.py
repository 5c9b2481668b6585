"""The layer stack over token rows on the C kernels: what `optimize` installs as a model's `fast_decode`.
It computes exactly the layers of models/layers.py, in fp32 activations, with about ten kernel calls per
layer instead of some forty torch ops; when every projection has a kernel, the whole layer stack is one
call into C (`decode_layers`, the same kernels in the same order), so Python and ctypes overhead, most of
a small model's step otherwise, all but vanish.

Every token is a row: a decode step's one token per sequence, a prompt's tokens (consecutive positions,
attending causally), or the engine's mix of both (engine/model_runner.py `step_rows`). Used for inference
on the CPU when the kernels are built (native.py) and the cache can say where its rows live
(`native_rows`: StaticKVCache, the engine's BatchCache); anything else runs the model's own forward. Each
row goes through the same kernels whatever the other rows (docs/conventions.md: batch invariance), so a
prompt's K/V and logits are bitwise those of decoding it token by token."""

from __future__ import annotations

import ctypes
import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import native
from ..quant.linear import NativeLinear

KV_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}  # kernels.c's cache element types
ROWS_PER_CALL = 256  # rows (tokens) per call into the kernels: bounds the activation and attention buffers


class Projection:
    """Modules reading the same input whose outputs sit side by side (one when `optimize` fused them)."""

    def __init__(self, mods: list[nn.Module]) -> None:
        self.mods = mods
        self.native = native.lib() is not None and all(isinstance(m, NativeLinear) for m in mods)
        self.calls: list[tuple] = []
        self._anchor, self._ptr = next(iter([*mods[0].buffers(), *mods[0].parameters()]), None), None

    def __getstate__(self) -> dict:  # a copied or pickled model plans again: addresses, ctypes functions
        return {**self.__dict__, "calls": [], "_ptr": None}

    def _plan(self) -> None:
        """The kernel calls' constant arguments, worked out once (Python is a real share of a step).
        They hold addresses: `_anchor` notices a copied model (deepcopy), whose weights moved."""
        lib = native.lib()
        self.calls = [(getattr(lib, m.KERNEL), m.in_features, m.kernel_args(), 4 * m.out_features)
                      for m in self.mods]
        self._ptr = self._anchor.data_ptr()

    def __call__(self, x: torch.Tensor, out: torch.Tensor, accumulate: bool = False) -> None:
        """out (+)= the projection of fp32 x [M, K], out [M, N] fp32."""
        if self.native:
            if self._anchor.data_ptr() != self._ptr:
                self._plan()
            m, xp, yp, ld, acc = x.shape[0], x.data_ptr(), out.data_ptr(), out.stride(0), int(accumulate)
            for kernel, k, args, nbytes in self.calls:
                kernel(xp, m, k, *args, yp, ld, acc)
                yp += nbytes
            return
        col = 0
        for mod in self.mods:
            n = mod.out_features
            if isinstance(mod, nn.Linear):
                y = F.linear(x.to(mod.weight.dtype), mod.weight, mod.bias).float()
            else:  # quantized layers without the kernels: their own forward
                y = mod(x).float()
            part = out[:, col:col + n]
            part.add_(y) if accumulate else part.copy_(y)
            col += n


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().contiguous()


def _proj(mod: NativeLinear) -> native.Proj:
    a = mod.kernel_args()
    if mod.KERNEL == "dense_gemm":
        w, bf16, n, bias = a
        return native.Proj(16 if bf16 else 32, mod.in_features, n, 0, 0, w, None, bias)
    if mod.KERNEL == "q4_gemm":
        w, s, g, n, npad, bias = a
        return native.Proj(4, mod.in_features, n, npad, g, w, s, bias)
    w, s, g, n, bias = a
    return native.Proj(8, mod.in_features, n, 0, g, w, s, bias)


class NativeDecoder:
    def __init__(self, net: nn.Module) -> None:
        c = net.config
        self.net = net
        self.hq, self.hkv, self.d, self.h = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size
        self.inter, self.eps = c.intermediate_size, c.rms_norm_eps
        self.layers = []
        for layer in net.model.layers:
            att, mlp = layer.self_attn, layer.mlp
            qkv = [att.qkv_proj] if hasattr(att, "qkv_proj") else [att.q_proj, att.k_proj, att.v_proj]
            gate_up = [mlp.gate_up_proj] if hasattr(mlp, "gate_up_proj") else [mlp.gate_proj, mlp.up_proj]
            qk_norm = hasattr(att, "q_norm")  # Qwen3
            self.layers.append(dict(
                ln1=_f32(layer.input_layernorm.weight), ln2=_f32(layer.post_attention_layernorm.weight),
                qkv=Projection(qkv), o=Projection([att.o_proj]), gate_up=Projection(gate_up),
                down=Projection([mlp.down_proj]),
                q_norm=_f32(att.q_norm.weight) if qk_norm else None, k_norm=_f32(att.k_norm.weight) if qk_norm else None))
        self.norm = _f32(net.model.norm.weight)
        # every projection has a kernel: the whole layer stack runs in one call (kernels.c decode_layers)
        self.one_call = all(layer[k].native for layer in self.layers for k in ("qkv", "o", "gate_up", "down"))
        self._c_layers, self._c_ptr = None, None

    def __getstate__(self) -> dict:  # a copied or pickled model plans again: the layers hold addresses
        return {**self.__dict__, "_c_layers": None, "_c_ptr": None}

    def _plan(self):
        """kernels.c `Layer` descriptors of every layer (their addresses follow a copied model)."""
        layers = (native.Layer * len(self.layers))()
        for c, layer in zip(layers, self.layers, strict=True):
            c.ln1, c.ln2 = layer["ln1"].data_ptr(), layer["ln2"].data_ptr()
            if layer["q_norm"] is not None:
                c.q_norm, c.k_norm = layer["q_norm"].data_ptr(), layer["k_norm"].data_ptr()
            qkv, gu = layer["qkv"].mods, layer["gate_up"].mods
            c.n_qkv, c.n_gu = len(qkv), len(gu)
            for i, mod in enumerate(qkv):
                c.qkv[i] = _proj(mod)
            for i, mod in enumerate(gu):
                c.gu[i] = _proj(mod)
            c.o, c.down = _proj(layer["o"].mods[0]), _proj(layer["down"].mods[0])
        self._c_layers, self._c_ptr = layers, self.norm.data_ptr()
        return layers

    def accepts(self, cache) -> bool:
        return hasattr(cache, "native_rows") and self.norm.device.type == "cpu"

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """input_ids, positions [B, T] -> final hidden states [B, T, hidden] (fp32). Every token is a row:
        a decode step's (T = 1), a prompt's (its T tokens at consecutive positions, attending causally), or
        the engine's mix (model_runner.py `step_rows`). The kernels store a layer's K/V of every row before
        any row attends, and compute each row on its own, so a token's results do not depend on the other
        rows: a prompt prefilled as rows writes exactly what decoding it token by token would. Rows run in
        pieces of ROWS_PER_CALL (bounded buffers); earlier pieces' K/V are in the cache for later ones."""
        native.kernel_threads()  # this thread's OpenMP count: torch's setting, fewer while cores are busy
        b, t = input_ids.shape
        m, h, d = b * t, self.h, self.d
        x = self.net.model.embed_tokens(input_ids).reshape(m, h).float().contiguous()
        cos, sin = (c.reshape(m, d).float().contiguous() for c in self.net.rotary(positions, cache, torch.float32))
        scale = torch.full((m,), 1 / math.sqrt(d))
        q_scale = self.net.q_scale(positions)
        if q_scale is not None:  # Qwen-7B LogN
            scale *= q_scale.reshape(m).float()
        rows, dtype = cache.native_rows(t)
        if dtype not in KV_CODES:
            raise ValueError(f"the decode kernels take fp32, bf16 or int8 caches, not {dtype}")
        for i in range(0, m, ROWS_PER_CALL):
            j = min(m, i + ROWS_PER_CALL)
            self._rows(x[i:j], cos[i:j], sin[i:j], scale[i:j], rows[i:j], dtype)
        native.lib().rms_norm(x.data_ptr(), x.data_ptr(), m, h, h, h, self.norm.data_ptr(), self.eps)
        return x.view(b, t, h)

    def _rows(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, scale: torch.Tensor,
              rows: list, dtype: torch.dtype) -> None:
        """The layer stack over rows x [m, hidden] (updated in place), before the final norm."""
        lib = native.lib()
        m, hq, hkv, d, h, eps = x.shape[0], self.hq, self.hkv, self.d, self.h, self.eps
        qkv_n = (hq + 2 * hkv) * d
        hbuf, att = torch.empty(m, h), torch.empty(m, hq * d)
        qkv, gu, act = torch.empty(m, qkv_n), torch.empty(m, 2 * self.inter), torch.empty(m, self.inter)
        xp, hp, qkvp, attp, gup, actp = (t.data_ptr() for t in (x, hbuf, qkv, att, gu, act))
        es, code = dtype.itemsize, KV_CODES[dtype]
        kb, vb, ks, vs = ((ctypes.c_void_p * m)() for _ in range(4))  # ks, vs: int8 caches' scales
        pos = (ctypes.c_int * m)(*(r.past if r else 0 for r in rows))
        lens = (ctypes.c_int * m)(*(r.past + 1 if r else 0 for r in rows))
        strides = (ctypes.c_long * m)(*(r.head_stride if r else 0 for r in rows))
        if self.one_call:
            layers = self._c_layers if self._c_ptr == self.norm.data_ptr() else self._plan()
            k0 = (ctypes.c_void_p * m)(*(r.k if r else None for r in rows))
            v0 = (ctypes.c_void_p * m)(*(r.v if r else None for r in rows))
            ks0 = (ctypes.c_void_p * m)(*(r.ks if r else None for r in rows))
            vs0 = (ctypes.c_void_p * m)(*(r.vs if r else None for r in rows))
            layer_strides = (ctypes.c_long * m)(*(r.layer_stride if r else 0 for r in rows))
            lib.decode_layers(layers, len(self.layers), m, h, hq, hkv, d, self.inter, eps, xp, hp, qkvp, attp, gup,
                              actp, cos.data_ptr(), sin.data_ptr(), scale.data_ptr(), k0, v0, ks0, vs0,
                              layer_strides, strides, pos, lens, code)
            return
        for i, layer in enumerate(self.layers):  # the same kernels, called one by one (some projection on torch)
            for j, r in enumerate(rows):
                if r is not None:
                    kb[j], vb[j] = r.k + i * r.layer_stride * es, r.v + i * r.layer_stride * es
                    if code == KV_CODES[torch.int8]:  # one fp32 scale per D elements
                        ks[j], vs[j] = r.ks + i * r.layer_stride // d * 4, r.vs + i * r.layer_stride // d * 4
            lib.rms_norm(xp, hp, m, h, h, h, layer["ln1"].data_ptr(), eps)
            layer["qkv"](hbuf, qkv)
            if layer["q_norm"] is not None:  # Qwen3: per-head RMSNorm of q and k before rotary
                for j in range(m):
                    q0, k0 = qkvp + 4 * j * qkv_n, qkvp + 4 * (j * qkv_n + hq * d)
                    lib.rms_norm(q0, q0, hq, d, d, d, layer["q_norm"].data_ptr(), eps)
                    lib.rms_norm(k0, k0, hkv, d, d, d, layer["k_norm"].data_ptr(), eps)
            lib.rope(qkvp, m, hq + hkv, d, qkv_n, cos.data_ptr(), sin.data_ptr())
            lib.kv_store(qkvp, m, qkv_n, hq * d, (hq + hkv) * d, hkv, d, kb, vb, ks, vs, pos, strides, code)
            lib.attend(qkvp, m, hq, hkv, d, qkv_n, kb, vb, ks, vs, lens, strides, code, scale.data_ptr(), attp)
            layer["o"](att, x, accumulate=True)

            lib.rms_norm(xp, hp, m, h, h, h, layer["ln2"].data_ptr(), eps)
            layer["gate_up"](hbuf, gu)
            lib.silu_mul(gup, m, self.inter, actp)
            layer["down"](act, x, accumulate=True)
