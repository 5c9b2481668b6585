"""Llama-family checkpoints (Llama 2/3, SmolLM2, Mistral without sliding window)."""

from .layers import Transformer


class Model(Transformer):
    pass
