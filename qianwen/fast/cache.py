"""A KV cache preallocated once for a whole request (no regrowth, no per-step allocation)."""

from __future__ import annotations

from typing import Any

import torch

from ..models.cache import causal_attention


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

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        past, t = self._len[layer], k.shape[2]
        if past + t > self.max_len:
            raise ValueError(f"static KV cache holds {self.max_len} tokens; {past + t} needed")
        kb, vb = self.k[layer], self.v[layer]
        kb[:, :, past:past + t] = k
        vb[:, :, past:past + t] = v
        self._len[layer] = past + t
        return causal_attention(q, kb[:, :, :past + t], vb[:, :, :past + t], past)
