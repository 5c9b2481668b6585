"""Group-wise int4 weights in the layout torch's CPU kernel `_weight_int4pack_mm_for_cpu` consumes.

A weight row n, column k is `(q[n, k] - 8) * scale[k // g, n] + zero[k // g, n]` with q in 0..15.
The packed layout (torch 2.13, x86) is [N/64, K, 32] bytes: byte (b, k, j) holds row 64b+j in its
low nibble and row 64b+32+j in its high nibble. We pack it ourselves (vectorised, no int32 copy of
the weight) and read rows back from it for embedding lookups, so a tied embedding and lm_head share
one copy. The kernel wants bf16 activations (fp32 input is 10-30x slower) and computes each output
row independently of the others, so results do not depend on the batch size.
"""

from __future__ import annotations

import torch

GROUP_SIZES = (32, 64, 128, 256)
BLOCK_N = 64  # rows per packed block


def pick_group_size(in_features: int, wanted: int | None = None) -> int:
    """The requested group size if it divides in_features, else the largest supported one that does."""
    if wanted is not None and wanted not in GROUP_SIZES:
        raise ValueError(f"group size must be one of {GROUP_SIZES}, got {wanted}")
    if wanted is not None and in_features % wanted == 0:
        return wanted
    fits = [g for g in GROUP_SIZES if in_features % g == 0 and (wanted is None or g <= wanted)]
    if not fits:
        raise ValueError(f"no int4 group size in {GROUP_SIZES} divides in_features={in_features}")
    return max(fits)


def auto_group_size(w: torch.Tensor, tolerance: float = 1.5) -> int:
    """The largest supported group size dividing w's input size whose quantization error stays within
    `tolerance` times that of the smallest one. Weights that came from 4-bit blocks (a GGUF converted to
    float) sit exactly on a grid of small groups, so a larger group would quantize them twice: this
    keeps their block size; ordinary float weights get a large group (fewer scales)."""
    k = w.shape[1]
    fits = [g for g in GROUP_SIZES if k % g == 0]
    if not fits:
        raise ValueError(f"no int4 group size in {GROUP_SIZES} divides in_features={k}")
    w = w.float()

    def error(g: int) -> float:
        q, scale, zero = quantize_int4(w, g)
        back = (q.float() - 8).view(w.shape[0], -1, g) * scale[..., None] + zero[..., None]
        return float((back.view_as(w) - w).pow(2).mean())

    base = error(fits[0])
    return max(g for g in fits if g == fits[0] or error(g) <= tolerance * base)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[N, K] values 0..15 (N a multiple of 64) -> uint8 [N, K/2] in the CPU kernel's layout."""
    n, k = q.shape
    if n % BLOCK_N or k % 2:
        raise ValueError(f"cannot pack a [{n}, {k}] int4 weight: rows must be a multiple of {BLOCK_N}")
    q = q.to(torch.uint8).view(n // BLOCK_N, 2, 32, k)
    packed = q[:, 0] | (q[:, 1] << 4)  # [N/64, 32, K]
    return packed.transpose(1, 2).contiguous().view(n, k // 2)


def unpack_int4_rows(packed: torch.Tensor, rows: torch.Tensor, in_features: int) -> torch.Tensor:
    """The 0..15 values of the given rows of a packed weight: uint8 [len(rows), K]."""
    blocks = packed.view(-1, in_features, 32)
    j = rows % BLOCK_N
    byte = blocks[rows // BLOCK_N, :, j % 32]  # [R, K]
    return torch.where((j < 32)[:, None], byte & 15, byte >> 4)


def pad_rows(t: torch.Tensor, multiple: int = BLOCK_N, dim: int = 0) -> torch.Tensor:
    extra = (-t.shape[dim]) % multiple
    if not extra:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max group quantization of a float [N, K] weight.

    Returns q uint8 [N, K] (0..15), scale and zero float32 [N, K/g] with
    w ~ (q - 8) * scale + zero (the kernel's formula)."""
    n, k = w.shape
    g = w.float().view(n, k // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    # round scale and zero to the kernel's bf16 first, so q is chosen for the values actually used
    scale = ((hi - lo) / 15).clamp(min=1e-6).bfloat16().float()
    zero = (lo + 8 * scale).bfloat16().float()
    q = ((g - zero[..., None]) / scale[..., None] + 8).round().clamp(0, 15).to(torch.uint8).view(n, k)
    return q, scale, zero


def dequantize_packed_t(packed: torch.Tensor, scales_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """The bf16 weight of one packed plane, transposed: [K, Npad] (so `x @ w` is the layer's matmul).

    Made for prefill in few passes (each a parallel op): the nibbles are converted to bf16 while copied
    into place (the packed [N/64, K, 32] blocks already run along K), then one `q * scale + zero'` with
    zero' = zero - 8 * scale, computed in fp32 and rounded once."""
    npad, half = packed.shape
    k = half * 2
    blocks = packed.view(npad // BLOCK_N, k, 32).transpose(0, 1)  # [K, N/64, 32]
    out = torch.empty(k, npad // BLOCK_N, 2, 32, dtype=torch.bfloat16, device=packed.device)
    out[:, :, 0].copy_(blocks & 15)  # rows 64b + j
    out[:, :, 1].copy_(blocks >> 4)  # rows 64b + 32 + j
    scale, zero = scales_zeros.float().unbind(-1)  # [G, Npad]
    zero = (zero - 8 * scale).to(torch.bfloat16)
    w = out.view(k // group_size, group_size, npad)
    return torch.addcmul(zero[:, None], w, scale.to(torch.bfloat16)[:, None], out=w).view(k, npad)
