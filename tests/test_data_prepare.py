"""Token shards, `data prepare` from text / JSONL / JSON / Parquet, bad input, tokenizer training."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qianwen.errors import QianwenError
from qianwen.train.prepare import prepare
from qianwen.train.shards import ShardWriter, load_tokens, open_tokens, read_shard
from tests.test_train_fixtures import EN, ZH, make_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from qianwen.tokenizer import load_tokenizer

    return load_tokenizer(make_tokenizer(tmp_path_factory.mktemp("tok")))


def test_shard_roundtrip_and_rollover(tmp_path):
    info = {"name": "t", "identity": "abc", "vocab_size": 1000, "eos_id": 0}
    docs = [list(range(1, n + 1)) for n in (5, 7, 3, 9)]
    with ShardWriter(tmp_path / "train", info, max_tokens=10) as w:
        for d in docs:
            w.add(d)
    assert [p.name for p in w.paths] == ["train-00000.bin", "train-00001.bin"]  # 5+7, then 3+9
    raw = (tmp_path / "train-00000.bin").read_bytes()
    assert raw[:8] == (1).to_bytes(4, "little") + (2).to_bytes(4, "little")  # uint32 little-endian
    got = [d.tolist() for p in w.paths for d in read_shard(p).documents()]
    assert got == docs
    ids, meta = load_tokens(tmp_path, identity="abc")
    assert ids.tolist() == sum(docs, []) and meta["vocab_size"] == 1000
    with pytest.raises(QianwenError, match="another vocabulary"):
        load_tokens(tmp_path, identity="other")
    with pytest.raises(QianwenError, match="out of range"):
        ShardWriter(tmp_path / "x", info).add([1000])
    (tmp_path / "train-00001.bin").write_bytes(raw[:12])  # truncated
    with pytest.raises(QianwenError, match="truncated"):
        read_shard(tmp_path / "train-00001.bin")


def test_token_stream_is_memory_mapped_and_joins_shards(tmp_path):
    """Pretraining reads shards through a memory-mapped view: same tokens and windows as the
    concatenation, slices across shard boundaries, nothing loaded up front."""
    from qianwen.train.pretrain import WindowSource

    info = {"name": "t", "identity": "abc", "vocab_size": 1000, "eos_id": 0}
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 1000, size=int(n)) for n in rng.integers(1, 40, size=30)]
    with ShardWriter(tmp_path / "train", info, max_tokens=64) as w:
        for d in docs:
            w.add(d)
    assert len(w.paths) > 5
    whole = np.concatenate(docs)
    stream, meta = open_tokens(tmp_path / "train-*.bin", identity="abc")
    assert meta["identity"] == "abc" and len(stream) == len(whole)
    assert all(isinstance(s.tokens, np.memmap) for s in stream.shards)
    for a, b in [(0, 1), (0, len(whole)), (60, 70), (5, 300), (len(whole) - 3, len(whole) + 9), (40, 40)]:
        assert stream[a:b].tolist() == whole[a:b].tolist(), (a, b)
    assert np.asarray(stream).tolist() == whole.tolist()
    with pytest.raises(TypeError):
        stream[::2]
    ref, got = WindowSource(whole, 24, seed=3), WindowSource(stream, 24, seed=3)
    assert got.n_windows == ref.n_windows
    for step in range(0, 3 * ref.n_windows // 4 + 2):  # past an epoch boundary
        for r, g in zip(ref.rows(step, 4), got.rows(step, 4), strict=True):
            assert r.input_ids.tolist() == g.input_ids.tolist() and r.labels.tolist() == g.labels.tolist()
    with pytest.raises(QianwenError, match="another vocabulary"):
        open_tokens(tmp_path, identity="other")


def test_prepare_all_formats_agree(tmp_path, tok):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    docs = [f"{EN[i % 5]}\n{ZH[i % 5]}" for i in range(12)]
    (tmp_path / "a.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))
    (tmp_path / "c.json").write_text(json.dumps([{"content": d} for d in docs], ensure_ascii=False))
    pq.write_table(pa.table({"text": docs}), tmp_path / "d.parquet")
    eos = tok.special_tokens["<|endoftext|>"]
    expected = sum((tok.encode(d) + [eos] for d in docs), [])
    for name in ("a.txt", "b.jsonl", "c.json", "d.parquet"):
        out = tmp_path / ("out-" + name)
        s = prepare([str(tmp_path / name)], out, tok, progress=False)
        assert s["documents"] == 12 and s["skipped"] == 0
        ids, meta = load_tokens(out / "train-00000.bin", identity=tok.identity)
        assert ids.tolist() == expected, name
        assert read_shard(out / "train-00000.bin").index["num_documents"] == 12
    # a held-out split takes whole documents, reproducibly
    s1 = prepare([str(tmp_path / "b.jsonl")], tmp_path / "v1", tok, val_fraction=0.3, progress=False)
    s2 = prepare([str(tmp_path / "b.jsonl")], tmp_path / "v2", tok, val_fraction=0.3, progress=False)
    assert s1["val_tokens"] == s2["val_tokens"] > 0 and s1["train_tokens"] + s1["val_tokens"] == len(expected)


def test_prepare_bad_input(tmp_path, tok):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(QianwenError, match="no documents.*empty file"):
        prepare([str(tmp_path / "empty.jsonl")], tmp_path / "o1", tok, progress=False)
    (tmp_path / "junk.jsonl").write_text("{not json\n[1, 2\n")
    with pytest.raises(QianwenError, match="2 malformed JSON line"):
        prepare([str(tmp_path / "junk.jsonl")], tmp_path / "o2", tok, progress=False)
    (tmp_path / "some.jsonl").write_text('{"text": "good"}\n{oops\n{"title": "no text"}\n')
    s = prepare([str(tmp_path / "some.jsonl")], tmp_path / "o3", tok, progress=False)
    assert s["documents"] == 1 and s["reasons"] == {"malformed JSON line": 1, "record without 'text'": 1}
    with pytest.raises(QianwenError, match="no such file"):
        prepare([str(tmp_path / "missing.txt")], tmp_path / "o4", tok, progress=False)


def test_trained_tokenizer_matches_transformers(tmp_path, tok):
    from transformers import AutoTokenizer

    folder = make_tokenizer(tmp_path)
    hf = AutoTokenizer.from_pretrained(str(folder))
    for text in EN + ZH + ["mixed 中文 and English 2024!", "  spaces\n\nnewlines\t", "emoji 🙂 ok"]:
        ids = tok.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    assert tok.encode("<|im_end|>") != [tok.special_tokens["<|im_end|>"]]  # user text stays text
    assert set(tok.special_tokens) == {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}
    assert tok.vocab_size == 384
    msgs = [{"role": "user", "content": "你好"}]
    assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
    assert np.all(np.array(tok.encode("x" * 50)) < 384)


def test_fetch_many_one_download_all_or_nothing(tmp_path, monkeypatch):
    """fetch_many (used by `data sample`): one download for several members of an sdist-like tarball
    (top folder prefixed), checksums checked before anything is moved into place, present files kept."""
    import hashlib
    import io
    import tarfile

    from qianwen import artifacts

    files = {"data/a.json": b'{"a": 1}', "data/b.json": "中文".encode()}
    archive = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(archive, "w:gz") as t:
        for name, data in files.items():
            info = tarfile.TarInfo("pkg-1.0/" + name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    calls = []

    def fake_download(art, tmp):
        calls.append(art)
        return archive

    monkeypatch.setattr(artifacts, "_download_archive", fake_download)
    monkeypatch.setenv("QIANWEN_HOME", str(tmp_path / "home"))
    sha = {m: hashlib.sha256(d).hexdigest() for m, d in files.items()}
    dest = {"data/a.json": "x/a.json", "data/b.json": tmp_path / "abs" / "b.json"}

    bad = dict(sha, **{"data/b.json": "0" * 64})
    with pytest.raises(QianwenError, match="checksum mismatch for data/b.json"):
        artifacts.fetch_many("pypi-sdist", "pkg==1.0", dest, sha256=bad)
    assert not (tmp_path / "home" / "x" / "a.json").exists()  # nothing half-fetched
    assert not list((tmp_path / "home" / "x").iterdir()) and not list((tmp_path / "abs").iterdir())

    got = artifacts.fetch_many("pypi-sdist", "pkg==1.0", dest, sha256=sha)
    assert got["data/a.json"] == tmp_path / "home" / "x" / "a.json" and got["data/b.json"] == dest["data/b.json"]
    assert {m: p.read_bytes() for m, p in got.items()} == files
    assert len(calls) == 2 and calls[-1].registry == "pypi-sdist"
    artifacts.fetch_many("pypi-sdist", "pkg==1.0", dest, sha256=sha)
    assert len(calls) == 2  # all present: no download
    with pytest.raises(QianwenError, match="not found"):
        artifacts.fetch_many("pypi-sdist", "pkg==1.0", {"data/c.json": "x/c.json"})
    with pytest.raises(QianwenError, match="unknown registry"):
        artifacts.fetch_many("cargo", "pkg", dest)
