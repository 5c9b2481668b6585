"""Llama-family checkpoints (Llama 2/3, SmolLM2, Mistral without sliding window)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import ModelConfig, read_bool
from .layers import Transformer
from .registry import Architecture, register


@dataclass
class Config(ModelConfig):
    model_type = "llama"
    HF_CLASS = "LlamaForCausalLM"

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> Config:
        bias = read_bool(d, "attention_bias")
        return super().from_hf(d).replace(attention_bias=bias, o_bias=bias, mlp_bias=read_bool(d, "mlp_bias"))

    def to_hf_dict(self) -> dict[str, Any]:
        return {**super().to_hf_dict(), "attention_bias": self.attention_bias, "mlp_bias": self.mlp_bias}


class Model(Transformer):
    pass


ARCH = register(Architecture(Config, Model, aliases=("mistral", "smollm"), gguf_arch="llama", gguf_permute_qk=True))
