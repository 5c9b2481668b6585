"""qianwen's lean GGUF reader against the `gguf` package's own reader and writer."""

from __future__ import annotations

import numpy as np
import pytest

from qianwen.errors import ModelLoadError
from qianwen.gguf_reader import GGUFFile


def _reference(path):
    import gguf

    r = gguf.GGUFReader(str(path))
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    return meta, r.tensors


def _write(path, align: int | None = None):
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    if align:
        w.add_custom_alignment(align)
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -5)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_uint64("t.u64", 2**60)
    w.add_int64("t.i64", -(2**60))
    w.add_float32("t.f32", 0.125)
    w.add_float64("t.f64", 1e-300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "通义千问 Qwen")
    w.add_array("t.strs", ["a", "", "中文", "b c"])
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, -1.5])
    rng = np.random.default_rng(0)
    w.add_tensor("f32", rng.standard_normal((3, 40)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((2, 64)).astype(np.float16))
    q = rng.integers(0, 256, (4, 2 * 18), dtype=np.uint8)  # 4 rows of 64 weights in Q4_0 blocks
    q[:, 0:2] = q[:, 18:20] = np.array([0.01], np.float16).view(np.uint8)
    w.add_tensor("q4", q, raw_shape=(4, 36), raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("align", [None, 64])
def test_matches_the_gguf_package(tmp_path, align):
    path = tmp_path / "t.gguf"
    _write(path, align)
    ours = GGUFFile(path)
    meta, tensors = _reference(path)
    assert dict(ours) == meta
    assert ours["t.str"] == "通义千问 Qwen" and ours["t.strs"] == ["a", "", "中文", "b c"]
    assert [t.name for t in ours.tensors] == [t.name for t in tensors] == ["f32", "f16", "q4"]
    for a, b in zip(ours.tensors, tensors, strict=True):
        assert a.tensor_type == b.tensor_type and list(a.shape) == list(b.shape)
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape
        assert np.array_equal(a.data, b.data) and a.data_offset == b.data_offset


def test_default_model_file_matches_the_gguf_package(default_gguf):
    ours = GGUFFile(default_gguf)
    meta, tensors = _reference(default_gguf)
    assert dict(ours) == meta
    assert len(ours["tokenizer.ggml.tokens"]) == len(ours["tokenizer.ggml.token_type"]) > 40_000
    assert len(ours.tensors) == len(tensors)
    for a, b in zip(ours.tensors, tensors, strict=True):
        assert (a.name, a.tensor_type, a.data.shape, a.data_offset) == (b.name, b.tensor_type, b.data.shape, b.data_offset)
    assert np.array_equal(ours.tensors[-1].data, tensors[-1].data)


@pytest.mark.parametrize("cut", [3, 20, 300, 1000, -40])
def test_truncated_file_is_one_clear_error(tmp_path, cut):  # -40: inside the last tensor (padding < 32)
    path = tmp_path / "t.gguf"
    _write(path)
    data = path.read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[:cut])
    with pytest.raises(ModelLoadError, match="truncated or not a valid GGUF"):
        GGUFFile(bad)


def test_garbage_and_impossible_lengths(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(ModelLoadError, match="not a valid GGUF"):
        GGUFFile(bad)
    # a valid header whose first key claims an enormous length
    bad.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") + (1).to_bytes(8, "little")
                    + (2**62).to_bytes(8, "little") + b"abc")
    with pytest.raises(ModelLoadError, match="not a valid GGUF"):
        GGUFFile(bad)
    bad.write_bytes(b"")
    with pytest.raises(ModelLoadError):
        GGUFFile(bad)
