"""Arguments shared by the subcommands that load a model or sample from it."""

from __future__ import annotations

import argparse
from typing import Any


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=None,
                   help="a model folder, a .gguf file or a name (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: by hardware)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults from the model's generation_config.json)")
    g.add_argument("--max-tokens", type=int, default=None, help="most new tokens per answer")
    g.add_argument("--temperature", type=float, default=None, help="0 for greedy")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--presence-penalty", type=float, default=None)
    g.add_argument("--frequency-penalty", type=float, default=None)
    g.add_argument("--seed", type=int, default=None, help="same seed, same output")
    g.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")


def sampling_options(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
            "frequency_penalty", "seed", "stop")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def load_model(args: argparse.Namespace):  # -> qianwen.api.Model
    import qianwen

    return qianwen.load(args.model, dtype=args.dtype, device=args.device)
