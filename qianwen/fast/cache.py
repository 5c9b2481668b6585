"""A KV cache preallocated once for a whole request (no regrowth, no per-step allocation)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from ..models.cache import causal_attention


class KVRow(NamedTuple):
    """Where one sequence's cache lives, for kernels that read and write it themselves (fast/decode.py):
    addresses of layer 0's K and V, strides in elements, and the position the new tokens go to."""

    k: int
    v: int
    layer_stride: int
    head_stride: int
    past: int


class StaticKVCache:
    """`attend` interface of qianwen.models.cache; buffers [layers, B, Hkv, max_len, D] made up front."""

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        shape = (num_layers, batch, num_kv_heads, max_len, head_dim)
        # empty, not zeros: only written slots are read, and untouched pages of a long budget cost nothing
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self._len = [0] * num_layers
        self.max_len = max_len
        self.extra: dict[str, Any] = {}

    @classmethod
    def for_model(cls, net, batch: int, max_len: int) -> StaticKVCache:
        c = net.config
        dtype = net.model.norm.weight.dtype
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
        """Reserve `t` positions in every layer; the rows' K/V addresses (see KVRow)."""
        past = self._len[0]
        for layer in range(len(self._len)):
            if self._reserve(layer, t) != past:
                raise ValueError("the cache's layers hold different lengths")
        _, b, h, s, d = self.k.shape
        es = self.k.element_size()
        return [KVRow(self.k.data_ptr() + i * h * s * d * es, self.v.data_ptr() + i * h * s * d * es, b * h * s * d,
                      s * d, past) for i in range(b)], self.k.dtype

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        t = k.shape[2]
        past = self._reserve(layer, t)
        kb, vb = self.k[layer], self.v[layer]
        kb[:, :, past:past + t] = k
        vb[:, :, past:past + t] = v
        return causal_attention(q, kb[:, :, :past + t], vb[:, :, :past + t], past)
