"""Linear layers whose weights stay quantized in memory: run by qianwen's C kernels (qianwen/fast,
fp32 activations) where they are built, else by torch's CPU weight-only kernels (bf16 activations).

- `Int4Linear`: group-wise int4 in the layout of torch's `_weight_int4pack_mm_for_cpu` (groups
  32/64/128/256).
- `Int8Linear`: int8 with a scale per row and block (GGUF Q8_0, Q6_K) or per row (`_weight_int8pack_mm`).
- `QuantEmbedding`: row lookup that dequantizes only the rows asked for, sharing a quantized linear's
  storage (a tied lm_head and embedding are held once).

Outputs come back in the input's dtype. Every output row is computed on its own, so a row's result does
not depend on the batch size.

Prefill: the weight-only kernels cost about linearly in rows (they unpack the weights per few rows),
so a call with many tokens per sequence (`x` [B, T, K] with T >= PREFILL_TOKENS) instead dequantizes
the weight to bf16 once, on the fly (no second copy is kept), and runs a bf16 matmul per sequence.
The choice depends on tokens per sequence only, never on the batch size, so a sequence's rows go
through the same kernels alone or in a batch.
"""

from __future__ import annotations

import torch
from torch import nn

from .int4 import BLOCK_N, dequantize_packed_t, pack_int4, pad_rows, quantize_int4, unpack_int4_rows

# Tokens per sequence from which a call dequantizes the weight for a bf16 matmul instead of running
# the weight-only kernel. Measured crossover on the 2-core dev machine (SmolLM2 layers): about 80 rows
# with our C kernels (qianwen/native/kernels.c), 48-64 with torch's int4 kernel.
PREFILL_TOKENS = 80
HEAD_BLOCK = 4096  # output rows dequantized at a time for a float32 head over many rows
# Rows per C kernel call: past about 1,000 rows a call runs slower (the 2-core dev machine, dense_gemm on
# fp32 SmolLM2 layers: 101 GFLOPS at 512 rows, 74 at 2,048; 93 as four calls of 512).
NATIVE_ROWS = 512


def is_prefill(x: torch.Tensor) -> bool:
    return x.dim() == 3 and x.shape[1] >= PREFILL_TOKENS


