"""GGUF block formats repacked, without going through float, into `Int4Linear` (Q8_0, Q6_K: `Int8Linear`).

The 4-bit formats have 32-weight groups with one scale and offset each, so they map exactly onto the
int4 kernel's `(q - 8) * scale + zero` (scales then held in bf16, torch's kernel dtype):
- Q4_0: w = d * (q - 8)                      -> scale d, zero 0
- Q4_1: w = d * q + m                        -> scale d, zero m + 8d
- Q4_K: w = d*sc * q - dmin*m (8 groups/256) -> scale d*sc, zero 8*d*sc - dmin*m
- Q8_0: w = d * q8, q8 in -128..127          -> Int8Linear, block scales d in fp32 (exact)
- Q6_K: w = d*sc * (q6 - 32) (16 groups/256) -> Int8Linear with groups of 16, scales d*sc (exact)
Other types (F32, F16, Q5_*, ...) are left to the float loader.
"""

from __future__ import annotations

import numpy as np
import torch

from .int4 import BLOCK_N, pack_int4
from .linear import Int4Linear, Int8Linear, _sz

Plane = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # q uint8 [N, K], scale, zero float32 [N, K/g]


def _f16(b: np.ndarray) -> torch.Tensor:
    """[..., 2] uint8 -> float32 [...] read as little-endian fp16."""
    return torch.from_numpy(np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32))


def _nibbles(qs: np.ndarray) -> torch.Tensor:
    """[..., 16] bytes -> [..., 32] values: low nibbles are weights 0..15, high nibbles 16..31."""
    t = torch.from_numpy(np.ascontiguousarray(qs))
    return torch.cat([t & 15, t >> 4], -1)


def _q4_0(blocks: np.ndarray) -> Plane:
    n, nb, _ = blocks.shape
    d = _f16(blocks[..., 0:2])
    return _nibbles(blocks[..., 2:18]).view(n, nb * 32), d, torch.zeros_like(d)


def _q4_1(blocks: np.ndarray) -> Plane:
    n, nb, _ = blocks.shape
    d, m = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])
    return _nibbles(blocks[..., 4:20]).view(n, nb * 32), d, m + 8 * d


def _q4_k(blocks: np.ndarray) -> Plane:
    n, nb, _ = blocks.shape
    d, dmin = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])
    s = torch.from_numpy(np.ascontiguousarray(blocks[..., 4:16])).to(torch.int32)  # [N, nb, 12]
    # 6-bit scales and mins of the 8 sub-blocks (ggml's get_scale_min_k4)
    sc = torch.cat([s[..., 0:4] & 63, (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)], -1)
    mn = torch.cat([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], -1)
    qs = torch.from_numpy(np.ascontiguousarray(blocks[..., 16:144])).view(n, nb, 4, 32)
    q = torch.stack([qs & 15, qs >> 4], 3).view(n, nb * 256)  # chunk c: 32 low nibbles, then 32 high
    scale = (d[..., None] * sc).view(n, nb * 8)
    zero = (8 * d[..., None] * sc - dmin[..., None] * mn).view(n, nb * 8)
    return q, scale, zero


