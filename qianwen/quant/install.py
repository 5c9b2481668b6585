"""Put quantized layers into a model built on the meta device (before its other weights are filled), keeping
the HF module names."""

from __future__ import annotations

import torch
from torch import nn

from .linear import Int4Linear, Int8Linear, QuantEmbedding


def install(net: nn.Module, kept: dict[str, Int4Linear | Int8Linear], config, dtype: torch.dtype) -> nn.Module:
    """kept: `NAME.weight` -> quantized layer. A tied embedding shares the lm_head's quantized storage; a
    replaced projection keeps its bias parameter (filled with the other weights next)."""
    for name, lin in kept.items():
        path = name.removesuffix(".weight")
        parent_name, _, attr = path.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        old = getattr(parent, attr)
        if attr == "embed_tokens":
            parent.embed_tokens = QuantEmbedding(lin, dtype)
            if config.tie_word_embeddings:
                net.lm_head = lin
            continue
        if getattr(old, "bias", None) is not None and lin.bias is None:
            lin.bias = nn.Parameter(old.bias.detach(), requires_grad=False)
        setattr(parent, attr, lin)
    return net
