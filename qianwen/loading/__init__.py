"""From a model argument (folder, .gguf file, name or None) to its parts (`Checkpoint`), one way:
resolve the name (hub.py) -> read the text side with the format's reader (hf.py, gguf.py) -> build the
network on the meta device, put in the quantized layers and fill the rest, through `weights.materialize`'s
checks -> the fast path (qianwen.fast). `qianwen.api` makes a Model of the parts (docs/design.md, "Loading")."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..chat.template import ChatTemplate
from ..config import ModelConfig
from ..errors import ModelLoadError, QianwenError
from ..fast import optimize
from ..models import Transformer, architecture, read_config
from ..native import set_threads
from ..quant.quantize import is_quantized_config
from ..tokenizer import Tokenizer
from .gguf import load_gguf_weights
from .hf import load_hf_weights, load_quantized_hf_weights
from .hub import resolve


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """docs/conventions.md: bfloat16 on GPUs and on CPUs with native bf16, float32 elsewhere."""
    if env := os.environ.get("QIANWEN_DTYPE"):
        return parse_dtype(env)
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()):
        return torch.bfloat16
    return torch.float32


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
    if dtype not in names:
        raise ModelLoadError(f"unknown dtype '{dtype}'; use float32, bfloat16 or float16")
    return names[dtype]


def parse_device(device: str | torch.device) -> torch.device:
    """A device this machine has, or one clear error (checked before anything is read or allocated)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise QianwenError(f"unknown device '{device}'; use cpu or cuda") from None
    if dev.type == "cpu":
        return dev
    backend = getattr(torch, dev.type, None)
    count = backend.device_count() if hasattr(backend, "device_count") and backend.is_available() else 0
    if count == 0:
        raise QianwenError(f"device '{device}' is not available: this machine or PyTorch build has no "
                             f"{dev.type} device; use cpu")
    if dev.index is not None and dev.index >= count:
        raise QianwenError(f"device '{device}' does not exist: {count} {dev.type} device(s) here")
    return dev


@dataclass
class Checkpoint:
    """What `load_checkpoint` reads; `qianwen.api.Model` is built from it."""
    name: str
    path: Path
    config: ModelConfig
    net: Transformer
    tokenizer: Tokenizer
    chat_template: ChatTemplate
    generation_config: dict[str, Any]


def load_checkpoint(model: str | Path | None = None, dtype: str | torch.dtype | None = None,
                    device: str | torch.device | None = None, quantized: bool | None = None,
                    fast: bool = True) -> Checkpoint:
    """A model argument (folder, .gguf file, name or None) to its parts, one way through the steps below.

    `quantized`: keep GGUF Q4_0/Q4_1/Q4_K/Q8_0/Q6_K weights quantized (qianwen.quant, run by the C kernels of
    qianwen.fast); by default on when running bfloat16 on the CPU, off otherwise (the float reference path).
    A folder `qianwen quantize` wrote is always kept quantized. `fast`: apply the fast path (off for
    conversions, which save the parameters under their checkpoint names)."""
    set_threads()  # $QIANWEN_THREADS
    dev = parse_device(device) if device is not None else default_device()
    dt = parse_dtype(dtype) if dtype is not None else default_dtype(dev)
    path = resolve(model)  # 1. hub names and paths -> a file or folder
    with naming(path):
        text = read_text_side(path)  # 2. its format's reader: config, tokenizer, templates, checked
        if "reader" in text:  # GGUF blocks: kept quantized when asked, by default for bfloat16 on the CPU
            keep = quantized if quantized is not None else (dev.type == "cpu" and dt == torch.bfloat16)
        else:  # a folder: quantized when `qianwen quantize` wrote it
            keep = is_quantized_config(text["raw"])
        net = _load_weights({**text, "path": path}, dt, dev, keep)  # 3. skeleton, quantized layers, filled
    if fast and dev.type == "cpu":  # 4. the fast path (qianwen.fast) for every CPU checkpoint: loading's one call to it
        net = optimize(net)
    return Checkpoint(name=str(model) if model else path.name, path=path, net=net, config=text["config"],
                      tokenizer=text["tokenizer"], generation_config=text["generation_config"],
                      chat_template=text["chat_template"])


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


@contextlib.contextmanager
def naming(path: Path) -> Iterator[None]:
    """Every checkpoint error raised inside names the checkpoint."""
    try:
        yield
    except QianwenError as e:
        if str(path) in str(e):
            raise
        raise ModelLoadError(f"{path}: {e}") from None


def read_text_side(path: Path) -> dict[str, Any]:
    """What a checkpoint is without its weights, checked: config, tokenizer (its ids within the embedding
    rows), chat template, generation config; plus what its weight loader reads next (`raw` config.json of a
    folder, the GGUF `reader`). `load_checkpoint` builds on it; the vLLM gateway needs nothing more."""
    if path.is_dir():
        from ..tokenizer import load_tokenizer
        from .hf import read_chat_template, read_generation_config, read_json

        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} has no config.json")
        raw = read_json(path / "config.json")
        config = read_config(raw)
        tokenizer = load_tokenizer(path)
        template, generation_config, extra = read_chat_template(path), read_generation_config(path), {"raw": raw}
    elif path.suffix == ".gguf" or _is_gguf(path):
        from ..tokenizer.gguf_vocab import tokenizer_from_gguf
        from .gguf import check_tensors, config_from_metadata, metadata, open_reader

        reader = open_reader(path)
        meta = metadata(reader)
        config = config_from_metadata(meta, {t.name for t in reader.tensors})
        check_tensors(reader, config)
        tokenizer = tokenizer_from_gguf(reader)
        template, generation_config, extra = meta.get("tokenizer.chat_template"), {}, {"reader": reader}
    else:
        raise ModelLoadError(f"{path} is neither a model folder nor a .gguf file")
    check_vocabulary(tokenizer, config)
    default_system = architecture(config.model_type).default_system if template is None else None
    chat_template = ChatTemplate(template, default_system, _special_strings(tokenizer))  # parsed before the weights
    return dict(config=config, tokenizer=tokenizer, chat_template=chat_template,
                generation_config=generation_config, **extra)


def _load_weights(text: dict[str, Any], dtype: torch.dtype, device: torch.device, quantized: bool) -> Transformer:
    """The network of a checkpoint whose text side `read_text_side` gave, built by `weights.materialize`."""
    if "reader" in text:
        return load_gguf_weights(text["reader"], text["config"], dtype, device, quantized)
    if quantized:  # written by `qianwen quantize`
        return load_quantized_hf_weights(text["path"], text["config"], dtype, device)
    return load_hf_weights(text["path"], text["config"], dtype, device)


def check_vocabulary(tokenizer, config: ModelConfig) -> None:
    """Every id the tokenizer can produce has an embedding row."""
    if tokenizer.vocab_size > config.vocab_size:
        raise ModelLoadError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's embedding has "
                             f"{config.vocab_size} rows (vocab_size)")


def _special_strings(tokenizer) -> dict[str, str]:
    """bos_token / eos_token strings for templates that print them."""
    out = {}
    for key, tid in (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id), ("pad_token", tokenizer.pad_id)):
        if tid is not None:
            out[key] = tokenizer.id_to_token_bytes(tid).decode("utf-8", errors="replace")
    return out
