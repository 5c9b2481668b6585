"""LoRA through `peft`, on our module names (q_proj ... down_proj), saved in PEFT's layout.

Qwen-7B's finetune.py defaults: r=64, alpha=16, dropout=0.05 on c_attn, c_proj, w1, w2, which are
q/k/v_proj, o_proj, up_proj, gate_proj (and the MLP's c_proj: down_proj) here. An adapter folder holds
adapter_config.json + adapter_model.safetensors with keys `base_model.model.<name>.lora_A.weight`,
so `peft.PeftModel.from_pretrained(Qwen2ForCausalLM, folder)` loads it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import QianwenError
from ..loading.export import swap_in

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PREFIX = "base_model.model."


def lora_config(r: int = 64, alpha: float = 16, dropout: float = 0.05, targets: list[str] | None = None,
                base: str | None = None):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets or DEFAULT_TARGETS),
                      bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base)


def apply_lora(net: nn.Module, config) -> nn.Module:
    """Insert LoRA layers in place; only they stay trainable."""
    from peft import inject_adapter_in_model

    names = {n.rsplit(".", 1)[-1] for n, m in net.named_modules() if isinstance(m, nn.Linear)}
    missing = [t for t in config.target_modules if t not in names]
    if missing:
        raise QianwenError(f"LoRA target '{missing[0]}' is not a linear layer of this model "
                           f"(have: {', '.join(sorted(names))})")
    net = inject_adapter_in_model(config, net)
    for n, p in net.named_parameters():
        p.requires_grad_("lora_" in n)
    return net


def adapter_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT file names for the LoRA tensors of a (full) state dict of a model with an adapter."""
    out = {}
    for k, v in state.items():
        if ".lora_A." in k or ".lora_B." in k:
            out[PREFIX + k.replace(".default.", ".")] = v.detach().cpu().contiguous()
    return out


def save_adapter(folder: str | os.PathLike, config, tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder)
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config.save_pretrained(str(tmp))
    save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    swap_in(tmp, folder)
    return folder


def read_adapter(folder: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path, w_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not cfg_path.is_file() or not w_path.is_file():
        raise QianwenError(f"{folder} is not a LoRA adapter (needs adapter_config.json and adapter_model.safetensors)")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise QianwenError(f"{folder} holds a {cfg.get('peft_type')} adapter; only LoRA is supported")
    return cfg, load_file(str(w_path))


def load_adapter(net: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """`net` with the adapter's LoRA layers inserted and loaded (unmerged), for inference or tests."""
    from peft import LoraConfig

    cfg, tensors = read_adapter(folder)
    config = LoraConfig(**{k: v for k, v in cfg.items() if k in LoraConfig.__dataclass_fields__})
    config.inference_mode = True
    net = apply_lora(net, config)
    state = {k.removeprefix(PREFIX).replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
             for k, v in tensors.items()}
    missing = set(state) - set(net.state_dict())
    if missing:
        raise QianwenError(f"adapter tensor '{sorted(missing)[0]}' does not fit this model")
    net.load_state_dict(state, strict=False)
    return net


def merged_state(base: dict[str, torch.Tensor], folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Base weights with each adapter folded in: W + (alpha / r) * B @ A (alpha / sqrt(r) with rsLoRA)."""
    cfg, tensors = read_adapter(folder)
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    if cfg.get("fan_in_fan_out"):
        raise QianwenError("adapters with fan_in_fan_out are not supported")
    out = dict(base)
    done = 0
    for key, a in tensors.items():
        if ".lora_A." not in key:
            continue
        name = key.removeprefix(PREFIX).split(".lora_A.")[0]
        b = tensors[key.replace(".lora_A.", ".lora_B.")]
        rank = cfg.get("rank_pattern", {}).get(name.rsplit(".", 1)[-1], r)
        scale = float(cfg.get("alpha_pattern", {}).get(name.rsplit(".", 1)[-1], alpha))
        scale = scale / (rank ** 0.5) if cfg.get("use_rslora") else scale / rank
        w = out.get(name + ".weight")
        if w is None:
            raise QianwenError(f"the adapter targets '{name}', which the base model lacks")
        delta = (b.double() @ a.double()) * scale
        out[name + ".weight"] = (w.double() + delta).to(w.dtype)
        done += 1
    if not done:
        raise QianwenError(f"{folder} holds no LoRA weights")
    return out
