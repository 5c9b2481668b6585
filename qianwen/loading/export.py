"""Write a model as a Hugging Face folder: config.json, model.safetensors, tokenizer files,
generation_config.json. `qianwen convert`, `qianwen quantize` and training export through it;
`qianwen chat -m FOLDER` and transformers' Qwen2ForCausalLM both load the result.

The folder is written under a temporary name and swapped in with renames, so a reader never sees a
half-written export (at worst, for an instant, no folder).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..paths import share_like_new_file


def export_hf(folder: str | os.PathLike, config: dict[str, Any], state: dict[str, torch.Tensor], tokenizer,
              dtype: torch.dtype = torch.float32, generation_config: dict[str, Any] | None = None,
              copy_from: str | os.PathLike | None = None) -> Path:
    """Write `folder`; `copy_from` (the base model's folder) lends its chat_template.jinja, if any."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {}
    for k, v in state.items():
        if k.endswith("rotary_emb.inv_freq"):
            continue
        if config.get("tie_word_embeddings") and k == "lm_head.weight":
            continue  # tied: transformers and our loader take it from embed_tokens
        v = v.detach().cpu()
        tensors[k] = (v.to(dtype) if v.is_floating_point() else v).contiguous()
    cfg = dict(config)
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = dict(generation_config or {})
    eos = [i for i in (tokenizer.special_tokens.get("<|im_end|>"), tokenizer.special_tokens.get("<|endoftext|>"))
           if i is not None] or ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
    gen.setdefault("eos_token_id", eos)
    if tokenizer.pad_id is not None:
        gen.setdefault("pad_token_id", tokenizer.pad_id)
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    tokenizer.save(tmp)
    if copy_from is not None and (Path(copy_from) / "chat_template.jinja").is_file():
        shutil.copyfile(Path(copy_from) / "chat_template.jinja", tmp / "chat_template.jinja")
    for f in tmp.iterdir():
        share_like_new_file(f)
    swap_in(tmp, folder)
    return folder


def swap_in(tmp: Path, folder: Path) -> None:
    """Replace `folder` by the finished `tmp` folder, never leaving a half-written one in its place."""
    old = folder.with_name(f".old-{folder.name}")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
