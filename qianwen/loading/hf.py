"""Load a Hugging Face folder: config.json, one or sharded *.safetensors, generation_config.json,
tokenizer files and the chat template."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from ..config import ModelConfig
from ..errors import ModelLoadError
from ..models import Transformer, get_model_class
from .weights import materialize


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from None


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(read_json(index).get("weight_map", {}).values()))
        files = [folder / n for n in names]
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
    cfg = folder / "tokenizer_config.json"
    if cfg.exists():
        tpl = read_json(cfg).get("chat_template")
        if isinstance(tpl, list):  # named templates: take "default"
            tpl = next((t["template"] for t in tpl if t.get("name") == "default"), tpl[0]["template"] if tpl else None)
        if tpl:
            return tpl
    cj = folder / "chat_template.json"
    if cj.exists():
        return read_json(cj).get("chat_template")
    return None


def read_generation_config(folder: Path) -> dict[str, Any]:
    path = folder / "generation_config.json"
    return read_json(path) if path.exists() else {}
