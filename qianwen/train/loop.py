"""The training loop shared by pretraining and SFT.

Exactness by construction: the rows of step s are a pure function of (seed, s); the learning rate is
a pure function of s; the RNG is reseeded from (seed, s, global micro-batch index) before each
micro-batch, so dropout draws the same masks however the batch is split across processes; so
resuming from the checkpoint of step s (model + AdamW state) replays the same arithmetic as a run
never interrupted.

The loss of a step is the sum of token losses over the whole global batch divided by its number of
target tokens, whatever the split into processes and micro-batches; each rank backpropagates its
share scaled by the world size because FSDP averages gradients across ranks.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import QianwenError
from . import distributed as ddist

IGNORE = -100


@dataclass
class Row:
    """One training sequence: ids, targets (IGNORE where no loss), optional positions and segment ids
    (packed examples: attention stays within a segment; -1 marks padding)."""
    input_ids: np.ndarray
    labels: np.ndarray
    positions: np.ndarray | None = None
    segments: np.ndarray | None = None


class RowSource(Protocol):
    def rows(self, step: int, n: int) -> list[Row]: ...

    def eval_rows(self) -> list[Row]: ...


@dataclass
class TrainConfig:
    out: str
    max_steps: int = 1000
    global_batch: int = 32
    micro_batch: int = 8
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    save_every: int = 500
    eval_every: int = 0
    keep: int = 2
    seed: int = 0
    dtype: str = "float32"  # autocast dtype for the forward; weights and optimizer stay float32
    resume: bool = False
    progress: bool = True
    stop_at: int | None = None  # stop (with a checkpoint) after this step; the schedule still spans max_steps


def lr_at(step: int, c: TrainConfig) -> float:
    """Linear warmup to `lr`, then cosine down to `lr * min_lr_ratio` at `max_steps`."""
    if c.warmup > 0 and step < c.warmup:
        return c.lr * (step + 1) / c.warmup
    span = max(1, c.max_steps - c.warmup)
    t = min(1.0, (step - c.warmup) / span)
    return c.lr * (c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


class SegmentCache:
    """Block-diagonal causal attention for packed sequences: a token sees earlier tokens of its own
    segment only. Plugs into the model as its cache (see models/cache.py); keeps nothing."""

    def __init__(self, segments: torch.Tensor) -> None:
        self.extra: dict[str, Any] = {}
        t = segments.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=segments.device).tril()
        same = segments[:, :, None] == segments[:, None, :]
        self.mask = (same & causal)[:, None]  # [B, 1, T, T]
        # padding rows would attend to nothing (NaN): let them see themselves
        self.mask |= torch.eye(t, dtype=torch.bool, device=segments.device)

    @property
    def length(self) -> int:
        return 0

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, enable_gqa=q.shape[1] != k.shape[1])


def _collate(rows: list[Row], device: torch.device):
    x = torch.from_numpy(np.stack([r.input_ids for r in rows]).astype(np.int64)).to(device)
    y = torch.from_numpy(np.stack([r.labels for r in rows]).astype(np.int64)).to(device)
    pos = cache = None
    if rows[0].positions is not None:
        pos = torch.from_numpy(np.stack([r.positions for r in rows]).astype(np.int64)).to(device)
    if rows[0].segments is not None:
        cache = SegmentCache(torch.from_numpy(np.stack([r.segments for r in rows]).astype(np.int64)).to(device))
    return x, y, pos, cache


def _autocast(device: torch.device, dtype: str):
    if dtype in ("bfloat16", "bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if dtype in ("float16", "fp16"):
        return torch.autocast(device.type, dtype=torch.float16)
    return torch.autocast(device.type, enabled=False)


def make_optimizer(net: nn.Module, c: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in net.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise QianwenError("the model has no trainable parameters")
    groups = [{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=c.lr, betas=(c.beta1, c.beta2), eps=1e-8)


class Logger:
    """log.jsonl (one JSON object a line, floats in full precision) written by rank 0."""

    def __init__(self, path: Path, main: bool, resume_step: int | None) -> None:
        self.path, self.main = path, main
        if main:
            kept = []
            if resume_step is not None and path.exists():
                for line in path.read_text().splitlines():
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue  # a line cut by a kill
                    if rec.get("step", 0) <= resume_step:
                        kept.append(line)
            path.write_text("".join(k + "\n" for k in kept))

    def write(self, rec: dict[str, Any]) -> None:
        if self.main:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
                f.flush()


def _loss_of(net: nn.Module, rows: list[Row], micro: int, device: torch.device, dtype: str,
             scale: float | None, sync: Callable[[bool], None] | None = None,
             seed: Callable[[int], int] | None = None) -> float:
    """Sum of token losses over `rows`, in micro-batches; backpropagates loss * scale if scale is set.
    `seed(j)` reseeds the RNG before micro-batch j."""
    total = 0.0
    chunks = [rows[i:i + micro] for i in range(0, len(rows), micro)]
    for j, chunk in enumerate(chunks):
        x, y, pos, cache = _collate(chunk, device)
        if sync is not None:
            sync(j == len(chunks) - 1)
        if seed is not None:
            torch.manual_seed(seed(j))
        with _autocast(device, dtype):
            logits = net(x, pos, cache)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="sum")
        if scale is not None:
            (loss * scale).backward()
        total += loss.item()
    return total


def evaluate(net: nn.Module, rows: list[Row], c: TrainConfig, d: ddist.Dist) -> float | None:
    n = len(rows) // d.world * d.world  # equal work on every rank (FSDP forwards are collective)
    if n == 0:
        return None
    mine = rows[d.rank:n:d.world]
    was = net.training
    net.eval()
    with torch.no_grad():
        s = _loss_of(net, mine, c.micro_batch, d.device, c.dtype, None)
    net.train(was)
    count = sum(int((r.labels != IGNORE).sum()) for r in mine)
    s, count = d.all_sum([s, float(count)])
    return s / max(count, 1.0)


def train(net: nn.Module, source: RowSource, c: TrainConfig, d: ddist.Dist,
          export: Callable[[dict[str, torch.Tensor], int], None], meta: dict[str, Any] | None = None,
          state_filter: Callable[[str], bool] | None = None) -> list[dict[str, Any]]:
    """Run (or resume) training; `export(full_state_dict, step)` is called on rank 0 at each save.
    Returns the step records logged by this run."""
    from tqdm import tqdm

    out = Path(c.out)
    ckpt_root = out / "checkpoints"
    if d.main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
    d.barrier()
    per_rank, rem = divmod(c.global_batch, d.world)
    if rem or per_rank % c.micro_batch:
        raise QianwenError(f"--global-batch {c.global_batch} must be a multiple of "
                           f"(processes {d.world}) x (--micro-batch {c.micro_batch})")

    optim = make_optimizer(net, c)
    start = 0
    resumed = None
    if c.resume and (last := ddist.latest_checkpoint(ckpt_root)) is not None:
        frozen = any(not p.requires_grad for p in net.parameters())
        state = ddist.load_checkpoint(last, net, optim, trainable_only=frozen)
        if state.get("global_batch") != c.global_batch or state.get("seed") != c.seed:
            raise QianwenError(f"{last} was trained with --global-batch {state.get('global_batch')} and "
                               f"--seed {state.get('seed')}: resume with the same values")
        start = resumed = int(state["step"])
        if d.main:
            print(f"resuming from {last} (step {start}, saved by {state.get('world', 1)} processes)")
    elif not c.resume and d.main and ddist.latest_checkpoint(ckpt_root) is not None:
        raise QianwenError(f"{out} already holds checkpoints: pass --resume, or choose another --out")
    logger = Logger(out / "log.jsonl", d.main, resumed if resumed is not None else 0)
    if d.main:
        (out / "train_config.json").write_text(json.dumps({**asdict(c), "world": d.world, **(meta or {})}, indent=1))

    sync = None
    if d.initialized and per_rank // c.micro_batch > 1:
        sync = lambda last: net.set_requires_gradient_sync(last)  # reduce-scatter once per step
    params = [p for p in net.parameters() if p.requires_grad]
    eval_rows = source.eval_rows() if c.eval_every else []
    records: list[dict[str, Any]] = []
    bar = tqdm(total=c.max_steps, initial=start, desc="training", disable=not (d.main and c.progress),
               dynamic_ncols=True)
    net.train()
    t_last = time.perf_counter()
    end = min(c.max_steps, c.stop_at or c.max_steps)
    first_micro = d.rank * per_rank // c.micro_batch  # global index of this rank's first micro-batch
    for step in range(start, end):
        lr = lr_at(step, c)
        for g in optim.param_groups:
            g["lr"] = lr
        rows = source.rows(step, c.global_batch)
        count = sum(int((r.labels != IGNORE).sum()) for r in rows)
        if count == 0:
            raise QianwenError(f"step {step + 1}: the batch has no target tokens")
        mine = rows[d.rank * per_rank:(d.rank + 1) * per_rank]
        optim.zero_grad(set_to_none=True)
        def seed(j: int, step: int = step) -> int:
            return (c.seed * 1_000_003 + step) * 4099 + first_micro + j

        local = _loss_of(net, mine, c.micro_batch, d.device, c.dtype, d.world / count, sync, seed)
        norm = torch.nn.utils.clip_grad_norm_(params, c.grad_clip if c.grad_clip > 0 else float("inf"))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        optim.step()
        loss = d.all_sum([local])[0] / count
        if not math.isfinite(loss):
            raise QianwenError(f"step {step + 1}: the loss is {loss}; lower --lr")
        now = time.perf_counter()
        rec = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": float(norm), "tokens": count,
               "tok_s": sum(len(r.input_ids) for r in rows) / max(now - t_last, 1e-9)}
        t_last = now
        if c.eval_every and ((step + 1) % c.eval_every == 0 or step + 1 == c.max_steps):
            ev = evaluate(net, eval_rows, c, d)
            if ev is not None:
                rec["eval_loss"] = ev
            t_last = time.perf_counter()
        logger.write(rec)
        records.append(rec)
        bar.update()
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{rec['tok_s']:.0f}")
        if (step + 1) % c.save_every == 0 or step + 1 == end:
            _save(net, optim, c, d, step + 1, ckpt_root, export, state_filter)
            t_last = time.perf_counter()
    bar.close()
    return records


def _save(net: nn.Module, optim: torch.optim.Optimizer, c: TrainConfig, d: ddist.Dist, step: int, root: Path,
          export: Callable[[dict[str, torch.Tensor], int], None], state_filter: Callable[[str], bool] | None) -> None:
    # with a frozen base (LoRA) only the trainable tensors are saved: the base comes from its own files
    frozen = any(not p.requires_grad for p in net.parameters())
    state = {"step": step, "global_batch": c.global_batch, "seed": c.seed, "world": d.world,
             "trainable_only": frozen}
    ddist.save_checkpoint(root / f"step-{step:07d}", net, optim, state, d, trainable_only=frozen)
    full = ddist.full_state_dict(net, d, trainable_only=frozen)
    if d.main:
        if state_filter is not None:
            full = {k: v for k, v in full.items() if state_filter(k)}
        export(full, step)
        ddist.prune_checkpoints(root, c.keep)
        from .plot import plot_log
        try:
            plot_log(Path(c.out) / "log.jsonl", Path(c.out) / "loss.png")
        except ImportError:
            pass  # matplotlib is optional (the `train` extra)
    d.barrier()
