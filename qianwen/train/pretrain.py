"""`qianwen train pretrain`: next-token prediction on token shards, from a preset or a config.json.

The corpus (documents separated by `<|endoftext|>`) is cut into windows of seq_len + 1 tokens; each
epoch visits the windows in a permutation drawn from (seed, epoch), so the rows of any step can be
recomputed from the step number alone (exact resume, any number of processes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import QianwenError
from .loop import Row
from .shards import TokenStream


class WindowSource:
    """`tokens` is an array or a memory-mapped TokenStream: only the windows of a step are read."""

    def __init__(self, tokens: np.ndarray | TokenStream, seq_len: int, seed: int = 0,
                 val_tokens: np.ndarray | TokenStream | None = None, eval_windows: int = 64) -> None:
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.n_windows = (len(tokens) - 1) // seq_len
        if self.n_windows < 1:
            raise QianwenError(f"the training data has {len(tokens)} tokens: fewer than one sequence of "
                               f"--seq-len {seq_len} + 1")
        self.val_tokens, self.eval_windows = val_tokens, eval_windows
        self._perm: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n_windows))
        return self._perm[1]

    def _window(self, tokens: np.ndarray | TokenStream, w: int) -> Row:
        chunk = np.asarray(tokens[w * self.seq_len: w * self.seq_len + self.seq_len + 1], dtype=np.int64)
        return Row(chunk[:-1], chunk[1:])

    def rows(self, step: int, n: int) -> list[Row]:
        out = []
        for g in range(step * n, (step + 1) * n):
            epoch, i = divmod(g, self.n_windows)
            out.append(self._window(self.tokens, int(self._order(epoch)[i])))
        return out

    def eval_rows(self) -> list[Row]:
        if self.val_tokens is None:
            return []
        n = min(self.eval_windows, (len(self.val_tokens) - 1) // self.seq_len)
        return [self._window(self.val_tokens, w) for w in range(max(n, 0))]


def init_weights(net: nn.Module, std: float = 0.02) -> None:
    """Qwen2's initialisation (transformers' _init_weights): N(0, 0.02) weights, zero biases, unit norms."""
    for m in net.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, std)


def build_net(config: dict[str, Any], seed: int) -> nn.Module:
    from ..models import build_model, read_config

    torch.manual_seed(seed)
    net = build_model(read_config(config))
    init_weights(net, float(config.get("initializer_range", 0.02)))
    return net


def split_specs(data: str, val_data: str | None) -> tuple[str, str | None]:
    """A folder written by `data prepare` holds train-* and val-*; anything else is taken as given."""
    p = Path(data)
    if p.is_dir() and list(p.glob("train-*.bin")):
        val = val_data or (str(p / "val-*.bin") if list(p.glob("val-*.bin")) else None)
        return str(p / "train-*.bin"), val
    return data, val_data


def run_pretrain(args: Any) -> int:
    from ..loading.export import export_hf
    from . import distributed as ddist
    from .loop import TrainConfig, train
    from .prepare import document_separator, load_any_tokenizer
    from .presets import count_parameters, preset_config
    from .shards import open_tokens

    d = ddist.init(args.device)
    try:
        tok = load_any_tokenizer(args.tokenizer)
        train_spec, val_spec = split_specs(args.data, args.val_data)
        tokens, _ = open_tokens(train_spec, identity=tok.identity)  # memory-mapped, never loaded whole
        val = open_tokens(val_spec, identity=tok.identity)[0] if val_spec else None
        eos = [i for i in (document_separator(tok), tok.special_tokens.get("<|im_end|>")) if i is not None]
        if args.config:
            config = json.loads(Path(args.config).read_text())
        else:
            config = preset_config(args.preset, tok.vocab_size, eos_token_id=eos[0] if len(eos) == 1 else eos)
            if config["max_position_embeddings"] < args.seq_len:
                config["max_position_embeddings"] = args.seq_len
        if config["vocab_size"] < tok.vocab_size:
            raise QianwenError(f"config vocab_size {config['vocab_size']} < tokenizer's {tok.vocab_size}")
        if args.seq_len > config.get("max_position_embeddings", args.seq_len):
            raise QianwenError(f"--seq-len {args.seq_len} exceeds the model's context "
                               f"({config['max_position_embeddings']})")
        net = build_net(config, args.seed).to(d.device)
        net = ddist.shard(net, d)
        if d.main:
            n_tok = len(tokens)
            print(f"model: {count_parameters(config) / 1e6:.2f}M parameters ({args.preset if not args.config else args.config}),"
                  f" data: {n_tok} tokens, {d.world} process(es) on {d.device.type}")
        source = WindowSource(tokens, args.seq_len, args.seed, val)
        c = TrainConfig(out=args.out, max_steps=args.max_steps, global_batch=args.global_batch,
                        micro_batch=args.micro_batch, lr=args.lr, min_lr_ratio=args.min_lr_ratio, warmup=args.warmup,
                        weight_decay=args.weight_decay, grad_clip=args.grad_clip, save_every=args.save_every,
                        eval_every=args.eval_every, keep=args.keep, seed=args.seed, dtype=_train_dtype(args, d),
                        resume=args.resume, progress=not args.no_progress, stop_at=args.stop_at)
        save_dtype = getattr(torch, args.save_dtype)

        def export(state: dict[str, torch.Tensor], step: int) -> None:
            export_hf(Path(args.out) / "model", config, state, tok, save_dtype)

        records = train(net, source, c, d, export, meta={"kind": "pretrain", "data_tokens": len(tokens)})
        if d.main and records:
            last = records[-1]
            tps = [r["tok_s"] for r in records[1:]] or [records[0]["tok_s"]]
            print(f"step {last['step']}: loss {last['loss']:.4f}"
                  + (f", held-out {last['eval_loss']:.4f}" if "eval_loss" in last else "")
                  + f"; {np.median(tps):.0f} tokens/s (median); model -> {Path(args.out) / 'model'}")
    finally:
        ddist.shutdown(d)
    return 0


def _train_dtype(args: Any, d) -> str:
    if args.dtype != "auto":
        return args.dtype
    from ..loading import default_dtype

    return "bfloat16" if default_dtype(d.device) == torch.bfloat16 else "float32"
