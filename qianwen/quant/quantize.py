"""Weight-only quantization (the `quantize` algorithm) and its on-disk format in a Hugging Face folder.
`qianwen/convert.py` writes such a folder, `loading/hf.py` reads it back.

On disk (safetensors, HF names): each quantized projection `P` is stored as
- bits 4: `P.qweight` uint8 [N, K/2] (low nibble = even column), `P.scales` and `P.zeros` bf16 [N, K/g],
  with w = (q - 8) * scale + zero; g is the group size, per layer (K / scales columns);
- bits 8: `P.qweight` int8 [N, K], `P.scales` bf16 [N] (per output channel), w = q * scale;
and config.json carries `"quantization_config": {"quant_method": "qianwen", "bits": B, "group_size": G}`.
Embeddings, norms and a tied lm_head stay in floating point.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from tqdm import tqdm

from ..errors import ModelLoadError, QianwenError
from .int4 import auto_group_size, pick_group_size, quantize_int4
from .linear import Int4Linear, Int8Linear

QUANT_METHOD = "qianwen"


def _quantizable(name: str, tied: bool) -> bool:
    return name.endswith("_proj.weight") or (name == "lm_head.weight" and not tied)


def check_bits(bits: int, group_size: int | None) -> None:
    if bits not in (4, 8):
        raise QianwenError(f"--bits must be 4 or 8, got {bits}")
    if bits == 8 and group_size is not None:
        raise QianwenError("8-bit quantization is per output channel; --group-size applies to 4 bits only")


def quantize_state(state: dict[str, torch.Tensor], bits: int, group_size: int | None = None,
                   tied: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A float state dict (our names) in the on-disk format above: the tensors to save and the config's
    `quantization_config`. Notes the group sizes chosen (4 bits) on stderr."""
    check_bits(bits, group_size)
    tensors: dict[str, torch.Tensor] = {}
    chosen: dict[int, int] = {}
    for name, w in tqdm(state.items(), desc=f"Quantizing to {bits} bits", unit="tensor", disable=None):
        if not _quantizable(name, tied):
            tensors[name] = w
            continue
        mod = name.removesuffix(".weight")
        if bits == 8:
            q, s = Int8Linear.quantize(w)
            tensors[mod + ".qweight"], tensors[mod + ".scales"] = q, s.bfloat16()
            continue
        g = pick_group_size(w.shape[1], group_size) if group_size else auto_group_size(w)
        chosen[g] = chosen.get(g, 0) + 1
        q, s, z = quantize_int4(w, g)
        tensors[mod + ".qweight"] = q[:, 0::2] | (q[:, 1::2] << 4)
        tensors[mod + ".scales"], tensors[mod + ".zeros"] = s.bfloat16(), z.bfloat16()
    used = ", ".join(f"{g} for {n} layers" for g, n in sorted(chosen.items()))
    if bits == 4 and group_size and set(chosen) != {group_size}:
        print(f"note: group size {group_size} does not divide every layer's input size; used {used}", file=sys.stderr)
    elif bits == 4 and not group_size:
        print(f"group size chosen per layer (the largest whose error stays within 1.5x of group 32's): {used}",
              file=sys.stderr)
    return tensors, {"quant_method": QUANT_METHOD, "bits": bits,
                     "group_size": (group_size or max(chosen)) if bits == 4 else None}


def is_quantized_config(raw: dict[str, Any]) -> bool:
    return (raw.get("quantization_config") or {}).get("quant_method") == QUANT_METHOD


def read_quantized_layers(tensors: dict[str, torch.Tensor]) -> dict[str, Int4Linear | Int8Linear]:
    """`P.weight` -> the quantized layer for each projection stored as `P.qweight` (with its scales and zeros)
    in `tensors`, which loses those entries."""
    if not any(k.endswith(".qweight") for k in tensors):
        raise ModelLoadError("config.json has a qianwen quantization_config but no tensor is quantized (.qweight)")
    kept: dict[str, Int4Linear | Int8Linear] = {}
    for name in [k for k in tensors if k.endswith(".qweight")]:
        mod = name.removesuffix(".qweight")
        q, scales = tensors.pop(name), tensors.pop(mod + ".scales")
        if q.dtype == torch.int8:
            kept[mod + ".weight"] = Int8Linear(q, scales)
            continue
        zeros = tensors.pop(mod + ".zeros")
        n, k = q.shape[0], q.shape[1] * 2
        full = torch.stack([q & 15, q >> 4], -1).view(n, k)
        kept[mod + ".weight"] = Int4Linear.from_q(full, scales.float(), zeros.float(), k // scales.shape[1])
    return kept
