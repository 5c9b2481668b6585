"""`qianwen tokenizer train`: a small byte-level BPE vocabulary with the ChatML control tokens."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="train a small byte-level BPE tokenizer")
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    pt = tsub.add_parser("train", help="train on text / JSONL / JSON / Parquet files")
    pt.add_argument("inputs", nargs="+", help="files or folders")
    pt.add_argument("-o", "--out", required=True, help="output folder (tokenizer.json, tokenizer_config.json)")
    pt.add_argument("--vocab-size", type=int, default=8192, help="total vocabulary incl. special tokens (default 8192)")
    pt.add_argument("--min-frequency", type=int, default=2)
    pt.add_argument("--text-field", help="JSON field / Parquet column holding the text")
    pt.add_argument("--text-unit", choices=["paragraph", "line", "file"], default="paragraph")
    pt.add_argument("--max-documents", type=int, help="train on the first N documents only")
    pt.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..tokenizer import load_tokenizer
    from ..train.bpe import train_tokenizer

    out = train_tokenizer(args.inputs, args.out, args.vocab_size, args.min_frequency, args.text_field,
                          args.text_unit, args.max_documents, progress=sys.stderr.isatty())
    tok = load_tokenizer(out)
    print(f"tokenizer with {tok.vocab_size} tokens -> {out}")
    return 0
