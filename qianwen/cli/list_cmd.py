"""`qianwen list`: models in the local cache, with their sizes."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list cached models")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..loading.hub import list_models
    from ..paths import models_dir

    models = list_models()
    if not models:
        print(f"no models in {models_dir()} (run `qianwen pull` to fetch the default model)")
        return 0
    width = max(len(n) for n, _, _ in models)
    print(f"{'NAME':<{width}}  {'SIZE':>9}  PATH")
    for name, size, path in models:
        print(f"{name:<{width}}  {size / 1e6:>7.1f}MB  {path}")
    return 0
