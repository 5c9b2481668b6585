"""Seeded corruptions of the real default GGUF and of a tiny HF folder: each load ends in a working
model or in one QianwenError line, never in a traceback, a hang or a crash.

The loads run in a worker process (tests/_corruption_worker.py) under an address-space limit, with a
deadline per case: a case past it is a hang (the worker is killed and restarted after it), a worker
that dies is a crash. Cases marked `must_fail` are invalid files that must be refused, not loaded.
"""

from __future__ import annotations

import json
import math
import os
import queue
import random
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qianwen

REPO = Path(qianwen.__file__).resolve().parent.parent
WORKER = Path(__file__).with_name("_corruption_worker.py")
CASE_SECONDS = 90  # a load takes seconds even on a busy machine; the hangs seen ran for minutes
ADDRESS_SPACE = 12 << 30


# ---- GGUF encoding and the layout of the default file (offsets from the gguf package's reader) ----

def u32(v: int) -> bytes:
    return struct.pack("<I", v % (1 << 32))


def u64(v: int) -> bytes:
    return struct.pack("<Q", v % (1 << 64))


def f32(v: float) -> bytes:
    return struct.pack("<f", v)


def gstr(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return u64(len(b)) + b


U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = 4, 5, 6, 7, 8, 9, 10, 11, 12


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return gstr(key) + u32(vtype) + payload


@dataclass
class Layout:
    path: Path
    fields: dict[str, list[int]]  # key -> offsets of its parts (key length, key, type, value parts...), end last
    tensors: list[tuple[str, list[int]]]  # name -> offsets of (name length, name, n_dims, dims, type, offset), end
    n_tensors: int
    n_kv: int
    kv_end: int
    info_end: int
    data_offset: int
    size: int


def gguf_layout(path: Path) -> Layout:
    import gguf

    r = gguf.GGUFReader(path)

    def offsets(field) -> list[int]:
        out, pos = [], field.offset
        for p in field.parts:
            out.append(pos)
            pos += p.nbytes
        return [*out, pos]

    fields = {k: offsets(f) for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = [(t.name, offsets(t.field)) for t in r.tensors]
    return Layout(path, fields, tensors, len(tensors), len(fields), tensors[0][1][0], tensors[-1][1][-1],
                  r.data_offset, path.stat().st_size)


class GGUFCases:
    """Builds case dicts for the worker: edits are (offset, bytes removed, bytes inserted) in the header."""

    def __init__(self, lay: Layout) -> None:
        self.lay, self.cases = lay, []

    def add(self, name: str, edits=(), flips=(), truncate=None, must_fail: bool = False) -> None:
        self.cases.append({"kind": "gguf", "name": name, "base": str(self.lay.path), "info_end": self.lay.info_end,
                           "data_offset": self.lay.data_offset, "edits": [(o, n, b.hex()) for o, n, b in edits],
                           "flips": list(flips), "truncate": truncate, "must_fail": must_fail})

    def overwrite(self, offset: int, data: bytes) -> tuple[int, int, bytes]:
        return offset, len(data), data

    def set_value(self, key: str, vtype: int, payload: bytes) -> list[tuple[int, int, bytes]]:
        """Replace a field's type and value (its size may change)."""
        f = self.lay.fields[key]
        return [(f[2], f[-1] - f[2], u32(vtype) + payload)]

    def insert(self, *pairs: bytes) -> list[tuple[int, int, bytes]]:
        """New key-value pairs after the last one, and the kv count raised to match."""
        return [(16, 8, u64(self.lay.n_kv + len(pairs))), (self.lay.kv_end, 0, b"".join(pairs))]

    def delete(self, key: str) -> list[tuple[int, int, bytes]]:
        f = self.lay.fields[key]
        return [(16, 8, u64(self.lay.n_kv - 1)), (f[0], f[-1] - f[0], b"")]


def gguf_cases(lay: Layout, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    c = GGUFCases(lay)
    ow = c.overwrite
    # header
    for name, off, data in [("magic", 0, b"GGUX"), ("version 1", 4, u32(1)), ("version 4", 4, u32(4)),
                            ("version big-endian", 4, u32(3 << 24)), ("version 2^32-1", 4, u32(-1))]:
        c.add(f"header {name}", [ow(off, data)], must_fail=True)
    for n in (0, 1, lay.n_tensors - 1, lay.n_tensors + 1, 1 << 40, -1):
        c.add(f"tensor_count {n}", [ow(8, u64(n))], must_fail=True)
    for n in (0, 1, lay.n_kv - 1, lay.n_kv + 1, 1 << 40, -1):
        c.add(f"kv_count {n}", [ow(16, u64(n))], must_fail=True)

    # numbers out of range, and of other types (arrays: per-layer values)
    u32_keys = ["llama.block_count", "llama.context_length", "llama.embedding_length", "llama.feed_forward_length",
                "llama.attention.head_count", "llama.attention.head_count_kv", "llama.vocab_size",
                "llama.rope.dimension_count"]
    for key in u32_keys:
        for v in (0, 7, 1 << 31, (1 << 32) - 1):
            c.add(f"{key} = {v}", c.set_value(key, U32, u32(v)), must_fail=(key, v) != ("llama.context_length", 7))
    for key in u32_keys:
        c.add(f"{key} as a string", c.set_value(key, STRING, gstr("30")), must_fail=True)
        c.add(f"{key} as an array", c.set_value(key, ARRAY, u32(U32) + u64(30) + u32(9) * 30), must_fail=True)
        c.add(f"{key} as f32", c.set_value(key, F32, f32(9.5)), must_fail=True)
        c.add(f"{key} as a negative i64", c.set_value(key, I64, struct.pack("<q", -9)), must_fail=True)
        if key not in ("llama.context_length", "llama.rope.dimension_count"):  # optional: one such case below
            c.add(f"{key} missing", c.delete(key), must_fail=key != "llama.vocab_size")
    c.add("head_count 8 (not dividing 576)", c.set_value("llama.attention.head_count", U32, u32(8)), must_fail=True)
    c.add("head_count_kv 2 (not dividing 9)", c.set_value("llama.attention.head_count_kv", U32, u32(2)),
          must_fail=True)
    c.add("head_count as u64", c.set_value("llama.attention.head_count", U64, u64(9)))
    for key in ("llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon"):
        for v in (0.0, -1.0, math.nan, math.inf) if "freq" in key else (-1.0, math.nan, math.inf, 1.5):
            c.add(f"{key} = {v}", c.set_value(key, F32, f32(v)), must_fail=True)
        c.add(f"{key} as a string", c.set_value(key, STRING, gstr("1e-5")), must_fail=True)
        c.add(f"{key} as an array", c.set_value(key, ARRAY, u32(F32) + u64(2) + f32(1.0) * 2), must_fail=True)
    # strings
    arch = lay.fields["general.architecture"]
    c.add("architecture qwen2", [ow(arch[4], b"qwen2")], must_fail=True)  # its keys are then missing
    c.add("architecture bloom", [ow(arch[4], b"bloom")], must_fail=True)
    c.add("architecture not UTF-8", [ow(arch[4], b"\xff\xfe\xfd\xfc\xfb")], must_fail=True)
    c.add("architecture as u32", c.set_value("general.architecture", U32, u32(7)), must_fail=True)
    c.add("architecture length 2^63", [ow(arch[3], u64(1 << 63))], must_fail=True)
    c.add("architecture length 1000", [ow(arch[3], u64(1000))], must_fail=True)
    c.add("tokenizer model bert", [ow(lay.fields["tokenizer.ggml.model"][4], b"bert")], must_fail=True)
    c.add("tokenizer model as an array", c.set_value("tokenizer.ggml.model", ARRAY, u32(U32) + u64(0)),
          must_fail=True)
    c.add("chat template as u32", c.set_value("tokenizer.chat_template", U32, u32(1)), must_fail=True)
    c.add("chat template bad Jinja", c.set_value("tokenizer.chat_template", STRING, gstr("{% for %}")),
          must_fail=True)
    c.add("general.name not UTF-8", [ow(lay.fields["general.name"][4], b"\xff\xff")])
    # vocabulary arrays and token ids
    tok = lay.fields["tokenizer.ggml.tokens"]
    for n in (0, 1, 49151, 49153, 1 << 62, -1):
        c.add(f"tokens count {n}", [ow(tok[4], u64(n))], must_fail=True)
    c.add("tokens element type u32", [ow(tok[3], u32(U32))], must_fail=True)
    c.add("tokens element type 13", [ow(tok[3], u32(13))], must_fail=True)
    c.add("first token length 2^63", [ow(tok[5], u64(1 << 63))], must_fail=True)
    merges, types = lay.fields["tokenizer.ggml.merges"], lay.fields["tokenizer.ggml.token_type"]
    for n in (0, 1 << 62):
        c.add(f"merges count {n}", [ow(merges[4], u64(n))], must_fail=True)
    c.add("token_type as strings", [ow(types[3], u32(STRING))], must_fail=True)
    c.add("token_type count 2^40", [ow(types[4], u64(1 << 40))], must_fail=True)
    c.add("merges as u32", c.set_value("tokenizer.ggml.merges", U32, u32(0)), must_fail=True)
    for key in ("bos_token_id", "eos_token_id", "padding_token_id"):
        c.add(f"{key} = 2^32-1", c.set_value(f"tokenizer.ggml.{key}", U32, u32(-1)))  # ignored
        c.add(f"{key} as a string", c.set_value(f"tokenizer.ggml.{key}", STRING, gstr("2")), must_fail=True)
    c.add("bos_token_id as i32 -1", c.set_value("tokenizer.ggml.bos_token_id", I32, struct.pack("<i", -1)),
          must_fail=True)
    # keys that were not there: rope scaling, alignment, a vocab size beyond the embedding
    rs = "llama.rope.scaling."
    c.add("rope scaling linear without factor (1)", c.insert(kv(rs + "type", STRING, gstr("linear"))))
    c.add("rope scaling factor a string", c.insert(kv(rs + "type", STRING, gstr("linear")),
                                                   kv(rs + "factor", STRING, gstr("x"))), must_fail=True)
    c.add("rope scaling factor 0", c.insert(kv(rs + "type", STRING, gstr("yarn")), kv(rs + "factor", F32, f32(0))),
          must_fail=True)
    c.add("rope scaling type u32", c.insert(kv(rs + "type", U32, u32(1)), kv(rs + "factor", F32, f32(2))),
          must_fail=True)
    c.add("rope scaling type magic", c.insert(kv(rs + "type", STRING, gstr("magic")), kv(rs + "factor", F32, f32(2))),
          must_fail=True)
    c.add("rope scaling linear 2", c.insert(kv(rs + "type", STRING, gstr("linear")), kv(rs + "factor", F32, f32(2))))
    c.add("rope scaling yarn, original context -1", c.insert(
        kv(rs + "type", STRING, gstr("yarn")), kv(rs + "factor", F32, f32(4)),
        kv(rs + "original_context_length", I32, struct.pack("<i", -1))), must_fail=True)
    for v in (0, 3, 1024, 1 << 40):  # the file's tensor sizes are multiples of 64: 1024 misaligns them
        c.add(f"alignment {v}", c.insert(kv("general.alignment", U64 if v > 1 << 32 else U32,
                                            u64(v) if v > 1 << 32 else u32(v))), must_fail=True)
    c.add("alignment as a string", c.insert(kv("general.alignment", STRING, gstr("32"))), must_fail=True)
    c.add("a duplicate key", c.insert(kv("llama.block_count", U32, u32(31))), must_fail=True)
    c.add("a key of 2^63 bytes", c.insert(u64(1 << 63)), must_fail=True)
    c.add("a value of type 99", c.insert(kv("x.y", 99, u32(1))), must_fail=True)
    c.add("an array of 2^61 u64", c.insert(kv("x.y", ARRAY, u32(U64) + u64(1 << 61))), must_fail=True)
    c.add("an array of arrays", c.insert(kv("x.y", ARRAY, u32(ARRAY) + u64(1) + u32(U32) + u64(1) + u32(5))))

    # tensor infos: names, dims, types, offsets
    def tensor(name: str) -> list[int]:
        return next(offs for n, offs in lay.tensors if n == name)

    emb, q, norm = tensor("token_embd.weight"), tensor("blk.0.attn_q.weight"), tensor("output_norm.weight")
    c.add("tensor renamed to an unknown name", [ow(q[1], b"blk.0.attn_x.weight")], must_fail=True)
    c.add("tensor renamed to a duplicate", [ow(q[1] + 4, b"1")], must_fail=True)
    c.add("tensor name length 2^63", [ow(q[0], u64(1 << 63))], must_fail=True)
    c.add("tensor name not UTF-8", [ow(q[1], b"\xff")], must_fail=True)
    for n in (0, 3, 9, 1 << 31):
        c.add(f"tensor n_dims {n}", [ow(q[2], u32(n))], must_fail=True)
    c.add("embedding rows 49153", [ow(emb[3] + 8, u64(49153))], must_fail=True)
    c.add("embedding rows 49151", [ow(emb[3] + 8, u64(49151))], must_fail=True)
    c.add("embedding rows 2^40", [ow(emb[3] + 8, u64(1 << 40))], must_fail=True)
    c.add("embedding columns 0", [ow(emb[3], u64(0))], must_fail=True)
    c.add("dims whose product wraps 2^64", [ow(q[3], u64(1 << 32) + u64(1 << 32))], must_fail=True)
    c.add("q rows 192 (k's shape)", [ow(q[3] + 8, u64(192))], must_fail=True)
    c.add("norm length 575", [ow(norm[3], u64(575))], must_fail=True)
    for name, t in (("F32", 0), ("F16", 1), ("Q8_0", 8), ("I32", 26), ("type 9999", 9999)):
        c.add(f"q type {name}", [ow(q[4], u32(t))], must_fail=True)  # larger: overlaps the next tensor
    c.add("q type Q4_0", [ow(q[4], u32(2))])  # smaller: garbage weights, a valid file
    c.add("norm type I32", [ow(norm[4], u32(26))], must_fail=True)
    data_size = lay.size - lay.data_offset
    for name, off in (("misaligned +1", 1), ("misaligned +16", 16), ("past the end", data_size),
                      ("2^63", 1 << 63), ("2^64-32", -32)):
        c.add(f"q offset {name}", [ow(q[5], u64(struct.unpack('<Q', lay_bytes(lay, q[5], 8))[0] + off))],
              must_fail=True)
    c.add("q data overlapping the embedding", [ow(q[5], u64(0))], must_fail=True)
    c.add("last tensor one byte past the end", [ow(norm[5], u64(data_size - 2304 + 32))], must_fail=True)

    # seeded byte flips: header and small values, tensor infos, the vocabulary, tensor data
    regions = [("header/values", 0, lay.fields["tokenizer.ggml.tokens"][0], 10),
               ("tensor infos", lay.kv_end, lay.info_end, 20), ("vocabulary", tok[0], lay.kv_end, 4)]
    for region, lo, hi, n in regions:
        for _ in range(n):
            off = rng.randrange(lo, hi)
            c.add(f"flip {region} @{off}", [ow(off, bytes([lay_bytes(lay, off, 1)[0] ^ (1 << rng.randrange(8))]))])
    off = rng.randrange(lay.data_offset, lay.size)
    c.add(f"flip tensor data @{off}", flips=[(off, 0xFF)])
    # truncations
    for cut in sorted({0, 3, 4, 12, 20, 100, tok[5] + 3, types[0] + 100, lay.kv_end + 5, lay.info_end - 1,
                       lay.data_offset + 10, lay.size - 1, *(rng.randrange(lay.size) for _ in range(6))}):
        c.add(f"truncated at {cut}", truncate=cut, must_fail=True)
    for i, case in enumerate(c.cases):
        case["quantized"] = i % 2 == 0  # both weight paths: quantized bf16 kernels, float reference
    return c.cases


_HEADS: dict[Path, bytes] = {}


def lay_bytes(lay: Layout, off: int, n: int) -> bytes:
    if lay.path not in _HEADS:
        with open(lay.path, "rb") as f:
            _HEADS[lay.path] = f.read(lay.data_offset)
    return _HEADS[lay.path][off:off + n]


# ---- the tiny HF folder ----

DROP = object()


def hf_cases(base: Path, root: Path, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    cases: list[dict] = []
    cfg0 = json.loads((base / "config.json").read_text())

    def case(name: str, must_fail: bool = False) -> Path:
        folder = root / f"hf{len(cases)}"
        shutil.copytree(base, folder)
        cases.append({"kind": "hf", "name": name, "path": str(folder), "must_fail": must_fail})
        return folder

    def config(name: str, must_fail: bool = True, **changes) -> None:
        cfg = dict(cfg0)
        cfg.update(changes)
        cfg = {k: v for k, v in cfg.items() if v is not DROP}
        (case(name, must_fail) / "config.json").write_text(json.dumps(cfg))

    for name, text in [("a list", "[1, 2]"), ("a string", '"qwen2"'), ("null", "null"), ("empty", ""),
                       ("{}", "{}"), ("not JSON", "{model_type: qwen2"), ("NaN", "NaN")]:
        (case(f"config.json {name}", True) / "config.json").write_text(text)
    (case("config.json not UTF-8", True) / "config.json").write_bytes(b'{"model_type": "\xff"}')
    numbers = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "vocab_size", "max_position_embeddings", "head_dim"]
    bad = [0, -1, "64", 64.5, 10**9, 2**63, [64, 64], True, {"a": 1}, 1e30, math.nan]
    for key in numbers:
        for v in rng.sample(bad, 5) + [10**9]:
            config(f"{key} = {v!r}", (key, v) != ("max_position_embeddings", 10**9), **{key: v})
    config("num_attention_heads 3 (not dividing 64)", num_attention_heads=3)
    config("num_key_value_heads 3 (not dividing 4)", num_key_value_heads=3)
    config("num_attention_heads 128 (head_dim 0)", num_attention_heads=128, num_key_value_heads=128)
    config("vocab_size below the tokenizer's", vocab_size=cfg0["vocab_size"] - 10)
    config("hidden_size 2^40", hidden_size=1 << 40)
    config("rms_norm_eps = 0", must_fail=False, rms_norm_eps=0)
    config("eos_token_id beyond the vocabulary (never generated)", must_fail=False, eos_token_id=[2, 10**6])
    for v in (0, -5, "1e4", math.inf, [1.0]):  # the hub's key (transformers 5 writes rope_parameters)
        config(f"rope_theta = {v!r}", rope_theta=v, rope_parameters=DROP)
    for key, vals in [("rms_norm_eps", [-1, "x", math.nan, [1e-6], 1e300]),
                      ("rope_scaling", ["linear", {"type": "linear"}, {"type": "yarn", "factor": "x"},
                                        {"rope_type": "llama3", "factor": 8.0}, {"type": 5, "factor": 2}, [1],
                                        {"type": "linear", "factor": -2}, {"type": "dynamic", "factor": math.nan},
                                        {"type": "magic", "factor": 2}]),
                      ("rope_parameters", [[1], "x", {"rope_theta": "x"}, {"rope_type": "yarn"}]),
                      ("model_type", [5, ["qwen2"], "bloom", None]),
                      ("eos_token_id", ["x", [1, "a"], -5, {"a": 1}]),
                      ("bos_token_id", ["x", -2]), ("pad_token_id", [[0], -3]),
                      ("tie_word_embeddings", ["no", 5]),
                      ("quantization_config", ["x", {"quant_method": "qianwen"}, [1]])]:
        for v in vals:
            config(f"{key} = {v!r}", **{key: v if v is not None else DROP})
    config("rope_scaling linear 2.0", must_fail=False, rope_scaling={"type": "linear", "factor": 2.0})
    config("unknown extra keys", must_fail=False, foo=[1, {"b": None}])

    # safetensors: header length, header JSON, dtypes, shapes, offsets, truncations
    st = (base / "model.safetensors").read_bytes()
    hlen = struct.unpack("<Q", st[:8])[0]
    header = json.loads(st[8:8 + hlen])

    def weights(name: str, data: bytes, must_fail: bool = True) -> None:
        (case(name, must_fail) / "model.safetensors").write_bytes(data)

    def with_header(h: dict) -> bytes:
        hb = json.dumps(h).encode()
        hb += b" " * (-len(hb) % 8)
        return u64(len(hb)) + hb + st[8 + hlen:]

    for cut in sorted({0, 4, 8, 20, hlen, 8 + hlen, 8 + hlen + 100, len(st) - 1, rng.randrange(len(st))}):
        weights(f"safetensors truncated at {cut}", st[:cut])
    weights("safetensors header length 2^63", u64(1 << 63) + st[8:])
    weights("safetensors header length 2^32", u64(1 << 32) + st[8:])
    weights("safetensors header length +1", u64(hlen + 1) + st[8:])
    for _ in range(8):
        off = 8 + rng.randrange(hlen)
        weights(f"safetensors header flip @{off}", st[:off] + bytes([st[off] ^ (1 << rng.randrange(7))]) + st[off + 1:],
                must_fail=False)
    name = "model.layers.0.self_attn.q_proj.weight"
    for field, value in [("dtype", "I32"), ("dtype", "BOOL"), ("dtype", "XX"), ("dtype", "F64"), ("shape", [64, 65]),
                         ("shape", [2**62, 2**62]), ("shape", [64]), ("shape", "x"), ("data_offsets", [0, 4]),
                         ("data_offsets", [0, 2**62]), ("data_offsets", [10, 0])]:
        h = json.loads(json.dumps(header))
        h[name][field] = value
        weights(f"safetensors {field} {value!r}", with_header(h))
    sd = load_file(base / "model.safetensors")
    for dtype in (torch.int32, torch.int64, torch.bool, torch.uint8):
        bad_sd = dict(sd)
        bad_sd[name] = sd[name].to(dtype)
        save_file(bad_sd, case(f"safetensors {name} as {dtype}", True) / "model.safetensors")
    bad_sd = dict(sd)
    bad_sd["model.layers.0.input_layernorm.weight"] = torch.full((64,), math.nan)
    save_file(bad_sd, case("a NaN norm weight (loads)") / "model.safetensors")
    bad_sd = dict(sd)
    bad_sd["model.layers.0.mlp.up_proj.weight"] = sd["model.layers.0.mlp.up_proj.weight"][:, :-1].contiguous()
    save_file(bad_sd, case("up_proj one column short", True) / "model.safetensors")

    # sharded index
    for name, wm in [("a list", ["model.safetensors"]), ("a string", "model.safetensors"), ("null", None),
                     ("values not strings", {k: 1 for k in sd}), ("a missing shard", {k: "nope.safetensors" for k in sd}),
                     ("a path outside", {k: "../../../../etc/passwd" for k in sd}), ("empty", {})]:
        (case(f"index weight_map {name}", True) / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": wm}))
    (case("index a list", True) / "model.safetensors.index.json").write_text("[]")
    (case("index not JSON", True) / "model.safetensors.index.json").write_text("{")

    # tokenizer and side files
    tj = (base / "tokenizer.json").read_bytes()
    for cut in (0, 10, len(tj) // 2):
        (case(f"tokenizer.json truncated at {cut}", True) / "tokenizer.json").write_bytes(tj[:cut])
    (case("tokenizer.json a list", True) / "tokenizer.json").write_text("[]")
    for _ in range(4):
        off = rng.randrange(len(tj))
        (case(f"tokenizer.json flip @{off}") / "tokenizer.json").write_bytes(
            tj[:off] + bytes([tj[off] ^ (1 << rng.randrange(7))]) + tj[off + 1:])
    t = json.loads(tj)
    t["added_tokens"].append({"id": cfg0["vocab_size"] + 5, "content": "<|beyond|>", "single_word": False,
                              "lstrip": False, "rstrip": False, "normalized": False, "special": True})
    (case("tokenizer id beyond the embedding rows", True) / "tokenizer.json").write_text(json.dumps(t))
    t = json.loads(tj)
    t["model"]["vocab"]["zzzz"] = cfg0["vocab_size"] + 100
    (case("tokenizer vocab id beyond the embedding rows", True) / "tokenizer.json").write_text(json.dumps(t))
    config("attention_bias 'yes' (unread for qwen2)", must_fail=False, attention_bias="yes")
    (case("tokenizer_config.json eos a number (ignored)") / "tokenizer_config.json").write_text('{"eos_token": 5}')
    for name, text in [("a list", "[]"), ("chat_template a number", '{"chat_template": 5}'),
                       ("not JSON", "{")]:
        (case(f"tokenizer_config.json {name}", True) / "tokenizer_config.json").write_text(text)
    (case("tokenizer_config.json bad Jinja", True) / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": "{% for %}"}))
    for name, text in [("a list", "[]"), ("eos a string", '{"eos_token_id": "x"}'), ("not JSON", "{"),
                       ("temperature a string", '{"temperature": "hot"}')]:
        (case(f"generation_config.json {name}", True) / "generation_config.json").write_text(text)
    (case("tokenizer files missing", True) / "tokenizer.json").unlink()
    return cases


# ---- running the cases ----

def _limit_memory() -> None:
    os.setsid()
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def run_cases(cases: list[dict], workdir: Path) -> list[dict]:
    """Each case's outcome: ok, error, traceback, hang or crash (see the module docstring)."""
    casefile, errfile = workdir / "cases.json", workdir / "worker.err"
    casefile.write_text(json.dumps(cases))
    shm = Path("/dev/shm")  # GGUF cases are ~100 MB each: written to memory, not to the disk, where possible
    scratch = Path(tempfile.mkdtemp(dir=shm if shm.is_dir() else workdir)) / "case.gguf"
    try:
        return _run(cases, casefile, errfile, scratch)
    finally:
        shutil.rmtree(scratch.parent)


def _run(cases: list[dict], casefile: Path, errfile: Path, scratch: Path) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "QIANWEN_DEBUG": "", "TQDM_DISABLE": "1"}
    results: dict[int, dict] = {}
    start = 0
    while start < len(cases):
        with open(errfile, "w") as err:
            proc = subprocess.Popen([sys.executable, str(WORKER), str(casefile), str(start), str(scratch)],
                                    stdout=subprocess.PIPE,
                                    stderr=err, text=True, env=env, preexec_fn=_limit_memory)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
        current = start
        while True:
            try:
                line = lines.get(timeout=CASE_SECONDS)
            except queue.Empty:
                os.killpg(proc.pid, 9)
                proc.wait()
                results[current] = {"outcome": "hang", "detail": f"no result after {CASE_SECONDS} s"}
                break
            if line is None:
                rc = proc.wait()
                if current not in results:
                    tail = errfile.read_text(errors="replace")[-300:]
                    results[current] = {"outcome": "crash", "detail": f"worker exit {rc}: {tail}"}
                break
            msg = json.loads(line)
            if "start" in msg:
                current = msg["start"]
            else:
                results[msg["i"]] = msg
        start = current + 1
    out = [{**case, **results[i]} for i, case in enumerate(cases)]
    (casefile.parent / "results.json").write_text(json.dumps(out))  # for a look after a failure
    return out


def check(results: list[dict]) -> None:
    bad = [r for r in results if r["outcome"] in ("traceback", "hang", "crash")]
    loaded = [r for r in results if r["must_fail"] and r["outcome"] == "ok"]
    multiline = [r for r in results if r["outcome"] == "error" and "\n" in r["detail"]]
    report = "\n".join(f"{r['outcome']}: {r['name']}: {r['detail']}" for r in bad + multiline) + "\n" + "\n".join(
        f"loaded although invalid: {r['name']}" for r in loaded)
    counts = {k: sum(r["outcome"] == k for r in results) for k in ("ok", "error", "traceback", "hang", "crash")}
    assert not bad and not loaded and not multiline, f"{counts}\n{report}"
    assert counts["error"] >= len(results) // 2  # the corruptions did corrupt


@pytest.fixture(scope="module")
def gguf_lay(default_gguf) -> Layout:
    return gguf_layout(default_gguf)


def test_corrupt_gguf_files(gguf_lay, tmp_path):
    check(run_cases(gguf_cases(gguf_lay), tmp_path))


def test_corrupt_hf_folders(tiny_qwen2_dir, tmp_path):
    check(run_cases(hf_cases(tiny_qwen2_dir, tmp_path), tmp_path))


def test_cli_info_on_a_corrupt_checkpoint_is_one_line(gguf_lay, tiny_qwen2_dir, tmp_path):
    sys.path.insert(0, str(WORKER.parent))
    from _corruption_worker import build_gguf

    c = GGUFCases(gguf_lay)
    c.add("block_count", c.set_value("llama.block_count", U32, u32(-1)))
    bad_gguf = build_gguf(c.cases[0], memoryview(gguf_lay.path.read_bytes()), tmp_path / "bad.gguf")
    bad_hf = tmp_path / "hf"
    shutil.copytree(tiny_qwen2_dir, bad_hf)
    (bad_hf / "config.json").write_text("[1, 2]")
    for bad in (bad_gguf, bad_hf):
        r = subprocess.run([sys.executable, "-m", "qianwen.cli.main", "info", "-m", str(bad)], capture_output=True,
                           text=True, timeout=CASE_SECONDS, env={**os.environ, "PYTHONPATH": str(REPO)},
                           preexec_fn=_limit_memory)
        assert r.returncode == 1, r.stderr[-2000:]
        assert r.stderr.startswith("error: ") and r.stderr.strip().count("\n") == 0, r.stderr[-2000:]
        assert str(bad) in r.stderr
