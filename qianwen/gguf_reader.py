"""A lean GGUF reader: metadata as plain Python values, tensors as views of a memory map.

`gguf.GGUFReader` keeps every array element as its own numpy part, which takes 10-30 s for the
~50k-entry token and merge lists of a modern vocabulary; here they are read in one pass of slices.
The layout (GGUF v2/v3, little-endian): magic "GGUF", version u32, tensor count u64, kv count u64;
kv pairs (string key, u32 type, value; arrays are u32 element type, u64 count, elements; strings
u64 length, UTF-8 bytes); tensor infos (name, u32 n_dims, u64 dims, u32 ggml type, u64 offset);
then the tensor data, aligned to `general.alignment` (default 32).

`GGUFFile` is a read-only mapping of the metadata (what `tokenizer_from_gguf` accepts) with
`.tensors`: objects with the fields of `gguf.ReaderTensor` the loaders read (name, tensor_type,
shape in GGUF order, n_elements, n_bytes, data_offset, data). Any truncated or corrupt file raises
one `ModelLoadError`.
"""

from __future__ import annotations

import math
import mmap
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ModelLoadError

_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
_PLAIN_TENSORS = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
                  "I32": np.int32, "I64": np.int64}


class _Corrupt(Exception):
    pass


@dataclass
class GGUFTensor:
    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: np.ndarray  # dims in GGUF order (contiguous dimension first)
    n_elements: int
    n_bytes: int
    data_offset: int
    data: np.ndarray  # read-only view: float/int elements, or raw blocks as uint8 [..., bytes per row]


class _Cursor:
    def __init__(self, buf: mmap.mmap | bytes) -> None:
        self.buf, self.off, self.size = buf, 0, len(buf)

    def take(self, n: int) -> bytes:
        end = self.off + n
        if n < 0 or end > self.size:
            raise _Corrupt
        b = self.buf[self.off:end]
        self.off = end
        return b

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def string(self) -> str:
        return self.take(self.u64()).decode("utf-8")

    def strings(self, n: int) -> list[str]:
        if n * 8 > self.size - self.off:  # each string takes at least its 8-byte length
            raise _Corrupt
        buf, off, size, out = self.buf, self.off, self.size, []
        append, from_bytes = out.append, int.from_bytes
        for _ in range(n):
            ln = from_bytes(buf[off:off + 8], "little")
            off += 8
            if off + ln > size:
                raise _Corrupt
            append(buf[off:off + ln].decode("utf-8"))
            off += ln
        self.off = off
        return out

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, n = self.u32(), self.u64()
            if etype == _STRING:
                return self.strings(n)
            if etype not in _SCALARS:
                raise _Corrupt
            dt = np.dtype(_SCALARS[etype])
            return np.frombuffer(self.take(n * dt.itemsize), dt).tolist()
        if vtype not in _SCALARS:
            raise _Corrupt
        dt = np.dtype(_SCALARS[vtype])
        return np.frombuffer(self.take(dt.itemsize), dt)[0].item()


