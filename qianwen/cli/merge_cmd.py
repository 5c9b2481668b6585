"""`qianwen merge`: base model + LoRA adapter -> a standalone Hugging Face checkpoint."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="fold a LoRA adapter into its base model")
    p.add_argument("-m", "--model", help="base model (folder, .gguf or name; default: the adapter's base)")
    p.add_argument("-a", "--adapter", required=True, help="adapter folder (PEFT layout)")
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import QianwenError
    from ..train.lora import read_adapter
    from ..train.merge import merge

    base = args.model or read_adapter(args.adapter)[0].get("base_model_name_or_path")
    if not base:
        raise QianwenError("the adapter names no base model: pass --model")
    out = merge(base, args.adapter, args.out, args.dtype)
    print(f"merged {args.adapter} into {base} -> {out}")
    return 0
