"""The C decode kernels (kernels.c): compiled once per machine with the system C compiler, cached in
$QIANWEN_HOME/kernels, loaded with ctypes. Without a compiler (or with QIANWEN_NATIVE=0) `lib()` is None
and everything runs on torch's own kernels, just slower.

The library is linked with -fopenmp, and torch has already loaded its libgomp.so.1 by then, so the
dynamic loader binds ours to that same runtime: one thread pool, sized by torch.set_num_threads."""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

from ..paths import home

SOURCE = Path(__file__).with_name("kernels.c")
Ptr, Int, Long, Flt = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float
class Proj(ctypes.Structure):
    """kernels.c's `Proj`: one projection's kernel (4: q4_gemm, 8: q8_gemm) and its arguments."""

    _fields_ = [("kind", ctypes.c_int), ("K", ctypes.c_int), ("N", ctypes.c_int), ("Npad", ctypes.c_int),
                ("g", ctypes.c_int), ("w", ctypes.c_void_p), ("s", ctypes.c_void_p), ("bias", ctypes.c_void_p)]


class Layer(ctypes.Structure):
    """kernels.c's `Layer`: one decoder layer for `decode_layers`."""

    _fields_ = [("ln1", ctypes.c_void_p), ("ln2", ctypes.c_void_p), ("q_norm", ctypes.c_void_p),
                ("k_norm", ctypes.c_void_p), ("n_qkv", ctypes.c_int), ("n_gu", ctypes.c_int),
                ("qkv", Proj * 3), ("o", Proj), ("gu", Proj * 2), ("down", Proj)]


SIGNATURES = {
    "q4_gemm": [Ptr, Int, Int, Ptr, Ptr, Int, Int, Int, Ptr, Ptr, Long, Int],
    "q8_gemm": [Ptr, Int, Int, Ptr, Ptr, Int, Int, Ptr, Ptr, Long, Int],
    "rms_norm": [Ptr, Ptr, Int, Int, Long, Long, Ptr, Flt],
    "rope": [Ptr, Int, Int, Int, Long, Ptr, Ptr],
    "kv_store": [Ptr, Int, Long, Long, Long, Int, Int, Ptr, Ptr, Ptr, Ptr, Int],
    "attend": [Ptr, Int, Int, Int, Int, Long, Ptr, Ptr, Ptr, Ptr, Int, Ptr, Ptr],
    "silu_mul": [Ptr, Int, Int, Ptr],
    "set_threads": [Int],
    "decode_layers": [Ptr, Int, Int, Int, Int, Int, Int, Int, Flt, Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, Ptr,
                      Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, Int],
}
FLAG_SETS = (["-O3", "-march=native", "-fno-math-errno", "-fopenmp"],
             ["-O3", "-fno-math-errno", "-fopenmp"],
             ["-O3", "-fno-math-errno"])  # e.g. a compiler without OpenMP: single-threaded kernels
failure: str | None = None  # why the kernels are unavailable, for `qianwen info`-style reports


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _cpu_signature() -> str:
    """What -march=native depends on: a library built on one CPU may not run on another."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def build(cc: str, out: Path | None = None, flag_sets: tuple[list[str], ...] = FLAG_SETS) -> Path:
    """Compile kernels.c (cached by source, compiler and CPU unless `out` is given); the first of
    `flag_sets` that compiles wins."""
    if out is None:
        key = SOURCE.read_bytes() + cc.encode() + platform.machine().encode() + _cpu_signature().encode()
        out = home() / "kernels" / f"kernels-{hashlib.sha256(key).hexdigest()[:16]}.so"
        if out.exists():
            return out
    out.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for flags in flag_sets:
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            tmp_so = Path(tmp) / out.name
            cmd = [cc, *flags, "-shared", "-fPIC", "-o", str(tmp_so), str(SOURCE), "-lm"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode == 0:
                os.replace(tmp_so, out)  # atomic: a concurrent build or a crash never leaves half a file
                return out
            errors.append((proc.stderr.strip().splitlines() or ["?"])[-1])
    raise RuntimeError(f"{cc} failed: {errors[0]}")


def open_library(path: Path) -> ctypes.CDLL:
    so = ctypes.CDLL(str(path))
    for name, args in SIGNATURES.items():
        fn = getattr(so, name)
        fn.argtypes, fn.restype = args, None
    so.get_threads.argtypes, so.get_threads.restype = [], ctypes.c_int
    return so


@cache
def lib() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (the reason is in `failure`)."""
    global failure
    if os.environ.get("QIANWEN_NATIVE", "1") == "0":
        failure = "disabled by QIANWEN_NATIVE=0"
        return None
    import torch  # noqa: F401  (loads libgomp first, so the library shares torch's OpenMP runtime)

    cc = _compiler()
    if cc is None:
        failure = "no C compiler found (set CC); using torch kernels"
        return None
    try:
        return open_library(build(cc))
    except (OSError, RuntimeError) as e:
        failure = f"could not build the CPU kernels ({e}); using torch kernels"
        print(f"qianwen: {failure}", file=sys.stderr)
        return None
