"""`qianwen convert --model M --out DIR`: a GGUF file (or any loadable model) to a Hugging Face folder
(config.json, model.safetensors, tokenizer.json, tokenizer_config.json with the chat template,
generation_config.json) that `qianwen.load` and transformers both load."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a GGUF file to a Hugging Face folder (safetensors)")
    p.add_argument("-m", "--model", default=None, help="a .gguf file, folder or name (default: the default model)")
    p.add_argument("--out", required=True, help="the folder to write (replaced atomically)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the saved weights (default float32: GGUF blocks dequantize exactly)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..convert import convert

    folder = convert(args.model, args.out, getattr(torch, args.dtype))
    print(f"wrote {folder} ({args.dtype})", file=sys.stderr)
    return 0
