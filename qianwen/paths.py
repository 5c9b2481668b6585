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
