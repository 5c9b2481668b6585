"""`qianwen generate [PROMPT]`: complete raw text (no chat template); stdin when no prompt."""

from __future__ import annotations

import argparse
import sys

from ..errors import QianwenError
from .common import add_model_args, add_sampling_args, load_model, sampling_options
from .structured import add_structured_args, structured_options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="complete a prompt (base completion, no chat template)")
    p.add_argument("prompt", nargs="?", help="the prompt (read from stdin when absent)")
    add_model_args(p)
    add_sampling_args(p)
    add_structured_args(p)
    p.add_argument("--chat", action="store_true", help="wrap the prompt as one user turn of the chat template")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt:
        raise QianwenError("no prompt: pass one as an argument or on stdin")
    opts = sampling_options(args) | structured_options(args, args.chat)
    model = load_model(args)
    pieces = (model.chat([{"role": "user", "content": prompt}], stream=True, **opts) if args.chat
              else model.generate(prompt, stream=True, **opts))
    try:
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    sys.stdout.write("\n")
    return 0
