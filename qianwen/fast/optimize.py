"""`optimize(net)`: fuse q/k/v and gate/up projections into one matmul each, apply rotary to q and k
in one op, and use the fused RMSNorm kernel. Every output row is still computed on its own, so results
do not depend on the batch (the fused matmul's columns are the separate ones side by side)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.cache import Cache
from ..models.layers import MLP, Attention, RMSNorm
from ..models.rope import apply_rotary
from ..quant.linear import fuse_linears
from . import native
from .decode import NativeDecoder


class FastRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class FusedAttention(Attention):
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


class FusedMLP(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, -1)
        return self.down_proj(F.silu(gate) * up)


def optimize(net: torch.nn.Module) -> torch.nn.Module:
    """Rewrite a loaded model in place for fast inference (idempotent). Returns it."""
    for mod in net.modules():
        if type(mod) is RMSNorm:
            mod.__class__ = FastRMSNorm
        elif type(mod) is Attention:
            fused = fuse_linears([mod.q_proj, mod.k_proj, mod.v_proj])
            if fused is not None:
                mod.qkv_proj = fused
                del mod.q_proj, mod.k_proj, mod.v_proj
                mod.__class__ = FusedAttention
        elif type(mod) is MLP:
            fused = fuse_linears([mod.gate_proj, mod.up_proj])
            if fused is not None:
                mod.gate_up_proj = fused
                del mod.gate_proj, mod.up_proj
                mod.__class__ = FusedMLP
    # the native step computes dense MLPs only: a mixture of experts keeps the model's own forward
    if hasattr(net, "fast_decode") and native.lib() is not None \
            and all(isinstance(layer.mlp, MLP) for layer in net.model.layers):
        net.fast_decode = NativeDecoder(net)
    return net
