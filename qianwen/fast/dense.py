"""`DenseLinear`: an nn.Linear's bf16 or fp32 weight run by kernels.c's `dense_gemm` (fp32 activations,
fp32 accumulation of exact products), so a checkpoint kept in floating point (a Hugging Face folder, an
F16/BF16 GGUF read as bf16) decodes on the same C path as a quantized one: `optimize` swaps it in for
every such projection and for the output layer, and `NativeDecoder` then runs the whole layer stack in
one call. The weight is the Linear's own Parameter (no copy; a tied lm_head still shares the embedding),
and its state_dict names are the Linear's.

Long prompts on bf16 weights (tokens per sequence >= DENSE_PREFILL_TOKENS) and anything needing
gradients run torch's matmul instead, one call per sequence, so a sequence's rows go through the same kernels alone or in a
batch (docs/conventions.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.linear import NativeLinear

# Tokens per sequence from which a call on bf16 weights runs torch's matmul instead of dense_gemm.
# dense_gemm runs at the CPU's fp32 FMA peak from about 4 rows on; torch's bf16 matmul (AVX512-BF16 dot
# products, on bf16 activations) is faster from 8-16 rows. On fp32 weights dense_gemm is as fast as
# torch's at any row count measured (1-128), and far faster on a busy machine, so it runs them all
# (docs/fast-cpu.md).
DENSE_PREFILL_TOKENS = 16
DTYPES = (torch.bfloat16, torch.float32)


class DenseLinear(NativeLinear):
    KERNEL = "dense_gemm"

    @staticmethod
    def takes(weight: torch.Tensor) -> bool:
        """Whether the kernel can run on `weight` as it is: contiguous bf16 or fp32 on the CPU."""
        return weight.dtype in DTYPES and weight.is_contiguous() and weight.device.type == "cpu"

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None = None) -> None:
        super().__init__()
        if not self.takes(weight):
            raise ValueError(f"dense_gemm takes a contiguous bf16 or fp32 CPU weight, not {weight.dtype}")
        self.weight, self.bias = weight, bias
        self.out_features, self.in_features = weight.shape

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> DenseLinear | None:
        """The kernel's layer over `linear`'s own weight, or None if the kernel cannot take it."""
        return cls(linear.weight, linear.bias) if cls.takes(linear.weight) else None

    def kernel_args(self) -> tuple:
        return (self.weight.data_ptr(), int(self.weight.dtype == torch.bfloat16), self.out_features, self.bias_ptr())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        training = x.requires_grad or (torch.is_grad_enabled() and self.weight.requires_grad)
        if not training and not self.prefill(x):
            y = self.native_forward(x)
            if y is not None:
                return y
        if x.dim() == 3 and not training:  # one matmul per sequence: rows never mix across the batch
            return torch.stack([F.linear(x[b], self.weight, self.bias) for b in range(x.shape[0])])
        return F.linear(x, self.weight, self.bias)

    def prefill(self, x: torch.Tensor) -> bool:
        """Whether torch's matmul takes this call (many tokens per sequence on bf16 weights)."""
        return self.weight.dtype == torch.bfloat16 and x.dim() == 3 and x.shape[1] >= DENSE_PREFILL_TOKENS

    def torch_f32(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.float())  # only without the kernels

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        return self.weight[idx].float()

    def weight_bytes(self) -> int:
        return self.weight.nbytes

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"dtype={self.weight.dtype}, bias={self.bias is not None}")
