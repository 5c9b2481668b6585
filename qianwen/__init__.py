"""Qianwen: Qwen-family language models in PyTorch."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .api import Model


def load(model=None, dtype=None, device=None, quantized=None) -> Model:
    """Load a model: a Hugging Face folder, a .gguf file, a hub id, or None for the default model.
    `quantized` keeps GGUF block weights quantized (default: on for bfloat16 on the CPU)."""
    from .loading import load as _load

    return _load(model, dtype=dtype, device=device, quantized=quantized)


__all__ = ["__version__", "load"]
