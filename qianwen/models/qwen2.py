"""Qwen2 / Qwen2.5: the Llama decoder with a bias on the q, k, v projections."""

from __future__ import annotations

from dataclasses import dataclass

from ..chat.template import QWEN25_SYSTEM
from ..config import ModelConfig
from .layers import Transformer
from .registry import Architecture, register


@dataclass
class Config(ModelConfig):
    model_type = "qwen2"
    HF_CLASS = "Qwen2ForCausalLM"
    attention_bias: bool = True  # always, whatever config.json says


class Model(Transformer):
    pass


ARCH = register(Architecture(Config, Model, gguf_arch="qwen2", tool_system=QWEN25_SYSTEM))
