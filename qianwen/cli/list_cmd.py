"""`qianwen list`: models in the local cache, with their sizes. Every name it prints works with `-m`."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list cached models (each NAME works with -m)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..paths import cached_models, models_dir

    models = cached_models()
    if not models:
        print(f"no models in {models_dir()} (run `qianwen pull` to fetch the default model)")
        return 0
    width = max(len(n) for n, _, _ in models)
    print(f"{'NAME':<{width}}  {'SIZE':>9}  PATH")
    for name, size, path in models:
        print(f"{name:<{width}}  {size / 1e6:>7.1f}MB  {path}")
    return 0
