"""Where downloaded and derived files live: `$QIANWEN_HOME` (default ~/.cache/qianwen)."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("QIANWEN_HOME") or Path.home() / ".cache" / "qianwen").expanduser()


def models_dir() -> Path:
    return home() / "models"


def data_dir() -> Path:
    return home() / "data"


def share_like_new_file(path: str | os.PathLike) -> None:
    """Give a file the permissions a plain new file gets (0666 less the umask): temp files and
    safetensors' writer make 0600 files, which other users of a model folder could not read."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def model_dir(name: str) -> Path:
    """Where a hub name is cached: `Org/Name` -> `Org--Name`, `modelscope:Org/Name` -> `modelscope--Org--Name`."""
    return models_dir() / name.replace("modelscope:", "modelscope--").replace("/", "--")


def model_name(entry: Path) -> str:
    """The name `model_dir` caches as `entry` (a file or a folder without `--` keeps its own name)."""
    name = entry.name
    if name.startswith("modelscope--"):
        return "modelscope:" + name.removeprefix("modelscope--").replace("--", "/")
    return name.replace("--", "/")


def cached_models() -> list[tuple[str, int, Path]]:
    """The models in `models_dir()`, as (name, size in bytes, path), sorted by name."""
    root = models_dir()
    if not root.is_dir():
        return []
    out = []
    for p in sorted(root.iterdir()):
        if p.name.startswith(".") or p.name.endswith(".partial"):
            continue
        size = p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        out.append((model_name(p), size, p))
    return out
