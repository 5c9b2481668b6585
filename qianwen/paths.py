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
