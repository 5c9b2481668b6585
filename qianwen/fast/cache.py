"""A KV cache preallocated once for a whole request (no regrowth, no per-step allocation)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from ..errors import QianwenError
from ..models.cache import causal_attention

KV_CACHE_DTYPES = ("auto", "bfloat16", "float32", "int8")


def kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The element type of a KV cache: `auto` is the model's dtype; int8 keeps a scale per vector."""
    if name not in KV_CACHE_DTYPES:
        raise QianwenError(f"unknown KV cache dtype {name!r}; choose one of {', '.join(KV_CACHE_DTYPES)}")
    return model_dtype if name == "auto" else getattr(torch, name)


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> int8 values [..., D] and fp32 scales [...]: symmetric absmax per vector, the same
    bytes as kernels.c `kv_quantize` (fp32 division, not a multiply by a reciprocal; round half to even)."""
    x = x.float()
    amax = x.abs().amax(-1)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    q = torch.round(x * inv.unsqueeze(-1)).to(torch.int8)
    return q, amax / torch.full_like(amax, 127.0)


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of `quantize_kv` (in fp32, as the kernels load it), as `dtype`."""
    return (q.float() * scale.unsqueeze(-1)).to(dtype)


class KVRow(NamedTuple):
    """Where one sequence's cache lives, for kernels that read and write it themselves (fast/decode.py):
    addresses of layer 0's K and V, strides in elements, the position the new tokens go to, and for int8
    caches the addresses of layer 0's K and V scales (one fp32 per vector: element offset / D)."""

    k: int
    v: int
    layer_stride: int
    head_stride: int
    past: int
    ks: int = 0
    vs: int = 0


class StaticKVCache:
    """`attend` interface of qianwen.models.cache; buffers [layers, B, Hkv, max_len, D] made up front
    (int8: with scales [layers, B, Hkv, max_len])."""

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        shape = (num_layers, batch, num_kv_heads, max_len, head_dim)
        # empty, not zeros: only written slots are read, and untouched pages of a long budget cost nothing
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.ks = self.vs = None
        if dtype == torch.int8:
            self.ks = torch.empty(shape[:-1], dtype=torch.float32, device=device)
            self.vs = torch.empty(shape[:-1], dtype=torch.float32, device=device)
        self._len = [0] * num_layers
        self.max_len = max_len
        self.extra: dict[str, Any] = {}

    @classmethod
    def for_model(cls, net, batch: int, max_len: int, dtype: torch.dtype | None = None) -> StaticKVCache:
        """A cache for `net` (its dtype unless `dtype` is given: see `kv_cache_dtype`)."""
        c = net.config
        dtype = dtype or net.model.norm.weight.dtype
        return cls(c.num_hidden_layers, batch, c.num_key_value_heads, c.head_dim, max_len, dtype,
                   net.model.norm.weight.device)

    @property
    def length(self) -> int:
        return self._len[0]

    def _reserve(self, layer: int, t: int) -> int:
        past = self._len[layer]
        if past + t > self.max_len:
            raise ValueError(f"static KV cache holds {self.max_len} tokens; {past + t} needed")
        self._len[layer] = past + t
        return past

    def native_rows(self, t: int) -> tuple[list[KVRow], torch.dtype]:
        """Reserve `t` positions in every layer; one row per new token (batch entry b's t tokens as rows
        b * t .. b * t + t - 1, at positions past .. past + t - 1) with its K/V addresses (see KVRow)."""
        past = self._len[0]
        for layer in range(len(self._len)):
            if self._reserve(layer, t) != past:
                raise ValueError("the cache's layers hold different lengths")
        _, b, h, s, d = self.k.shape
        es = self.k.element_size()
        ks, vs = (0, 0) if self.ks is None else (self.ks.data_ptr(), self.vs.data_ptr())
        return [KVRow(self.k.data_ptr() + i * h * s * d * es, self.v.data_ptr() + i * h * s * d * es, b * h * s * d,
                      s * d, past + j, ks and ks + i * h * s * 4, vs and vs + i * h * s * 4)
                for i in range(b) for j in range(t)], self.k.dtype

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        t = k.shape[2]
        past = self._reserve(layer, t)
        kb, vb = self.k[layer], self.v[layer]
        if self.ks is None:
            kb[:, :, past:past + t] = k
            vb[:, :, past:past + t] = v
            keys, values = kb[:, :, :past + t], vb[:, :, :past + t]
        else:
            ks, vs = self.ks[layer], self.vs[layer]
            kb[:, :, past:past + t], ks[:, :, past:past + t] = quantize_kv(k)
            vb[:, :, past:past + t], vs[:, :, past:past + t] = quantize_kv(v)
            keys = dequantize_kv(kb[:, :, :past + t], ks[:, :, :past + t], q.dtype)
            values = dequantize_kv(vb[:, :, :past + t], vs[:, :, :past + t], q.dtype)
        return causal_attention(q, keys.to(q.dtype), values.to(q.dtype), past)
