"""Whole-model conversions into a Hugging Face folder, above loading and quant: `qianwen convert` (float
weights) and `qianwen quantize` (int8/int4 in quant/quantize.py's format). Both read any model qianwen
loads and write through `loading.export.export_hf` (atomically)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .loading import Checkpoint, load_checkpoint
from .loading.export import export_hf
from .quant.quantize import check_bits, quantize_state


def _read(src: str | os.PathLike | None) -> Checkpoint:
    """`src` in float32 on the CPU, parameters under their checkpoint names (no fast path)."""
    return load_checkpoint(src, dtype="float32", device="cpu", quantized=False, fast=False)


def convert(src: str | os.PathLike | None, out: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Path:
    """Write `src` (a GGUF file or any model qianwen loads) as the Hugging Face folder `out`; returns it."""
    m = _read(src)
    return export_hf(out, m.config.to_hf_dict(), m.net.state_dict(), m.tokenizer, dtype=dtype,
                     generation_config=dict(m.generation_config))


def quantize_folder(src: str | os.PathLike | None, out: str | os.PathLike, bits: int,
                    group_size: int | None = None) -> Path:
    """Quantize `src` (any model qianwen loads) into the Hugging Face folder `out`; returns it."""
    check_bits(bits, group_size)
    m = _read(src)
    tensors, qconfig = quantize_state(m.net.state_dict(), bits, group_size, tied=m.config.tie_word_embeddings)
    cfg = {**m.config.to_hf_dict(), "quantization_config": qconfig}
    src_dir = Path(src) if src is not None and Path(src).is_dir() else None
    return export_hf(out, cfg, tensors, m.tokenizer, dtype=torch.bfloat16, generation_config=m.generation_config,
                     copy_from=src_dir)
