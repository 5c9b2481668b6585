"""The engine's KV cache: one growable buffer per sequence under a global token budget.

Each sequence owns a buffer [layers, 2, kv_heads, capacity, head_dim] that grows in whole blocks, so
its attention always reads a contiguous prefix of its own buffer: the same shapes and the same kernel
calls whether it runs alone or beside others (batch invariance). The budget counts allocated capacity;
when it is spent the scheduler queues or preempts sequences.

An int8 cache (`--kv-cache-dtype int8`) keeps beside the buffer one fp32 scale per vector, scales
[layers, 2, kv_heads, capacity] (fast/cache.py `quantize_kv`, kernels.c `kv_quantize`).
"""

from __future__ import annotations

from typing import Any

import torch

from ..fast.cache import KVRow, dequantize_kv, quantize_kv
from ..models.cache import causal_attention


class SeqKV:
    """One sequence's K/V for every layer."""

    def __init__(self, buf: torch.Tensor, scales: torch.Tensor | None = None) -> None:
        self.buf = buf  # [layers, 2, Hkv, capacity, D]
        self.scales = scales  # int8 buf: [layers, 2, Hkv, capacity] fp32, else None

    @property
    def capacity(self) -> int:
        return self.buf.shape[3]


class CacheManager:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, max_tokens: int, block_size: int = 256) -> None:
        self.shape = (num_layers, 2, num_kv_heads, head_dim)
        self.dtype, self.device = dtype, device
        self.block_size = block_size
        self.max_tokens = max(block_size, max_tokens // block_size * block_size)
        self.used = 0

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """K and V of every layer for one token (int8: and their fp32 scales)."""
        per_vector = head_dim * dtype.itemsize + (4 if dtype == torch.int8 else 0)
        return 2 * num_layers * num_kv_heads * per_vector

    def _empty(self, cap: int) -> SeqKV:
        layers, two, hkv, d = self.shape
        buf = torch.empty(layers, two, hkv, cap, d, dtype=self.dtype, device=self.device)
        scales = None
        if self.dtype == torch.int8:
            scales = torch.empty(layers, two, hkv, cap, dtype=torch.float32, device=self.device)
        return SeqKV(buf, scales)

    def _round(self, n: int) -> int:
        return -(-n // self.block_size) * self.block_size

    @property
    def free_tokens(self) -> int:
        return self.max_tokens - self.used

    def can_allocate(self, n_tokens: int) -> bool:
        return self._round(n_tokens) <= self.free_tokens

    def allocate(self, n_tokens: int) -> SeqKV | None:
        cap = self._round(n_tokens)
        if cap > self.free_tokens:
            return None
        self.used += cap
        return self._empty(cap)

    def ensure(self, kv: SeqKV, n_tokens: int, keep: int) -> bool:
        """Grow `kv` to hold `n_tokens` (copying the first `keep`); False when the budget is spent."""
        if n_tokens <= kv.capacity:
            return True
        cap = self._round(n_tokens)
        if cap - kv.capacity > self.free_tokens:
            return False
        new = self._empty(cap)
        new.buf[:, :, :, :keep] = kv.buf[:, :, :, :keep]
        if new.scales is not None:
            new.scales[:, :, :, :keep] = kv.scales[:, :, :, :keep]
        self.used += cap - kv.capacity
        kv.buf, kv.scales = new.buf, new.scales
        return True

    def free(self, kv: SeqKV | None) -> None:
        if kv is not None and kv.buf.numel():
            self.used -= kv.capacity
            kv.buf, kv.scales = kv.buf.new_empty(0), None


class BatchCache:
    """The `Cache` the model sees for one forward over several sequences (or padding rows, None).

    Row b of the batch is sequence `seqs[b]`, whose first `past[b]` tokens are already cached; the T new
    tokens of every row are written after them and attention runs row by row, each over its own prefix.
    """

    def __init__(self, kvs: list[SeqKV | None], past: list[int], extra: dict[str, Any] | None = None) -> None:
        self.kvs, self.past = kvs, past
        self.extra: dict[str, Any] = extra if extra is not None else {}

    @property
    def length(self) -> int:
        return self.past[0] if self.past else 0

    def native_rows(self, t: int) -> tuple[list[KVRow | None], torch.dtype]:
        """For kernels that write the cache themselves (fast/decode.py): each row's K/V addresses
        (None for padding rows); the `t` new tokens go after `past`."""
        rows: list[KVRow | None] = []
        dtype = torch.float32
        for kv, past in zip(self.kvs, self.past, strict=True):
            if kv is None:
                rows.append(None)
                continue
            _, _, h, cap, d = kv.buf.shape
            if past + t > cap:
                raise ValueError(f"sequence cache holds {cap} tokens; {past + t} needed")
            dtype, k = kv.buf.dtype, kv.buf.data_ptr()
            ks = 0 if kv.scales is None else kv.scales.data_ptr()
            rows.append(KVRow(k, k + h * cap * d * kv.buf.element_size(), 2 * h * cap * d, cap * d, past,
                              ks, ks and ks + h * cap * 4))
        return rows, dtype

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        t = q.shape[2]
        out = []
        for b, kv in enumerate(self.kvs):
            if kv is None:  # padding row: attends to itself only (softmax over one key = its value)
                out.append(v[b:b + 1].repeat_interleave(q.shape[1] // v.shape[1], dim=1).expand(-1, -1, t, -1))
                continue
            past = self.past[b]
            buf = kv.buf[layer]
            if kv.scales is None:
                buf[0, :, past:past + t] = k[b]
                buf[1, :, past:past + t] = v[b]
                keys, values = buf[0, :, :past + t], buf[1, :, :past + t]
            else:
                sc = kv.scales[layer]
                buf[0, :, past:past + t], sc[0, :, past:past + t] = quantize_kv(k[b])
                buf[1, :, past:past + t], sc[1, :, past:past + t] = quantize_kv(v[b])
                keys = dequantize_kv(buf[0, :, :past + t], sc[0, :, :past + t], q.dtype)
                values = dequantize_kv(buf[1, :, :past + t], sc[1, :, :past + t], q.dtype)
            keys, values = keys.to(q.dtype).unsqueeze(0), values.to(q.dtype).unsqueeze(0)
            out.append(causal_attention(q[b:b + 1], keys, values, past))
        return out[0] if len(out) == 1 else torch.cat(out)
