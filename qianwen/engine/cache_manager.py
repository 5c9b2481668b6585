"""The engine's KV cache: one growable buffer per sequence under a global token budget.

Each sequence owns a buffer [layers, 2, kv_heads, capacity, head_dim] that grows in whole blocks, so
its attention always reads a contiguous prefix of its own buffer: the same shapes and the same kernel
calls whether it runs alone or beside others (batch invariance). The budget counts allocated capacity;
when it is spent the scheduler queues or preempts sequences. Prefilled prompts (and finished answers) leave
copies of their full blocks behind for later prompts that start the same way (prefix_cache.py), in the same budget.
Where decode steps write what a prefill would (the engine's row path), a finished sequence also leaves its
whole buffer (`donate`): a later sequence that starts the same way at least as far as the cached blocks go
takes that buffer over as its own (`admit`) instead of a new one with the blocks copied in: a chat's next
turn copies nothing. Such buffers are the first to go when room is needed.


An int8 cache (`--kv-cache-dtype int8`) keeps beside the buffer one fp32 scale per vector, scales
[layers, 2, kv_heads, capacity] (fast/cache.py `quantize_kv`, kernels.c `kv_quantize`).
"""

from __future__ import annotations

from typing import Any

import torch

from ..fast.cache import KVRow, dequantize_kv, quantize_kv
from ..models.cache import causal_attention
from ..tokenizer.base import common_start
from .prefix_cache import PrefixCache


class SeqKV:
    """One sequence's K/V for every layer."""

    def __init__(self, buf: torch.Tensor, scales: torch.Tensor | None = None) -> None:
        self.buf = buf  # [layers, 2, Hkv, capacity, D]
        self.scales = scales  # int8 buf: [layers, 2, Hkv, capacity] fp32, else None

    @property
    def capacity(self) -> int:
        return self.buf.shape[3]


def _copy(dst: SeqKV, at: int, src: SeqKV, start: int, n: int) -> None:
    """dst's tokens at..at+n = src's start..start+n (with their int8 scales)."""
    dst.buf[:, :, :, at:at + n] = src.buf[:, :, :, start:start + n]
    if dst.scales is not None:
        dst.scales[:, :, :, at:at + n] = src.scales[:, :, :, start:start + n]


