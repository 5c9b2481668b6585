"""`qianwen merge`: fold a LoRA adapter into its base model and export a standalone checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def merge(base: str, adapter: str | os.PathLike, out: str | os.PathLike, dtype: str = "float32") -> Path:
    from ..api import load
    from ..loading.export import export_hf
    from .lora import merged_state
    from .sft import base_config

    model = load(base, dtype="float32", device="cpu", fast=False)
    state = {k: v for k, v in model.net.state_dict().items() if not k.endswith("rotary_emb.inv_freq")}
    merged = merged_state(state, adapter)
    return export_hf(out, base_config(model), merged, model.tokenizer, getattr(torch, dtype),
                     model.generation_config, copy_from=model.path if Path(model.path).is_dir() else None)
