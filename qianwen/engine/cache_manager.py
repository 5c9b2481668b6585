"""The engine's KV cache: one growable buffer per sequence under a global token budget.

Each sequence owns a buffer [layers, 2, kv_heads, capacity, head_dim] that grows in whole blocks, so
its attention always reads a contiguous prefix of its own buffer: the same shapes and the same kernel
calls whether it runs alone or beside others (batch invariance). The budget counts allocated capacity;
when it is spent the scheduler queues or preempts sequences. Finished prompts leave copies of their full
blocks behind for later prompts that start the same way (prefix_cache.py), in the same budget.
"""

from __future__ import annotations

from typing import Any

import torch

from ..fast.cache import KVRow
from ..models.cache import causal_attention
from .prefix_cache import PrefixCache


class SeqKV:
    """One sequence's K/V for every layer."""

    def __init__(self, buf: torch.Tensor) -> None:
        self.buf = buf  # [layers, 2, Hkv, capacity, D]

    @property
    def capacity(self) -> int:
        return self.buf.shape[3]


class CacheManager:
    """The token budget, shared by live sequences' buffers (`used`) and cached prefix blocks
    (`prefix.num_tokens`, prefix_cache.py); cached blocks are evicted, least recently used first, whenever
    a live sequence needs their room."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, max_tokens: int, block_size: int = 256,
                 prefix_block_size: int | None = 16) -> None:
        self.shape = (num_layers, 2, num_kv_heads, head_dim)
        self.dtype, self.device = dtype, device
        self.block_size = block_size
        self.max_tokens = max(block_size, max_tokens // block_size * block_size)
        self.used = 0  # capacity of live sequences' buffers
        self.prefix = PrefixCache(prefix_block_size) if prefix_block_size else None

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()

    def _round(self, n: int) -> int:
        return -(-n // self.block_size) * self.block_size

    def _buffer(self, capacity: int) -> torch.Tensor:
        """A K/V buffer [layers, 2, kv_heads, capacity, head_dim]: the one place buffers are made."""
        layers, two, hkv, d = self.shape
        return torch.empty(layers, two, hkv, capacity, d, dtype=self.dtype, device=self.device)

    @property
    def cached_tokens(self) -> int:
        return self.prefix.num_tokens if self.prefix is not None else 0

    @property
    def free_tokens(self) -> int:
        return self.max_tokens - self.used - self.cached_tokens

    def _make_room(self, n_tokens: int) -> bool:
        """Evict cached prefix blocks until n_tokens are free; False when even that is not enough."""
        while n_tokens > self.free_tokens:
            if self.prefix is None or not self.prefix.evict():
                return False
        return True

    def can_allocate(self, n_tokens: int) -> bool:
        return self._round(n_tokens) <= self.max_tokens - self.used

    def allocate(self, n_tokens: int) -> SeqKV | None:
        cap = self._round(n_tokens)
        if not self._make_room(cap):
            return None
        self.used += cap
        return SeqKV(self._buffer(cap))

    def ensure(self, kv: SeqKV, n_tokens: int, keep: int) -> bool:
        """Grow `kv` to hold `n_tokens` (copying the first `keep`); False when the budget is spent."""
        if n_tokens <= kv.capacity:
            return True
        cap = self._round(n_tokens)
        if not self._make_room(cap - kv.capacity):
            return False
        new = self._buffer(cap)
        new[:, :, :, :keep] = kv.buf[:, :, :, :keep]
        self.used += cap - kv.capacity
        kv.buf = new
        return True

    def free(self, kv: SeqKV | None) -> None:
        if kv is not None and kv.buf.numel():
            self.used -= kv.capacity
            kv.buf = kv.buf.new_empty(0)

    # ------------------------------------------------------------------ prefix caching

    def reuse(self, ids: list[int], kv: SeqKV) -> int:
        """Copy the longest cached prefix of `ids` (never all of it: the last token is computed for its
        logits) into `kv`; returns how many tokens it holds now."""
        if self.prefix is None:
            return 0
        blocks = self.prefix.match(ids, len(ids) - 1)
        b = self.prefix.block_size
        for i, block in enumerate(blocks):
            kv.buf[:, :, :, i * b:(i + 1) * b] = block
        self.prefix.count(len(ids), len(blocks) * b)
        return len(blocks) * b

    def remember(self, ids: list[int], kv: SeqKV, n_tokens: int) -> None:
        """Keep copies of the full blocks among the first n_tokens of `ids` that `kv` holds (computed by a
        prefill), evicting older blocks for room but never live sequences."""
        if self.prefix is None:
            return
        b, chain = self.prefix.block_size, self.prefix.chain(ids, n_tokens)
        keys = [key for key, _, _ in chain]
        self.prefix.touch(keys)  # the blocks already cached are not the ones to make room
        for i, (key, parent, tokens) in enumerate(chain):
            if key in self.prefix.blocks:
                continue
            if not self._make_room(b):
                break
            block = self._buffer(b)
            block.copy_(kv.buf[:, :, :, i * b:(i + 1) * b])
            self.prefix.add(key, parent, tokens, block)
        self.prefix.touch(keys)

    def clear_prefix_cache(self) -> None:
        while self.prefix is not None and self.prefix.evict():
            pass


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
            rows.append(KVRow(k, k + h * cap * d * kv.buf.element_size(), 2 * h * cap * d, cap * d, past))
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
            buf[0, :, past:past + t] = k[b]
            buf[1, :, past:past + t] = v[b]
            keys, values = buf[0, :, :past + t].unsqueeze(0), buf[1, :, :past + t].unsqueeze(0)
            out.append(causal_attention(q[b:b + 1], keys, values, past))
        return out[0] if len(out) == 1 else torch.cat(out)
