"""Qwen3: per-head RMSNorm on queries and keys before rotary (`q_norm`, `k_norm`), no q/k/v bias by
default, and thinking (`<think>`) in its chat template."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..chat.template import QWEN25_SYSTEM
from ..config import ModelConfig, read_bool
from .layers import Transformer
from .registry import Architecture, register


@dataclass
class Config(ModelConfig):
    model_type = "qwen3"
    HF_CLASS = "Qwen3ForCausalLM"
    qk_norm: bool = True

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> Config:
        bias = read_bool(d, "attention_bias")
        return super().from_hf(d).replace(attention_bias=bias, o_bias=bias)

    def to_hf_dict(self) -> dict[str, Any]:
        return {**super().to_hf_dict(), "attention_bias": self.attention_bias}


class Model(Transformer):
    pass


ARCH = register(Architecture(Config, Model, gguf_arch="qwen3", tool_system=QWEN25_SYSTEM, reasoning_parser="qwen3"))
