"""One module per `model_type`, found by name (see SUPPORTED_MODEL_TYPES in config.py)."""

from __future__ import annotations

import importlib

from ..config import SUPPORTED_MODEL_TYPES, ModelConfig
from ..errors import ModelLoadError
from .layers import Transformer


def get_model_class(model_type: str) -> type[Transformer]:
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(f"unknown model_type '{model_type}'; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return importlib.import_module(f"qianwen.models.{model_type}").Model


def build_model(config: ModelConfig) -> Transformer:
    return get_model_class(config.model_type)(config)


__all__ = ["Transformer", "build_model", "get_model_class"]