def _q6_k_int8(blocks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Q6_K blocks [N, nb, 210] -> q int8 [N, nb*256] in -32..31 and scales fp32 [N, nb*16] (ggml's
    dequantize_row_q6_K: ql[128], qh[64], 16 int8 scales, fp16 d; each half of 128 weights takes 64 ql
    bytes and 32 qh bytes, weight 16 t + i has scale t)."""
    n, nb, _ = blocks.shape
    ql = blocks[..., 0:128].reshape(n, nb, 2, 64)
    qh = blocks[..., 128:192].reshape(n, nb, 2, 32)
    lo, hi = ql[..., :32], ql[..., 32:]
    q = np.stack([(lo & 15) | ((qh & 3) << 4), (hi & 15) | (((qh >> 2) & 3) << 4),
                  (lo >> 4) | (((qh >> 4) & 3) << 4), (hi >> 4) | (((qh >> 6) & 3) << 4)], 3)  # [N, nb, 2, 4, 32]
    q = torch.from_numpy(q.reshape(n, nb * 256).astype(np.int8) - 32)
    sc = torch.from_numpy(np.ascontiguousarray(blocks[..., 192:208]).view(np.int8).astype(np.float32))
    return q, (_f16(blocks[..., 208:210])[..., None] * sc).view(n, nb * 16)


_DECODERS = {"Q4_0": (_q4_0, 32, 18), "Q4_1": (_q4_1, 32, 20), "Q4_K": (_q4_k, 256, 144)}  # -> Int4Linear
_INT8 = {"Q8_0": (32, 34), "Q6_K": (256, 210)}  # -> Int8Linear: block size, bytes per block
SUPPORTED_TYPES = (*_DECODERS, *_INT8)


def supports(tensor) -> bool:
    """Whether a GGUF reader tensor is a 2-D weight in a format we keep quantized."""
    return tensor.tensor_type.name in SUPPORTED_TYPES and len(tensor.shape) == 2


def _blocks(tensor, row_order: np.ndarray | None) -> np.ndarray:
    """A reader tensor's raw blocks as uint8 [N, K / block, bytes per block], rows in `row_order`."""
    kind = tensor.tensor_type.name
    block, nbytes = _INT8[kind] if kind in _INT8 else _DECODERS[kind][1:]
    k, n = (int(x) for x in tensor.shape)  # GGUF lists the contiguous (input) dimension first
    raw = np.asarray(tensor.data).reshape(n, k // block, nbytes)
    return raw if row_order is None else raw[row_order]


def plane_from_gguf(tensor, row_order: np.ndarray | None = None) -> Plane:
    """Decode a 4-bit reader tensor's blocks into (q, scale, zero); `row_order` permutes output rows first."""
    return _DECODERS[tensor.tensor_type.name][0](_blocks(tensor, row_order))


def pack_q4_blocks(qs: np.ndarray) -> np.ndarray:
    """Q4_0/Q4_1 nibble bytes [N, nb, 16] (N a multiple of 64) straight into the kernel's packed layout
    [N/64, K, 32] (see int4.py), in numpy passes over the 4-bit data, never widening it to one value
    per byte. In a block, byte i holds weight i (low nibble) and weight i + 16 (high nibble); a packed
    byte holds row 64b + j (low) and row 64b + 32 + j (high) of one column."""
    n, nb, _ = qs.shape
    a = qs.reshape(n // BLOCK_N, 2, 32, nb, 16)
    a0, a1 = a[:, 0], a[:, 1]  # rows 64b + j and 64b + 32 + j: [N/64, 32, nb, 16]
    out = np.empty((n // BLOCK_N, nb, 2, 16, 32), np.uint8)  # column k = 32 * block + 16 * h + i
    out[:, :, 0] = ((a0 & 15) | (a1 << 4)).transpose(0, 2, 3, 1)
    out[:, :, 1] = ((a0 >> 4) | (a1 & 0xF0)).transpose(0, 2, 3, 1)
    return out.reshape(n, nb * 16)


CHUNK_ROWS = 2048  # rows repacked at a time: bounds the temporaries for a large embedding


def quantized_linear_from_gguf(tensor, row_order: np.ndarray | None = None,
                               bias: torch.Tensor | None = None) -> Int4Linear | Int8Linear:
    """An `Int4Linear` holding a 4-bit GGUF tensor's blocks, repacked a chunk of rows at a time into
    preallocated buffers (so loading never holds more than one copy plus a chunk); Q8_0 and Q6_K blocks
    become an `Int8Linear`."""
    kind = tensor.tensor_type.name
    k, n = (int(x) for x in tensor.shape)
    raw = _blocks(tensor, row_order)
    nbytes = raw.shape[-1]
    if kind == "Q6_K":  # a chunk of rows at a time: the 6-bit unpacking widens to several temporaries
        q, scales = torch.empty(n, k, dtype=torch.int8), torch.empty(n, k // 16)
        for start in range(0, n, CHUNK_ROWS):
            q[start:start + CHUNK_ROWS], scales[start:start + CHUNK_ROWS] = _q6_k_int8(raw[start:start + CHUNK_ROWS])
        return Int8Linear(q, scales, bias)
    if kind == "Q8_0":
        q = torch.from_numpy(np.ascontiguousarray(raw[..., 2:34]).view(np.int8).reshape(n, k))
        return Int8Linear(q, _f16(raw[..., 0:2]), bias)
    npad = -(-n // BLOCK_N) * BLOCK_N
    groups = k // 32  # every 4-bit format has 32-weight groups
    packed = torch.empty(npad, k // 2, dtype=torch.uint8)
    scales, zeros = torch.empty(npad, groups), torch.empty(npad, groups)
    for start in range(0, npad, CHUNK_ROWS):
        part = raw[start:start + CHUNK_ROWS]
        if len(part) % BLOCK_N:  # zero rows (scale 0) up to the packed block size
            part = np.concatenate([part, np.zeros((-len(part) % BLOCK_N, *part.shape[1:]), np.uint8)])
        if kind in ("Q4_0", "Q4_1"):  # straight from the nibble bytes, never one value per byte
            d = _f16(part[..., 0:2])
            zero = _f16(part[..., 2:4]) + 8 * d if kind == "Q4_1" else torch.zeros_like(d)
            q = torch.from_numpy(pack_q4_blocks(part[..., nbytes - 16:]))
        else:
            q, d, zero = _DECODERS[kind][0](part)
            q = pack_int4(q)
        end = start + len(part)
        packed[start:end], scales[start:end], zeros[start:end] = q, d, zero
    return Int4Linear(k, n, 32, packed, _sz(scales, zeros), bias)
