"""Arguments shared by the subcommands that load a model or sample from it."""

from __future__ import annotations

import argparse
import gc
import sys
from typing import Any

from ..errors import QianwenError
from ..generation.params import OPTIONS, Option, check_option


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=None,
                   help="a model folder, a .gguf file or a name (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: by hardware)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


class _CheckedOption(argparse.Action):
    """Parse and check one sampling value with generation's `check_option`; a bad value is one line and exit 2."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        opt: Option = OPTIONS[self.dest]
        try:
            value = values if opt.kind is str else opt.kind(values)
        except ValueError:
            value = None
            message = f"{values!r} is not {'an integer' if opt.kind is int else 'a number'}"
        else:
            try:
                check_option(self.dest, value)
                message = ""
            except QianwenError as e:
                message = str(e).removeprefix(self.dest + " ")
        if message:
            print(f"{parser.prog}: error: {option_string} {message}", file=sys.stderr)
            parser.exit(2)
        if opt.kind is str:  # repeatable
            value = [*(getattr(namespace, self.dest, None) or []), value]
        setattr(namespace, self.dest, value)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """One flag per sampling option of SamplingParams (generation/params.py), checked as the server checks it."""
    g = p.add_argument_group("sampling (defaults from the model's generation_config.json)")
    for name, opt in OPTIONS.items():
        flag = opt.flag or "--" + name.replace("_", "-")
        rng = opt.describe_range()
        help_text = opt.help + (f"; {rng}" if rng else "") + ("; repeatable" if opt.kind is str else "")
        if opt.kind is bool:
            g.add_argument(flag, dest=name, action="store_const", const=True, default=None, help=opt.help)
        else:
            g.add_argument(flag, dest=name, action=_CheckedOption, default=None, help=help_text,
                           metavar=name.upper())


def sampling_options(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in OPTIONS if getattr(args, k, None) is not None}


def load_model(args: argparse.Namespace):  # -> qianwen.api.Model
    import qianwen

    model = qianwen.load(args.model, dtype=args.dtype, device=args.device)
    freeze_heap()
    return model


def freeze_heap() -> None:
    """Leave what is alive now (the model, its tokenizer, the libraries) out of Python's cyclic garbage
    collections from now on: a full collection walks every tracked object, about 215,000 once the default
    model and the server are loaded, and stalls every stream for 0.1 s on the 2-core machine BENCHMARKS.md
    describes. Objects made later are collected as before; these live as long as the command anyway."""
    gc.collect()
    gc.freeze()
