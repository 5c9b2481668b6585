"""Load a Hugging Face folder: config.json, one or sharded *.safetensors (float, or quantized by
`qianwen quantize`), generation_config.json, tokenizer files and the chat template."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from ..config import ModelConfig, as_bool, as_float, as_int
from ..errors import ModelLoadError
from ..models import Transformer, get_model_class
from ..quant.quantize import read_quantized_layers
from ..tokenizer.hf_backend import pick_chat_template
from .weights import materialize


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file that holds an object (every file of a checkpoint folder does)."""
    try:
        out = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(out, dict):
        raise ModelLoadError(f"{path} holds {type(out).__name__} {str(out)[:40]!r}, not a JSON object")
    return out


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map \
                or not all(isinstance(v, str) and v.endswith(".safetensors") and Path(v).name == v
                           for v in weight_map.values()):
            raise ModelLoadError(f"{index}: 'weight_map' must map tensor names to .safetensors files in the folder")
        files = [folder / n for n in sorted(set(weight_map.values()))]
        for f in files:
            if not f.exists():
                raise ModelLoadError(f"shard {f.name} listed in {index.name} is missing from {folder}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in {folder}")
    return files


def read_safetensors(files: list[Path], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """All tensors of the given files, cast to `dtype` (None keeps the stored dtype)."""
    out: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for f in files:
            handles.append((f, safe_open(str(f), framework="pt")))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelLoadError(f"{f} is truncated or not a valid safetensors file ({e})") from None
    total = sum(len(list(h.keys())) for _, h in handles)
    with tqdm(total=total, desc="Loading weights", unit="tensor", disable=None, leave=False) as bar:
        for f, h in handles:
            for name in h.keys():
                try:
                    t = h.get_tensor(name)
                except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                    raise ModelLoadError(f"{f} is truncated or corrupt: cannot read tensor '{name}' ({e})") from None
                out[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
                bar.update()
    return out


def load_hf_weights(folder: Path, config: ModelConfig, dtype: torch.dtype, device: torch.device) -> Transformer:
    cls = get_model_class(config.model_type)
    weights = cls.sanitize(read_safetensors(weight_files(folder), dtype))
    return materialize(config, weights, dtype, device)


def read_chat_template(folder: Path) -> str | None:
    """The checkpoint's Jinja chat template: chat_template.jinja or tokenizer_config.json's chat_template."""
    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text(encoding="utf-8")
    for name in ("tokenizer_config.json", "chat_template.json"):
        if (folder / name).exists() and (tpl := read_json(folder / name).get("chat_template")) is not None:
            if (source := pick_chat_template(tpl)) is None:
                raise ModelLoadError(f"{folder / name}: 'chat_template' is neither a string nor a list of "
                                     "named templates")
            if source:
                return source
    return None


# generation_config.json keys we read (see generation.params): a checker each
_GENERATION_KEYS = {
    "do_sample": as_bool,
    "temperature": as_float,
    "top_p": lambda v, what: as_float(v, what, 0.0, 1.0, lo_open=True),
    "top_k": lambda v, what: as_int(v, what, 0),
    "repetition_penalty": lambda v, what: as_float(v, what, lo_open=True),
    "max_new_tokens": lambda v, what: as_int(v, what, 0),
}


def read_generation_config(folder: Path) -> dict[str, Any]:
    path = folder / "generation_config.json"
    if not path.exists():
        return {}
    gen = read_json(path)
    for key, check in _GENERATION_KEYS.items():
        if gen.get(key) is not None:
            check(gen[key], f"{path} '{key}'")
    eos = gen.get("eos_token_id")
    for i in eos if isinstance(eos, list) else [] if eos is None else [eos]:
        as_int(i, f"{path} 'eos_token_id'", 0)
    return gen


def load_quantized_hf_weights(folder: Path, config: ModelConfig, dtype: torch.dtype,
                              device: torch.device) -> Transformer:
    """The model of a folder `qianwen quantize` wrote, its projections kept quantized (quant/quantize.py's format)."""
    if device.type != "cpu":
        raise ModelLoadError("qianwen-quantized folders run on the CPU kernels only")
    tensors = read_safetensors(weight_files(folder), None)
    kept = read_quantized_layers(tensors)
    weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    return materialize(config, weights, dtype, device, kept)
