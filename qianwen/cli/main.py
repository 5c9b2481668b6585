"""The `qianwen` command: one dispatcher, one module per subcommand.

Each module `qianwen.cli.<name>` exposes `register(subparsers)`, which adds its parser and sets
`func=run` where `run(args) -> int`. Modules are imported only to build the parser, so keep their
top-level imports light (import torch and friends inside `run`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..errors import QianwenError

# command modules, in the order `qianwen --help` lists them
COMMANDS = ["pull", "list", "info", "generate", "chat", "serve", "convert", "quantize", "data",
            "tokenizer", "train", "merge", "eval"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qianwen", description="Run, serve, train and evaluate Qwen-family models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"qianwen.cli.{name.replace('-', '_')}_cmd")
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("qianwen.cli."):
                continue  # command not built yet
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    debug = args.debug or bool(os.environ.get("QIANWEN_DEBUG"))
    try:
        return int(args.func(args) or 0)
    except QianwenError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
