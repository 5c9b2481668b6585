"""Qwen2 / Qwen2.5: the Llama decoder with a bias on the q, k, v projections (set in ModelConfig)."""

from .layers import Transformer


class Model(Transformer):
    pass