def prefill_matmul(x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [B, T, K] @ wt [K, N] (bf16), one matmul per sequence so rows never mix across the batch."""
    x2 = x.to(torch.bfloat16)
    y = torch.stack([x2[b] @ wt for b in range(x2.shape[0])]).to(x.dtype)
    return y if bias is None else y + bias.to(x.dtype)


def _sz(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """[N, G] scale and zero -> the kernel's [G, N, 2] bf16 tensor (rows padded to the packed size)."""
    return pad_rows(torch.stack([scale, zero], -1).to(torch.bfloat16)).transpose(0, 1).contiguous()


class NativeLinear(nn.Module):
    """What the int4 and int8 layers share: their C kernel (qianwen/native/kernels.c), named by `KERNEL`
    and fed by `kernel_args()` (the weight's arguments after x, M, K)."""

    KERNEL = ""
    in_features: int
    out_features: int
    bias: nn.Parameter | None

    def bias_ptr(self) -> int | None:
        if self.bias is None:
            return None
        if getattr(self, "_bias32", None) is None:
            self._bias32 = self.bias.detach().float().contiguous()
        return self._bias32.data_ptr()

    def kernel_args(self) -> tuple:
        raise NotImplementedError

    def native_matmul(self, x: torch.Tensor, out: torch.Tensor, accumulate: bool = False) -> bool:
        """out (+)= self(x) for fp32 x [M, K] and out [M, N] (rows may be apart, e.g. a column slice of
        a wider buffer) on the CPU, through the C kernel; False when the kernels are not built."""
        # here, not at the top: qianwen.fast imports this module
        from ..native import kernel_threads, lib

        so = lib()
        if so is None or x.device.type != "cpu":
            return False
        assert x.is_contiguous() and out.stride(1) == 1 and x.dtype == out.dtype == torch.float32
        kernel_threads()  # this thread's OpenMP count: torch's setting, fewer while cores are busy
        getattr(so, self.KERNEL)(x.data_ptr(), x.shape[0], self.in_features, *self.kernel_args(), out.data_ptr(),
                                 out.stride(0), int(accumulate))
        return True

    def forward_f32(self, x: torch.Tensor) -> torch.Tensor:
        """float32 x [..., K] -> float32 [..., N], accumulated and returned in float32 (never rounded to
        bf16): the output layer's logits. Each row is computed on its own, except that a call with many
        tokens per sequence (`is_prefill`: the logits of whole prompts) runs float32 matmuls, one per
        sequence, on blocks of the weight dequantized on the fly (faster there)."""
        if is_prefill(x):
            y = x.new_empty(*x.shape[:-1], self.out_features)
            for start in range(0, self.out_features, HEAD_BLOCK):
                idx = torch.arange(start, min(start + HEAD_BLOCK, self.out_features), device=x.device)
                wt = self.rows(idx).T
                for b in range(x.shape[0]):
                    y[b, :, start:start + wt.shape[1]] = x[b] @ wt
        elif (y := self.native_forward(x)) is not None:
            return y  # the C kernel, bias included
        else:  # torch's weight-only kernels with float32 activations (slower; only without the C kernels)
            y = self.torch_f32(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.float()

    def torch_f32(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def native_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The layer's output through the C kernel (fp32 inside, x's dtype out), or None without it.
        At most NATIVE_ROWS rows a call (each row is computed on its own, so the result is the same)."""
        x32 = x.reshape(-1, self.in_features).float().contiguous()
        y32 = x32.new_empty(x32.shape[0], self.out_features)
        for r in range(0, x32.shape[0] or 1, NATIVE_ROWS):
            if not self.native_matmul(x32[r:r + NATIVE_ROWS], y32[r:r + NATIVE_ROWS]):
                return None
        return y32.to(x.dtype).view(*x.shape[:-1], self.out_features)


class Int4Linear(NativeLinear):
    KERNEL = "q4_gemm"

    def __init__(self, in_features: int, out_features: int, group_size: int,
                 packed: torch.Tensor, scales_zeros: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("packed", packed, persistent=False)  # [Npad, K/2] uint8
        self.register_buffer("scales_zeros", scales_zeros, persistent=False)  # [K/g, Npad, 2] bf16
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_q(cls, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
               bias: torch.Tensor | None = None) -> Int4Linear:
        """q uint8 [N, K] in 0..15, scale and zero [N, K/g]."""
        n, k = q.shape
        return cls(k, n, group_size, pack_int4(pad_rows(q)), _sz(scale, zero), bias)

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int) -> Int4Linear:
        q, scale, zero = quantize_int4(linear.weight.detach(), group_size)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls.from_q(q, scale, zero, group_size, bias)

    def kernel_args(self) -> tuple:
        return (self.packed.data_ptr(), self.scales_zeros.data_ptr(), self.group_size, self.out_features,
                self.packed.shape[0], self.bias_ptr())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if is_prefill(x):
            return prefill_matmul(x, self.dequantize_t(), self.bias)
        y = self.native_forward(x)
        if y is not None:
            return y
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()  # the kernels need it
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_zeros)
        if y.shape[-1] != self.out_features:
            y = y[:, : self.out_features]
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def torch_f32(self, x: torch.Tensor) -> torch.Tensor:
        sz = self.scales_zeros.float()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, sz)
        return y[:, : self.out_features]

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Dequantized weight rows [len(idx), K] in float32, by the kernel's formula."""
        g_of_k = torch.arange(self.in_features, device=idx.device) // self.group_size
        q = unpack_int4_rows(self.packed, idx, self.in_features).float()
        sz = self.scales_zeros[:, idx].float()  # [G, R, 2]
        return (q - 8) * sz[g_of_k, :, 0].T + sz[g_of_k, :, 1].T

    def dequantize(self) -> torch.Tensor:
        return self.rows(torch.arange(self.out_features))

    def dequantize_t(self) -> torch.Tensor:
        """The transposed weight [K, N] in bf16, made on the fly for prefill."""
        return dequantize_packed_t(self.packed, self.scales_zeros, self.group_size)[:, : self.out_features]

    def weight_bytes(self) -> int:
        return self.packed.nbytes + self.scales_zeros.nbytes

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


class Int8Linear(NativeLinear):
    """Symmetric int8 with a scale per output row and group of `group_size` inputs:
    w[n, k] = q[n, k] * scales[n, k // group_size]. Per channel (group_size = K) from `qianwen quantize
    --bits 8`; blocks of 32 from GGUF Q8_0 and 16 from Q6_K (exact: block scales are held in fp32)."""

    KERNEL = "q8_gemm"

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        scales = scales.reshape(self.out_features, -1)
        self.group_size = self.in_features // scales.shape[1]
        qweight = qweight.to(torch.int8)
        if not qweight.is_contiguous() or qweight.data_ptr() % 64:  # torch's int8 kernel crashes on unaligned
            qweight = qweight.clone(memory_format=torch.contiguous_format)  # data (safetensors offsets)
        self.register_buffer("qweight", qweight, persistent=False)
        self.register_buffer("scales", scales.float().contiguous(), persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @staticmethod
    def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = w.float()
        scales = (w.abs().amax(1) / 127).clamp(min=1e-8).bfloat16().float()
        q = (w / scales[:, None]).round().clamp(-128, 127).to(torch.int8)
        return q, scales

    @classmethod
    def from_float(cls, linear: nn.Linear) -> Int8Linear:
        q, scales = cls.quantize(linear.weight.detach())
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(q, scales, bias)

    def kernel_args(self) -> tuple:
        return (self.qweight.data_ptr(), self.scales.data_ptr(), self.group_size, self.out_features, self.bias_ptr())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if is_prefill(x):
            return prefill_matmul(x, self.dequantize().T.to(torch.bfloat16), self.bias)
        y = self.native_forward(x)
        if y is not None:
            return y
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()  # the torch kernels want bf16
        if self.group_size == self.in_features:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scales[:, 0].to(torch.bfloat16))
        else:  # block scales have no torch kernel: dequantize (only without the C kernels)
            y = x2 @ self.dequantize().T.to(torch.bfloat16)
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def torch_f32(self, x: torch.Tensor) -> torch.Tensor:
        if self.group_size == self.in_features:
            return torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scales[:, 0])
        return x @ self.dequantize().T  # block scales have no torch kernel

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        q = self.qweight[idx].float().view(len(idx), -1, self.group_size)
        return (q * self.scales[idx][..., None]).view(len(idx), self.in_features)

    def dequantize(self) -> torch.Tensor:
        return self.rows(torch.arange(self.out_features))

    def weight_bytes(self) -> int:
        return self.qweight.nbytes + self.scales.nbytes

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


class QuantEmbedding(nn.Module):
    """An embedding read from a quantized linear's rows (dequantized per lookup)."""

    def __init__(self, source: Int4Linear | Int8Linear, dtype: torch.dtype):
        super().__init__()
        self.source = source
        self.num_embeddings, self.embedding_dim = source.out_features, source.in_features
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        return self.source.rows(flat).to(self.dtype).view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, dtype={self.dtype}"


def fuse_linears(mods: list[nn.Module]) -> nn.Module | None:
    """One layer computing the concatenated outputs of `mods` (same input), or None if they can't fuse."""
    if all(type(m) is nn.Linear for m in mods):
        fused = nn.Linear(mods[0].in_features, sum(m.out_features for m in mods),
                          bias=mods[0].bias is not None, device=mods[0].weight.device, dtype=mods[0].weight.dtype)
        if any((m.bias is None) != (fused.bias is None) for m in mods):
            return None
        with torch.no_grad():
            fused.weight.copy_(torch.cat([m.weight for m in mods]))
            if fused.bias is not None:
                fused.bias.copy_(torch.cat([m.bias for m in mods]))
        fused.weight.requires_grad_(False)
        return fused
    if all(isinstance(m, Int4Linear) for m in mods):
        a = mods[0]
        if any(m.group_size != a.group_size or m.out_features % BLOCK_N or (m.bias is None) != (a.bias is None) for m in mods):
            return None
        bias = None if a.bias is None else torch.cat([m.bias.data for m in mods])
        return Int4Linear(a.in_features, sum(m.out_features for m in mods), a.group_size,
                          torch.cat([m.packed for m in mods]), torch.cat([m.scales_zeros for m in mods], 1), bias)
    if all(isinstance(m, Int8Linear) for m in mods):
        if any((m.bias is None) != (mods[0].bias is None) or m.group_size != mods[0].group_size for m in mods):
            return None
        bias = None if mods[0].bias is None else torch.cat([m.bias.data for m in mods])
        return Int8Linear(torch.cat([m.qweight for m in mods]), torch.cat([m.scales for m in mods]), bias)
    return None

