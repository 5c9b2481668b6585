"""Qwen3: per-head RMSNorm on queries and keys before rotary (`q_norm`, `k_norm`; set in ModelConfig)."""

from .layers import Transformer


class Model(Transformer):
    pass
