"""Sampling parameters (torch-free, imported eagerly) and the token step and decode loop (torch; import
them from `qianwen.generation.step` / `.generate`, or by name here, which loads them on first use)."""

from typing import Any

from .params import OPTIONS, SamplingParams, check_option, defaults_from_generation_config, make_params

_LAZY = {"TokenStep": "step", "TokenStepper": "step", "stream_tokens": "generate",
         "make_logits_processors": "sampling", "LogitsProcessor": "sampling", "SamplingError": "sampling"}


def __getattr__(name: str) -> Any:  # keeps `import qianwen.generation.params` (the CLI) free of torch
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)


__all__ = ["OPTIONS", "LogitsProcessor", "SamplingError", "SamplingParams", "TokenStep", "TokenStepper",
           "check_option", "defaults_from_generation_config", "make_logits_processors", "make_params",
           "stream_tokens"]
