"""One module per `model_type` (`models/<model_type>.py`), each registering its `Architecture`
(registry.py); every module here that is not a shared part is imported and registers itself."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from ..config import ModelConfig, shown
from ..errors import ModelLoadError
from .layers import Transformer
from .registry import REGISTRY, Architecture

SHARED_PARTS = frozenset({"cache", "layers", "registry", "rope"})  # modules that are no architecture

for _m in pkgutil.iter_modules(__path__):
    if _m.name not in SHARED_PARTS:
        importlib.import_module(f"{__name__}.{_m.name}")

SUPPORTED_MODEL_TYPES = tuple(sorted(REGISTRY))
_BY_NAME = {alias: arch for arch in REGISTRY.values() for alias in (arch.model_type, *arch.aliases)}
_BY_GGUF = {arch.gguf_arch: arch for arch in REGISTRY.values() if arch.gguf_arch}


def architecture(model_type: str) -> Architecture:
    """The architecture of a config.json `model_type` (or one of its aliases), else one clear error."""
    if (arch := _BY_NAME.get(model_type)) is None:
        raise ModelLoadError(f"unknown model_type '{model_type}'; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return arch


def gguf_architecture(name: Any) -> Architecture:
    """The architecture of a GGUF file's `general.architecture`."""
    if not isinstance(name, str) or name not in _BY_GGUF:
        raise ModelLoadError(f"unsupported GGUF architecture {name!r:.40}; supported: {', '.join(_BY_GGUF)}")
    return _BY_GGUF[name]


def read_config(d: Any) -> ModelConfig:
    """The ModelConfig of config.json's contents, every value read checked for its type and range."""
    if not isinstance(d, dict):
        raise ModelLoadError(f"config.json holds {type(d).__name__} {shown(d)}, not a JSON object")
    model_type = d.get("model_type")
    if model_type is None:
        raise ModelLoadError("config.json has no 'model_type'")
    if not isinstance(model_type, str):
        raise ModelLoadError(f"config.json 'model_type' is {shown(model_type)}; expected a string")
    arch = architecture(model_type)
    if not isinstance(d.get("quantization_config") or {}, dict):
        raise ModelLoadError(f"config.json 'quantization_config' is {shown(d['quantization_config'])}; "
                             "expected an object")
    return arch.config.from_hf(d).check("config.json")


def get_model_class(model_type: str) -> type[Transformer]:
    return architecture(model_type).model


def build_model(config: ModelConfig) -> Transformer:
    return get_model_class(config.model_type)(config)


__all__ = ["SUPPORTED_MODEL_TYPES", "Architecture", "Transformer", "architecture", "build_model",
           "get_model_class", "gguf_architecture", "read_config"]
