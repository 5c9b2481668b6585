"""`qianwen pull NAME`: fetch a model into $QIANWEN_HOME/models."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pull", help="download a model into the local cache",
                       description="Fetch a model by name: 'default', a Hugging Face id (Qwen/Qwen2.5-0.5B-Instruct) "
                                   "or a modelscope:ORG/NAME id.")
    p.add_argument("name", nargs="?", default="default")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..loading.hub import pull

    print(pull(args.name))
    return 0
