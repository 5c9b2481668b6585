"""Qwen3-MoE (`Qwen3MoeForCausalLM`): Qwen3's attention (q/k norms) with a sparse mixture of SwiGLU
experts in place of the MLP on every `decoder_sparse_step`-th layer not listed in `mlp_only_layers`.

A router (`mlp.gate`, a linear map to one logit per expert) picks the top `num_experts_per_tok` experts of
each token by softmax probability; their outputs are summed weighted by those probabilities (renormalised
to sum to 1 with `norm_topk_prob`). Checkpoint names are the hub's: `mlp.gate.weight`,
`mlp.experts.{i}.{gate,up,down}_proj.weight`. Not read from GGUF (llama.cpp stacks the experts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..chat.template import QWEN25_SYSTEM
from ..config import as_int, read_bool, read_int
from ..errors import ModelLoadError
from . import qwen3
from .layers import HEAD_ROWS, MLP, Transformer
from .registry import Architecture, register


@dataclass
class Config(qwen3.Config):
    model_type = "qwen3_moe"
    HF_CLASS = "Qwen3MoeForCausalLM"
    num_experts: int = 0
    num_experts_per_tok: int = 1
    moe_intermediate_size: int = 1
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> Config:
        only = d.get("mlp_only_layers") or []
        if not isinstance(only, list):
            raise ModelLoadError(f"config.json 'mlp_only_layers' is {only!r:.40}; expected a list of layer numbers")
        return super().from_hf(d).replace(
            num_experts=read_int(d, "num_experts", "num_local_experts", lo=0),
            num_experts_per_tok=read_int(d, "num_experts_per_tok"),
            moe_intermediate_size=read_int(d, "moe_intermediate_size"),
            norm_topk_prob=read_bool(d, "norm_topk_prob"),
            decoder_sparse_step=read_int(d, "decoder_sparse_step", default=1),
            mlp_only_layers=tuple(as_int(i, "config.json 'mlp_only_layers' entry", 0) for i in only),
        )

    def check(self, source: str) -> Config:
        if self.num_experts and self.num_experts_per_tok > self.num_experts:
            raise ModelLoadError(f"{source}: {self.num_experts_per_tok} experts per token but only "
                                 f"{self.num_experts} experts")
        return super().check(source)

    def sparse(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` has experts (else a plain MLP), as transformers decides it."""
        return (layer_idx not in self.mlp_only_layers and self.num_experts > 0
                and (layer_idx + 1) % self.decoder_sparse_step == 0)

    def to_hf_dict(self) -> dict[str, Any]:
        return {**super().to_hf_dict(), "num_experts": self.num_experts,
                "num_experts_per_tok": self.num_experts_per_tok, "moe_intermediate_size": self.moe_intermediate_size,
                "norm_topk_prob": self.norm_topk_prob, "decoder_sparse_step": self.decoder_sparse_step,
                "mlp_only_layers": list(self.mlp_only_layers)}


class SparseMoE(nn.Module):
    """x [..., hidden] -> the routing-weighted sum of its top-k experts' outputs."""

    def __init__(self, c: Config) -> None:
        super().__init__()
        self.top_k, self.norm_topk_prob = c.num_experts_per_tok, c.norm_topk_prob
        self.gate = nn.Linear(c.hidden_size, c.num_experts, bias=False)
        self.experts = nn.ModuleList(MLP(c, c.moe_intermediate_size) for _ in range(c.num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # [N, k]
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        # batch invariance: each expert multiplies however many rows chose it, and float32/float16 kernels
        # change path below HEAD_ROWS rows (layers.py); so they get at least that many (bfloat16 needs none)
        pad = HEAD_ROWS if x.dtype != torch.bfloat16 and not torch.is_grad_enabled() else 0
        out = torch.zeros_like(x)
        for e in chosen.unique().tolist():  # ascending: each token sums its experts in index order
            rows, slot = torch.where(chosen == e)
            n = len(rows)
            y = self.experts[e](F.pad(x[rows], (0, 0, 0, pad - n)) if n < pad else x[rows])[:n]
            out.index_add_(0, rows, y * weights[rows, slot, None])
        return out.view(shape)


class Model(Transformer):
    @classmethod
    def mlp(cls, config: Config, layer_idx: int) -> nn.Module:
        return SparseMoE(config) if config.sparse(layer_idx) else MLP(config)


ARCH = register(Architecture(Config, Model, tool_system=QWEN25_SYSTEM, reasoning_parser="qwen3"))
