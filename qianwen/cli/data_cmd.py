"""`qianwen data prepare` (files -> token shards) and `qianwen data sample` (bilingual sample corpus)."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="prepare token shards; build the bilingual sample corpus")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    pp = dsub.add_parser("prepare", help="tokenize text / JSONL / JSON / Parquet files into shards")
    pp.add_argument("inputs", nargs="+", help="files or folders (.txt/.md, .jsonl, .json, .parquet)")
    pp.add_argument("-o", "--out", required=True, help="output folder (train-NNNNN.bin/.json, val-...)")
    pp.add_argument("-t", "--tokenizer", help="model folder, tokenizer.json or .tiktoken (default: Qwen's vocabulary)")
    pp.add_argument("--text-field", help="JSON field / Parquet column holding the text (default: text, then content)")
    pp.add_argument("--text-unit", choices=["paragraph", "line", "file"], default="paragraph",
                    help="what one document is in a text file (default: blank-line separated paragraph)")
    pp.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out (default 0.01)")
    pp.add_argument("--shard-tokens", type=int, default=1 << 28, help="tokens per shard file (default 2^28)")
    pp.set_defaults(func=run_prepare)

    ps = dsub.add_parser("sample", help="fetch the bilingual sample corpus into $QIANWEN_HOME/data/sample")
    ps.add_argument("-o", "--out", help="output folder (default $QIANWEN_HOME/data/sample)")
    ps.add_argument("--sources", help="comma-separated subset of: chinese-poetry, tatoeba, sotu")
    ps.add_argument("--no-sft", action="store_true", help="skip the Alpaca zh/en SFT demos")
    ps.set_defaults(func=run_sample)


def run_prepare(args: argparse.Namespace) -> int:
    from ..errors import QianwenError
    from ..train.prepare import load_any_tokenizer, prepare

    if not 0 <= args.val_fraction < 1:
        raise QianwenError("--val-fraction must be in [0, 1)")
    tok = load_any_tokenizer(args.tokenizer)
    s = prepare(args.inputs, args.out, tok, tokenizer_name=args.tokenizer or "qwen", text_field=args.text_field,
                text_unit=args.text_unit, val_fraction=args.val_fraction, shard_tokens=args.shard_tokens,
                progress=sys.stderr.isatty())
    print(f"{s['documents']} documents from {s['files']} files: {s['train_tokens']} train tokens in "
          f"{len(s['train_shards'])} shards, {s['val_tokens']} validation tokens -> {args.out}")
    if s["skipped"]:
        print(f"skipped {s['skipped']}: " + ", ".join(f"{n} {k}" for k, n in s["reasons"].items()), file=sys.stderr)
    return 0


def run_sample(args: argparse.Namespace) -> int:
    from ..train.sample import build_sample

    sources = [s.strip() for s in args.sources.split(",")] if args.sources else None
    s = build_sample(args.out, sources, sft=not args.no_sft)
    print(json.dumps(s, indent=2, ensure_ascii=False))
    return 0