class GGUFFile(Mapping):
    """The metadata of a GGUF file as a mapping, and its tensors (`.tensors`, memory-mapped).

    Checked while reading, before any tensor is touched: every length and count against the bytes
    left, keys unique, `general.alignment` a power of two, each tensor's type known and its data
    inside the file, aligned and not overlapping another's."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:  # ValueError: an empty file cannot be mapped
            raise ModelLoadError(f"cannot read GGUF file {self.path}: {e}") from None
        self._where = "the header"
        try:
            self._meta, self.tensors = self._parse()
        except (_Corrupt, UnicodeDecodeError, struct.error, ValueError, OverflowError, KeyError, IndexError):
            raise ModelLoadError(f"{self.path} is truncated or not a valid GGUF file (reading {self._where})") from None

    def _bad(self, msg: str) -> ModelLoadError:
        return ModelLoadError(f"{self.path}: GGUF {msg}")

    def _parse(self) -> tuple[dict[str, Any], list[GGUFTensor]]:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        c = _Cursor(self._map)
        if c.take(4) != b"GGUF":
            raise _Corrupt
        version = c.u32()
        if version & 0xFFFF == 0:
            raise ModelLoadError(f"{self.path} is a big-endian GGUF file; only little-endian files are supported")
        if version not in (2, 3):
            raise ModelLoadError(f"{self.path} is GGUF version {version}; versions 2 and 3 are supported")
        n_tensors, n_kv = c.u64(), c.u64()
        meta: dict[str, Any] = {}
        for i in range(n_kv):
            self._where = f"metadata entry {i} of {n_kv}"
            key = c.string()
            self._where = f"the value of '{key}'"
            if key in meta:
                raise self._bad(f"metadata key '{key}' appears twice")
            meta[key] = c.value(c.u32())
        infos = []
        for i in range(n_tensors):
            self._where = f"tensor info {i} of {n_tensors}"
            name = c.string()
            self._where = f"the info of tensor '{name}'"
            n_dims = c.u32()
            if not 1 <= n_dims <= 4:  # GGML_MAX_DIMS
                raise self._bad(f"tensor '{name}' has {n_dims} dimensions; GGUF tensors have 1 to 4")
            dims = [int(d) for d in np.frombuffer(c.take(8 * n_dims), "<u8")]
            infos.append((name, dims, c.u32(), c.u64()))
        align = meta.get("general.alignment", 32)
        if isinstance(align, bool) or not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise self._bad(f"'general.alignment' is {align!r:.40}; expected a power of two")
        start = -(-c.off // align) * align
        tensors, seen = [], set()
        for name, dims, raw_type, offset in infos:
            self._where = f"the data of tensor '{name}'"
            if name in seen:
                raise self._bad(f"tensor '{name}' is listed twice")
            seen.add(name)
            try:
                gtype = GGMLQuantizationType(raw_type)
                block, type_size = GGML_QUANT_SIZES[gtype]
            except (ValueError, KeyError):
                raise self._bad(f"tensor '{name}' has unknown type {raw_type}") from None
            n_el = math.prod(dims)
            np_dims = dims[::-1]
            if np_dims[-1] % block:
                raise self._bad(f"tensor '{name}' has rows of {np_dims[-1]} values, not whole {gtype.name} "
                                f"blocks of {block}")
            n_bytes = n_el // block * type_size
            if offset % align:
                raise self._bad(f"tensor '{name}' data offset {offset} is not a multiple of the alignment {align}")
            begin = start + offset
            if begin + n_bytes > c.size:
                raise self._bad(f"tensor '{name}' ({n_bytes} bytes at {begin}) runs past the end of the file "
                                f"({c.size} bytes): truncated or not a valid GGUF file")
            if gtype.name in _PLAIN_TENSORS:
                arr = np.frombuffer(self._map, _PLAIN_TENSORS[gtype.name], n_el, begin).reshape(np_dims)
            else:  # raw blocks, shaped like gguf.GGUFReader's: [..., bytes per row]
                np_dims[-1] = np_dims[-1] // block * type_size
                arr = np.frombuffer(self._map, np.uint8, n_bytes, begin).reshape(np_dims)
            tensors.append(GGUFTensor(name, gtype, np.array(dims, dtype=np.uint64), n_el, n_bytes, begin, arr))
        spans = sorted((t.data_offset, t.data_offset + t.n_bytes, t.name) for t in tensors if t.n_bytes)
        for (_, end, a), (begin, _, b) in zip(spans, spans[1:], strict=False):
            if begin < end:
                raise self._bad(f"the data of tensors '{a}' and '{b}' overlap")
        return meta, tensors

    def release(self, tensor: GGUFTensor) -> None:
        """Drop a tensor's file pages from this process's memory once it has been copied out (they
        are re-read from the page cache if touched again), so loading peaks near one copy of the model."""
        page = mmap.PAGESIZE
        start = tensor.data_offset // page * page
        end = min(-(-(tensor.data_offset + tensor.n_bytes) // page) * page, len(self._map))
        if hasattr(mmap, "MADV_DONTNEED") and end > start:
            self._map.madvise(mmap.MADV_DONTNEED, start, end - start)

    def __getitem__(self, key: str) -> Any:
        return self._meta[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._meta)

    def __len__(self) -> int:
        return len(self._meta)
