"""One process or many: the same code runs alone or under `torchrun` (one node or several).

Under torchrun (WORLD_SIZE set) the process group is NCCL on GPUs and gloo on CPU, and the model is
sharded with FSDP2 (`fully_shard` on each decoder layer, then on the whole model): parameters,
gradients and optimizer state are split across ranks. Resumable checkpoints use
`torch.distributed.checkpoint`, which stores global tensor shapes, so a run saved with N processes
resumes with M. No collective code of our own beyond a few all-reduces of scalars.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized: bool = False  # a process group exists (torchrun), so the model is sharded

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.initialized:
            dist.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        if not self.initialized:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


def init(device: str | None = None) -> Dist:
    """Join the torchrun process group if there is one; pick this rank's device."""
    want = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) < 1:
        dev = torch.device("cuda", 0) if want == "cuda" else torch.device(want)
        return Dist(device=dev)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    if want == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device(want)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(minutes=30),
                                device_id=dev if dev.type == "cuda" else None)
    return Dist(rank, world, local, dev, True)


def shutdown(d: Dist) -> None:
    if d.initialized and dist.is_initialized():
        dist.destroy_process_group()


def shard(net: nn.Module, d: Dist) -> nn.Module:
    """FSDP2: shard each decoder layer (each gathers its weights only while it runs), then the rest."""
    if not d.initialized:
        return net
    from torch.distributed.fsdp import fully_shard

    layers = _find_layers(net)
    for layer in layers:
        fully_shard(layer)
    fully_shard(net)
    return net


def _find_layers(net: nn.Module) -> list[nn.Module]:
    for name, mod in net.named_modules():
        if name.endswith("model.layers") and isinstance(mod, nn.ModuleList):
            return list(mod)
    raise ValueError("model has no model.layers to shard")


# -- resumable checkpoints (torch.distributed.checkpoint) ---------------------------------------

def _options(trainable_only: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # frozen parameters (a LoRA run's base) are neither saved nor expected back
    return StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)


def _model_state(net: nn.Module, optim: torch.optim.Optimizer, trainable_only: bool):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(net, optim, options=_options(trainable_only))
    if trainable_only:  # a frozen weight tied to another (lm_head = embed_tokens) slips through
        frozen = {n for n, p in net.named_parameters(remove_duplicate=False) if not p.requires_grad}
        msd = {k: v for k, v in msd.items() if k not in frozen}
    return msd, osd


def save_checkpoint(folder: Path, net: nn.Module, optim: torch.optim.Optimizer, state: dict[str, Any],
                    d: Dist, trainable_only: bool = False) -> None:
    """Every rank writes its shards into a temporary folder; rank 0 adds trainer_state.json and renames
    it into place, so a folder named step-N is always complete. `trainable_only`: leave out frozen
    parameters (the optimizer state covers the trainable ones only anyway)."""
    import torch.distributed.checkpoint as dcp

    tmp = folder.with_name(f".tmp-{folder.name}")
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    d.barrier()
    msd, osd = _model_state(net, optim, trainable_only)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
    d.barrier()
    if d.main:
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    d.barrier()


def load_checkpoint(folder: Path, net: nn.Module, optim: torch.optim.Optimizer,
                    trainable_only: bool = False) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    opts = _options(trainable_only)
    msd, osd = _model_state(net, optim, trainable_only)
    sd = {"model": msd, "optim": osd}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(sd, checkpoint_id=str(folder))
    set_state_dict(net, optim, model_state_dict=sd["model"], optim_state_dict=sd["optim"], options=opts)
    return json.loads((folder / "trainer_state.json").read_text())


def latest_checkpoint(root: Path) -> Path | None:
    done = [p for p in root.glob("step-*") if (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1])) if done else None


def prune_checkpoints(root: Path, keep: int) -> None:
    done = sorted((p for p in root.glob("step-*") if (p / "trainer_state.json").is_file()),
                  key=lambda p: int(p.name.split("-")[1]))
    for p in done[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)


def full_state_dict(net: nn.Module, d: Dist, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The whole model's tensors (or its trainable parameters only) on rank 0's CPU (a collective:
    every rank must call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not d.initialized:
        keep = {n for n, p in net.named_parameters() if p.requires_grad} if trainable_only else None
        return {k: v.detach().cpu() for k, v in net.state_dict().items() if keep is None or k in keep}
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    sd = get_model_state_dict(net, options=opts)
    if trainable_only:
        keep = {n for n, p in net.named_parameters(remove_duplicate=False) if p.requires_grad}
        sd = {k: v for k, v in sd.items() if k in keep}
    return sd
