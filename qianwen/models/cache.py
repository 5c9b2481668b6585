"""KV caches. The model hands attention to its cache, so any cache layout plugs in unchanged.

Interface: `attend(layer, q, k, v) -> out` with q [B, Hq, T, D] and k, v [B, Hkv, T, D] (rotary applied),
`length` (tokens already cached, for default positions) and `extra` (per-sequence model state).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F


class Cache(Protocol):
    extra: dict[str, Any]

    @property
    def length(self) -> int: ...

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int = 0) -> torch.Tensor:
    """SDPA where query i (absolute position past + i) sees keys 0..past + i; GQA by head groups."""
    tq, tk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if tq == 1:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    if past == 0 and tq == tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    mask = torch.arange(tk, device=q.device)[None, :] <= (torch.arange(tq, device=q.device)[:, None] + past)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def blocked_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int = 128) -> torch.Tensor:
    """`causal_attention` (past 0), `block` queries at a time against only the keys up to the block's
    last query. On the CPU torch's flash kernel scores whole 512-key blocks, so a causal attention over
    up to ~600 tokens costs as much as a full one; in blocks of 128 it cost 20-25% less at 300-500
    tokens, 7% less at 1,000, the same at 1,500 (dev machine, bf16, SmolLM2's 9 heads of 64)."""
    t = q.shape[2]
    if q.device.type != "cpu" or t <= block:
        return causal_attention(q, k, v)
    out = torch.empty_like(q)
    for a in range(0, t, block):
        b = min(t, a + block)
        out[:, :, a:b] = causal_attention(q[:, :, a:b], k[:, :, :b], v[:, :, :b], past=a)
    return out


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [B, Hq, T, D] over k, v [B, Hkv, S, D] (GQA by head groups; `causal` needs T == S)
    and the log-sum-exp of each query's scaled scores [B, Hq, T] (float32), so that attention over
    several key sets can be merged (`merge_attention`). On the CPU torch's flash kernel, which returns
    it (and wants as many key heads as query heads); elsewhere `_attention_lse_matmul`."""
    if q.device.type != "cpu":
        return _attention_lse_matmul(q, k, v, causal)
    g = q.shape[1] // k.shape[1]
    if g > 1:
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, is_causal=causal)
    return out, lse


def _attention_lse_matmul(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention_lse` in float32 matmuls (any device)."""
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    s = (q.float().reshape(b, hkv, hq // hkv * t, d) @ k.float().transpose(-1, -2)).view(b, hq, t, -1) * d ** -0.5
    if causal:
        s = s.masked_fill(torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]).view(b, hkv, -1, s.shape[-1])
    return (p @ v.float()).view(b, hq, t, d).to(q.dtype), lse


def merge_attention(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor) -> torch.Tensor:
    """Attention over the union of two disjoint key sets from each one's output and log-sum-exp
    (`attention_lse`): the outputs weighted by each set's share of the softmax mass."""
    w1 = torch.sigmoid(lse1 - lse2)[..., None]
    return (o2.float() + (o1.float() - o2.float()) * w1).to(o1.dtype)


class NoCache:
    """Full causal attention over the tokens of one forward, keeping nothing."""

    def __init__(self) -> None:
        self.extra: dict[str, Any] = {}

    @property
    def length(self) -> int:
        return 0

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return causal_attention(q, k, v)


class KVCache:
    """A simple per-request cache: contiguous buffers per layer that grow by doubling."""

    def __init__(self, num_layers: int, capacity: int = 256) -> None:
        self.extra: dict[str, Any] = {}
        self._k: list[torch.Tensor | None] = [None] * num_layers
        self._v: list[torch.Tensor | None] = [None] * num_layers
        self._len = [0] * num_layers
        self._capacity = capacity

    @property
    def length(self) -> int:
        return self._len[0]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        past, t = self._len[layer], k.shape[2]
        kb, vb = self._k[layer], self._v[layer]
        if kb is None or past + t > kb.shape[2]:
            cap = max(self._capacity, 2 * (past + t))
            nk = k.new_empty(k.shape[0], k.shape[1], cap, k.shape[3])
            nv = v.new_empty(v.shape[0], v.shape[1], cap, v.shape[3])
            if kb is not None and vb is not None:
                nk[:, :, :past] = kb[:, :, :past]
                nv[:, :, :past] = vb[:, :, :past]
            kb, vb = self._k[layer], self._v[layer] = nk, nv
        kb[:, :, past:past + t] = k
        vb[:, :, past:past + t] = v
        self._len[layer] = past + t
        return causal_attention(q, kb[:, :, :past + t], vb[:, :, :past + t], past)

    def truncate(self, length: int) -> None:
        """Forget everything after `length` tokens (to reuse a shared prefix)."""
        self._len = [min(n, length) for n in self._len]

    def clone(self) -> KVCache:
        other = KVCache(len(self._k), self._capacity)
        other._k = [None if t is None else t.clone() for t in self._k]
        other._v = [None if t is None else t.clone() for t in self._v]
        other._len = list(self._len)
        other.extra = dict(self.extra)
        return other
