"""`optimize(net)`: fuse q/k/v and gate/up projections into one matmul each, apply rotary to q and k
in one op, use the fused RMSNorm kernel, run bf16/fp32 projections and the output layer on kernels.c's
dense GEMM, and install the C decode step. Every output row is still computed on its own, so results
do not depend on the batch (the fused matmul's columns are the separate ones side by side).

The fast modules are new objects put in their parents' places; they share the original parameters."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import native
from ..models.cache import Cache
from ..models.layers import MLP, Attention, RMSNorm
from ..models.rope import apply_rotary
from ..quant.linear import fuse_linears
from .decode import NativeDecoder
from .dense import DenseLinear


class FastRMSNorm(RMSNorm):
    def __init__(self, norm: RMSNorm) -> None:
        nn.Module.__init__(self)
        self.weight, self.eps = norm.weight, norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class FusedAttention(nn.Module):
    """`Attention` with q, k and v in one projection (`qkv_proj`, their outputs side by side)."""

    def __init__(self, att: Attention, qkv_proj: nn.Module) -> None:
        super().__init__()
        self.layer_idx, self.n_heads, self.n_kv, self.head_dim = att.layer_idx, att.n_heads, att.n_kv, att.head_dim
        self.qkv_proj, self.o_proj = qkv_proj, att.o_proj
        if hasattr(att, "q_norm"):
            self.q_norm, self.k_norm = att.q_norm, att.k_norm

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: Cache,
                q_scale: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        hq, hkv = self.n_heads, self.n_kv
        qkv = self.qkv_proj(x).view(b, t, hq + 2 * hkv, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):  # Qwen3 normalises q and k per head before rotary
            q, k, v = qkv.split([hq, hkv, hkv], 1)
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], 1)
        else:
            qk, v = qkv[:, : hq + hkv], qkv[:, hq + hkv:]
        q, k = apply_rotary(qk, cos, sin).split([hq, hkv], 1)
        if q_scale is not None:
            q = q * q_scale.to(q.dtype)
        out = cache.attend(self.layer_idx, q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, hq * self.head_dim))


class FusedMLP(nn.Module):
    """`MLP` with gate and up in one projection (`gate_up_proj`)."""

    def __init__(self, gate_up_proj: nn.Module, down_proj: nn.Module) -> None:
        super().__init__()
        self.gate_up_proj, self.down_proj = gate_up_proj, down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, -1)
        return self.down_proj(F.silu(gate) * up)


def _fused(mod: nn.Module) -> nn.Module | None:
    if type(mod) is Attention and (qkv := fuse_linears([mod.q_proj, mod.k_proj, mod.v_proj])) is not None:
        return FusedAttention(mod, qkv)
    if type(mod) is MLP and (gate_up := fuse_linears([mod.gate_proj, mod.up_proj])) is not None:
        return FusedMLP(gate_up, mod.down_proj)
    return None


def _leaf(mod: nn.Module, kernels: bool) -> nn.Module | None:
    if type(mod) is RMSNorm:
        return FastRMSNorm(mod)
    if type(mod) is nn.Linear and kernels:
        return DenseLinear.from_linear(mod)
    return None


def _replace(net: nn.Module, make) -> None:
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if (new := make(child)) is not None:
                setattr(parent, name, new)


def optimize(net: torch.nn.Module) -> torch.nn.Module:
    """Rewrite a loaded model in place for fast inference (idempotent). Returns it."""
    kernels = native.lib() is not None
    _replace(net, _fused)  # first: the fused projections are plain Linears until the second pass
    _replace(net, lambda m: _leaf(m, kernels))
    # the native step computes dense MLPs only: a mixture of experts keeps the model's own forward
    dense = all(isinstance(layer.mlp, FusedMLP | MLP) for layer in net.model.layers)
    if hasattr(net, "fast_decode") and kernels and dense:
        net.fast_decode = NativeDecoder(net)
    return net