class CacheManager:
    """The token budget, shared by live sequences' buffers (`used`) and cached prefix blocks
    (`prefix.num_tokens`, prefix_cache.py); cached blocks are evicted, least recently used first, whenever
    a live sequence needs their room."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, max_tokens: int, block_size: int = 256,
                 prefix_block_size: int | None = 16, prefix_partial: bool = False) -> None:
        self.shape = (num_layers, 2, num_kv_heads, head_dim)
        self.dtype, self.device = dtype, device
        self.block_size = block_size
        self.max_tokens = max(block_size, max_tokens // block_size * block_size)
        self.used = 0  # capacity of live sequences' buffers
        self.prefix = PrefixCache(prefix_block_size, prefix_partial) if prefix_block_size else None
        self.donors: list[tuple[list[int], SeqKV]] = []  # finished sequences' buffers and the tokens they hold
        self.donor_tokens = 0  # their capacity

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
    def cached_tokens(self) -> int:
        return self.prefix.num_tokens if self.prefix is not None else 0

    @property
    def free_tokens(self) -> int:
        return self.max_tokens - self.used - self.cached_tokens - self.donor_tokens

    def _make_room(self, n_tokens: int) -> bool:
        """Drop donated buffers, oldest first, then evict cached prefix blocks until n_tokens are free; False
        when even that is not enough."""
        while n_tokens > self.free_tokens:
            if self.donors:
                self.donor_tokens -= self.donors.pop(0)[1].capacity
            elif self.prefix is None or not self.prefix.evict():
                return False
        return True

    def allocate(self, n_tokens: int) -> SeqKV | None:
        cap = self._round(n_tokens)
        if not self._make_room(cap):
            return None
        self.used += cap
        return self._empty(cap)

    def ensure(self, kv: SeqKV, n_tokens: int, keep: int) -> bool:
        """Grow `kv` to hold `n_tokens` (copying the first `keep`); False when the budget is spent."""
        if n_tokens <= kv.capacity:
            return True
        cap = self._round(n_tokens)
        if not self._make_room(cap - kv.capacity):
            return False
        new = self._empty(cap)
        _copy(new, 0, kv, 0, keep)
        self.used += cap - kv.capacity
        kv.buf, kv.scales = new.buf, new.scales
        return True

    def free(self, kv: SeqKV | None) -> None:
        if kv is not None and kv.buf.numel():
            self.used -= kv.capacity
            kv.buf, kv.scales = kv.buf.new_empty(0), None

    # ------------------------------------------------------------------ prefix caching

    def admit(self, ids: list[int], n_tokens: int) -> tuple[SeqKV, int] | None:
        """A buffer for a new sequence of `ids` (room for n_tokens) and how many of its first tokens it holds
        already (never all: the last token is computed for its logits): a donated buffer that starts as ids
        do at least as far as the cached prefix blocks, taken over as it is, else a new buffer with those
        blocks copied in. None when there is no room."""
        limit, n, blocks, part = len(ids) - 1, 0, [], None
        if self.prefix is not None:
            blocks, part = self.prefix.match(ids, limit)
            n = len(blocks) * self.prefix.block_size + (part[1] if part is not None else 0)
        kv, hold = self._take_donor(ids, limit, n)
        if kv is not None and not self.ensure(kv, n_tokens, hold):
            self.free(kv)  # no room to grow it: start afresh
            kv = None
        if kv is None:
            kv, hold = self.allocate(n_tokens), n
            if kv is None:
                return None
            b = self.prefix.block_size if self.prefix is not None else 0
            for i, block in enumerate(blocks):
                _copy(kv, i * b, block, 0, b)
            if part is not None:  # the first tokens of the next block (partial matching, prefix_cache.py)
                _copy(kv, len(blocks) * b, part[0], 0, part[1])
        if self.prefix is not None:
            self.prefix.count(len(ids), hold)
        return kv, hold

    def _take_donor(self, ids: list[int], limit: int, at_least: int) -> tuple[SeqKV | None, int]:
        """The donated buffer that ids continue (all its tokens but at most a block's: a chat's next turn
        re-encodes the end of the answer it quotes), at least `at_least` tokens of it (the cached blocks'
        reach), moved to the live sequences' budget, and how many of its tokens ids start with (at most
        `limit`). A prompt that shares less (say a system prompt) leaves it to its own continuation."""
        best, hold = None, 0
        for i, (tokens, _) in enumerate(self.donors):
            need = max(at_least, len(tokens) - self.prefix.block_size, 1)
            if need > min(limit, len(tokens)) or tokens[need - 1] != ids[need - 1]:
                continue  # (the last token it must share tells most donors apart at once)
            n = common_start(tokens, ids, min(limit, len(tokens)))
            if n >= need and n > hold:
                best, hold = i, n
        if best is None:
            return None, 0
        _, kv = self.donors.pop(best)
        self.donor_tokens -= kv.capacity
        self.used += kv.capacity
        return kv, hold

    def donate(self, ids: list[int], kv: SeqKV) -> None:
        """Keep a finished sequence's buffer, whose K/V of `ids` are what a prefill of them would compute,
        for a later sequence that starts the same way (`admit`); it counts against the budget as a live
        buffer does, until taken or dropped for room (`_make_room`)."""
        if not ids or self.prefix is None:
            self.free(kv)
            return
        self.used -= kv.capacity
        self.donor_tokens += kv.capacity
        self.donors.append((ids, SeqKV(kv.buf, kv.scales)))
        kv.buf, kv.scales = kv.buf.new_empty(0), None

    def remember(self, ids: list[int], kv: SeqKV, n_tokens: int, tail: bool = False) -> None:
        """Keep copies of the full blocks among the first n_tokens of `ids` that `kv` holds (computed as a
        prefill would: see prefix_cache.py), and with `tail` (a finished sequence, under partial matching)
        the last, partial block too, evicting older blocks for room but never live sequences."""
        if self.prefix is None:
            return
        b, chain = self.prefix.block_size, self.prefix.chain(ids, n_tokens, tail and self.prefix.partial)
        keys = [key for key, _, _ in chain]
        self.prefix.touch(keys)  # the blocks already cached are not the ones to make room
        for i, (key, parent, tokens) in enumerate(chain):
            if key in self.prefix.blocks:
                continue
            if not self._make_room(b):
                break
            block = self._empty(b)
            _copy(block, 0, kv, i * b, len(tokens))
            self.prefix.add(key, parent, tokens, block)
        self.prefix.touch(keys)


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
        """For kernels that write the cache themselves (fast/decode.py): one row per new token (batch entry
        b's `t` tokens as rows b * t .. b * t + t - 1, at positions past[b] ..) with its K/V addresses
        (None for padding rows)."""
        rows: list[KVRow | None] = []
        dtype = torch.float32
        for kv, past in zip(self.kvs, self.past, strict=True):
            if kv is None:
                rows += [None] * t
                continue
            _, _, h, cap, d = kv.buf.shape
            if past + t > cap:
                raise ValueError(f"sequence cache holds {cap} tokens; {past + t} needed")
            dtype, k = kv.buf.dtype, kv.buf.data_ptr()
            ks = 0 if kv.scales is None else kv.scales.data_ptr()
            rows += [KVRow(k, k + h * cap * d * kv.buf.element_size(), 2 * h * cap * d, cap * d, past + j,
                           ks, ks and ks + h * cap * 4) for j in range(t)]
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
