"""How many weights a model has and how they are held, counting quantized layers (buffers, not
parameters) by their logical size, and shared storage (a tied embedding and lm_head) once."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from .linear import Int4Linear, Int8Linear


@dataclass
class WeightSummary:
    float_params: int  # parameters held in floating point (norms, biases, unquantized layers)
    quantized_weights: int  # logical weights held by quantized layers
    bytes_held: int  # storage of every parameter and buffer, shared storage once
    layers: Counter = field(default_factory=Counter)  # quantized layers by kind

    @property
    def total(self) -> int:
        return self.float_params + self.quantized_weights

    def describe(self) -> str:
        if not self.layers:
            return "not quantized"
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self.layers.items()))
        return f"quantized: {self.quantized_weights / 1e6:.1f}M weights in {kinds} layers"


def _kind(mod: Int4Linear | Int8Linear) -> str:
    if isinstance(mod, Int8Linear):
        return "int8" if mod.group_size == mod.in_features else f"int8 g{mod.group_size}"
    return f"int4 g{mod.group_size}"


def weight_summary(net: nn.Module) -> WeightSummary:
    quantized, layers = 0, Counter()
    for mod in net.modules():  # each module once, even when shared
        if isinstance(mod, (Int4Linear, Int8Linear)):
            quantized += mod.in_features * mod.out_features
            layers[_kind(mod)] += 1
    params = [p for p in {id(p): p for p in net.parameters()}.values() if _real(p)]
    held = {t.data_ptr(): t.nbytes for t in [*params, *net.buffers()] if _real(t)}
    return WeightSummary(sum(p.numel() for p in params), quantized, sum(held.values()), layers)


def _real(t: torch.Tensor) -> bool:
    """False for a stride-0 view (takes no memory)."""
    return t.numel() <= 1 or any(t.stride())
