"""`qianwen train pretrain` and `qianwen train sft`, alone or under `torchrun --nproc-per-node N`."""

from __future__ import annotations

import argparse


def _common(p: argparse.ArgumentParser, lr: float, steps: int, batch: int, micro: int, seq: int) -> None:
    p.add_argument("-o", "--out", required=True, help="run folder: checkpoints/, model/ (or adapter/), log.jsonl, loss.png")
    p.add_argument("--seq-len", type=int, default=seq, help=f"tokens per sequence (default {seq})")
    p.add_argument("--global-batch", type=int, default=batch,
                   help=f"sequences per optimizer step, over all processes (default {batch})")
    p.add_argument("--micro-batch", type=int, default=micro,
                   help=f"sequences per forward pass; accumulation = global / (micro x processes) (default {micro})")
    p.add_argument("--max-steps", type=int, default=steps, help=f"optimizer steps (default {steps})")
    p.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr})")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr as a share of the peak (default 0.1)")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default: 5%% of --max-steps)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm, 0 for none (default 1.0)")
    p.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps (and at the end)")
    p.add_argument("--eval-every", type=int, default=100, help="held-out loss every N steps (0: never)")
    p.add_argument("--keep", type=int, default=2, help="resumable checkpoints to keep (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="autocast dtype of the forward (auto: bfloat16 on GPUs and bf16 CPUs, else float32)")
    p.add_argument("--save-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the exported weights (default float32)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--stop-at", type=int, help="stop after this step with a checkpoint (resume later; "
                   "the schedule still spans --max-steps)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="pretrain or fine-tune (full or LoRA); works under torchrun")
    tsub = p.add_subparsers(dest="train_command", metavar="ACTION", required=True)

    pp = tsub.add_parser("pretrain", help="train a qwen2-layout model from scratch on token shards")
    pp.add_argument("-d", "--data", required=True, help="shard folder from `data prepare` (train-*/val-*), a shard or a glob")
    pp.add_argument("--val-data", help="held-out shards (default: val-* beside the training shards)")
    pp.add_argument("-t", "--tokenizer", help="tokenizer the shards were made with (default: Qwen's vocabulary)")
    pp.add_argument("--preset", default="tiny", help="model shape: tiny, mini, small, 0.5b, 1.5b, 7b (default tiny)")
    pp.add_argument("--config", help="a config.json (qwen2 layout) instead of a preset")
    _common(pp, lr=3e-3, steps=1000, batch=16, micro=8, seq=256)
    pp.set_defaults(func=run_pretrain)

    ps = tsub.add_parser("sft", help="fine-tune on conversations (Qwen, OpenAI messages or Alpaca format)")
    ps.add_argument("-m", "--model", help="base model (folder, .gguf or name; default: the default model)")
    ps.add_argument("-d", "--data", required=True, nargs="+", help=".json or .jsonl files")
    ps.add_argument("--val-fraction", type=float, default=0.0, help="share of examples held out for eval loss")
    ps.add_argument("--no-packing", action="store_true", help="one example per row instead of packing")
    ps.add_argument("--lora", action="store_true", help="train a LoRA adapter instead of all weights")
    ps.add_argument("--lora-r", type=int, default=64, help="LoRA rank (default 64, Qwen-7B's)")
    ps.add_argument("--lora-alpha", type=float, default=16, help="LoRA alpha (default 16)")
    ps.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout (default 0.05)")
    ps.add_argument("--lora-targets", help="comma-separated module names (default: q,k,v,o,gate,up,down _proj)")
    _common(ps, lr=1e-4, steps=200, batch=8, micro=4, seq=1024)
    ps.set_defaults(func=run_sft)


def _finish(args: argparse.Namespace) -> None:
    from ..errors import QianwenError
    from ..loading import parse_device

    if args.device:
        parse_device(args.device)  # one clear line for cuda on a machine without it
    if args.warmup is None:
        args.warmup = max(1, args.max_steps // 20)
    for name in ("seq_len", "global_batch", "micro_batch", "max_steps", "save_every"):
        if getattr(args, name) < 1:
            raise QianwenError(f"--{name.replace('_', '-')} must be at least 1")


def run_pretrain(args: argparse.Namespace) -> int:
    from ..train.pretrain import run_pretrain as run

    _finish(args)
    return run(args)


def run_sft(args: argparse.Namespace) -> int:
    from ..errors import QianwenError
    from ..train.sft import run_sft as run

    _finish(args)
    if not 0 <= args.val_fraction < 1:
        raise QianwenError("--val-fraction must be in [0, 1)")
    return run(args)
