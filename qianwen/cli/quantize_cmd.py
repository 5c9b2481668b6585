"""`qianwen quantize --model M --bits 8|4 [--group-size N] --out DIR`: weight-only quantization of a
model into a Hugging Face folder (safetensors + quantization_config in config.json)."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="weight-only int8/int4 quantization into a Hugging Face folder")
    p.add_argument("-m", "--model", default=None, help="a model folder, .gguf file or name")
    p.add_argument("--bits", type=int, required=True, choices=[4, 8], help="8: per-channel int8; 4: group-wise int4")
    p.add_argument("--group-size", type=int, default=None, choices=[32, 64, 128, 256],
                   help="int4 group size; a layer whose input size it does not divide gets the largest "
                        "that does, and the command says so. Default: per layer, the largest group whose "
                        "error stays within 1.5x of group 32's (keeps a converted GGUF's 32-weight blocks)")
    p.add_argument("--out", required=True, help="the folder to write (replaced atomically)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..convert import quantize_folder

    folder = quantize_folder(args.model, args.out, args.bits, args.group_size)
    print(f"wrote {folder} ({args.bits}-bit)", file=sys.stderr)
    return 0
