"""Qianwen: Qwen-family language models in PyTorch.

`import qianwen` is light (no torch): `load` and `Model` import the runtime on first use, so the CLI's
commands that need no model (`--help`, `list`, usage errors) start at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .api import Model


def load(model=None, dtype=None, device=None, quantized=None, fast=True) -> Model:
    """Load a model: a Hugging Face folder, a .gguf file, a name (`qianwen list`, a hub id), or None for the
    default model. `quantized` keeps GGUF block weights quantized (default: on for bfloat16 on the CPU).
    `fast=False` keeps the checkpoint's modules as stored (no fast path: see `qianwen.api.load`)."""
    from .api import load as _load

    return _load(model, dtype=dtype, device=device, quantized=quantized, fast=fast)


def __getattr__(name: str) -> Any:
    if name == "Model":
        from .api import Model

        return Model
    raise AttributeError(f"module 'qianwen' has no attribute '{name}'")


__all__ = ["__version__", "load", "Model"]
