"""The C decode kernels (kernels.c): compiled once per machine with the system C compiler, cached in
$QIANWEN_HOME/kernels, loaded with ctypes. Without a compiler (or with QIANWEN_NATIVE=0) `lib()` is None
and everything runs on torch's own kernels, just slower.

The library is linked with -fopenmp, and torch has already loaded its libgomp.so.1 by then, so the
dynamic loader binds ours to that same runtime: one thread pool, sized by torch.set_num_threads (or
$QIANWEN_THREADS, applied at load by `set_threads`).

On a shared machine the kernels use fewer threads while other processes keep cores busy (`CoreWatch`):
a decode step is some 150 short parallel regions, and each one waits at its closing barrier for every
thread of the team; a thread the scheduler has put aside holds the step up for a whole time slice.

Each thread that opens a parallel region gets a pool of OpenMP threads of its own, kept while it lives, and
libgomp spins at its barriers only while the process holds no more OpenMP threads than it has cores; past
that every thread waiting at a barrier sleeps and is woken by a system call, several times per parallel
region. A thread that will not run kernels again (the one that loaded the model, before the server's engine
thread takes over) gives its pool back with `release_pool`."""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path

from ..errors import QianwenError
from ..paths import home

SOURCE = Path(__file__).with_name("kernels.c")
Ptr, Int, Long, Flt = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float
class Proj(ctypes.Structure):
    """kernels.c's `Proj`: one projection's kernel (4: q4_gemm, 8: q8_gemm, 16 / 32: dense_gemm on bf16 /
    fp32 weights) and its arguments."""

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
    "dense_gemm": [Ptr, Int, Int, Ptr, Int, Int, Ptr, Ptr, Long, Int],
    "rms_norm": [Ptr, Ptr, Int, Int, Long, Long, Ptr, Flt],
    "rope": [Ptr, Int, Int, Int, Long, Ptr, Ptr],
    "kv_store": [Ptr, Int, Long, Long, Long, Int, Int, Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, Int],
    "attend": [Ptr, Int, Int, Int, Int, Long, Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, Int, Ptr, Ptr],
    "silu_mul": [Ptr, Int, Int, Ptr],
    "penalized_rows": [Ptr, Long, Int, Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, Ptr],
    "set_threads": [Int],
    "team_size": [],
    "decode_layers": [Ptr, Int, Int, Int, Int, Int, Int, Int, Flt, Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, Ptr,
                      Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, Int],
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


def mirror_layout() -> list[int]:
    """What kernels.c's `struct_layout` should give: sizeof and field offsets of `Proj`, then `Layer`."""
    return [v for struct in (Proj, Layer)
            for v in (ctypes.sizeof(struct), *(getattr(struct, f[0]).offset for f in struct._fields_))]


def open_library(path: Path) -> ctypes.CDLL:
    """Load a built library; RuntimeError if its structs are not laid out as their ctypes mirrors here
    (decode_layers would read its descriptors wrong)."""
    so = ctypes.CDLL(str(path))
    for name, args in SIGNATURES.items():
        fn = getattr(so, name)
        fn.argtypes, fn.restype = args, None
    for name in ("get_threads", "team_size"):
        getattr(so, name).restype = ctypes.c_int
    so.struct_layout.argtypes, so.struct_layout.restype = [Ptr], ctypes.c_int
    buf = (ctypes.c_long * 64)()
    got, want = list(buf[:so.struct_layout(buf)]), mirror_layout()
    if got != want:
        raise RuntimeError(f"kernels.c's Proj/Layer layout {got} differs from native.py's mirror {want}")
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
        failure = f"could not build or load the CPU kernels ({e}); using torch kernels"
        print(f"qianwen: {failure}", file=sys.stderr)
        return None


def release_pool() -> bool:
    """Give back the calling thread's OpenMP threads (OpenMP 5's `omp_pause_resource_all`, soft: its next
    parallel region starts them again). Measured in a process that loaded the model on its main thread and
    decodes on another, two threads: 71000 context switches in 200 decode steps before, 640 after (the
    other thread's barriers spun again). False without the kernels or an OpenMP 5 runtime."""
    so = lib()
    fn = getattr(so, "omp_pause_resource_all", None) if so is not None else None  # from the libgomp it links
    if fn is None:
        return False
    fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
    return fn(1) == 0  # omp_pause_soft


def env_threads() -> int | None:
    """$QIANWEN_THREADS as a thread count (None when unset)."""
    raw = os.environ.get("QIANWEN_THREADS", "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise QianwenError(f"QIANWEN_THREADS must be a positive whole number of threads, not {raw!r}")
    return int(raw)


def set_threads(n: int | None = None) -> int:
    """Use `n` threads for torch and the kernels (default: $QIANWEN_THREADS; without either, torch's own
    count stays). Returns the count in effect. `qianwen.load` calls this, so the variable applies at load."""
    import torch

    n = n or env_threads()
    if n:
        torch.set_num_threads(n)
    try:
        watch.sample()  # the first reading: the first decode steps then know what loading saw
    except (OSError, ValueError):
        watch.enabled = False
    return torch.get_num_threads()


SLACK = 0.25  # a core counts as free while other processes use less than this much of it


class CoreWatch:
    """How many of the cores this process may run on (sched_getaffinity) other processes leave free.

    Measured, at most once every `interval` seconds, from the kernel's per-core busy and idle time
    (/proc/stat, steal time counting as busy) less this process's own CPU time: one small file read per
    interval. `free` is None before the first reading, or where /proc/stat cannot be read."""

    def __init__(self, interval: float = 0.25, stat: str = "/proc/stat",
                 clock: Callable[[], float] = time.monotonic, cpu_time: Callable[[], float] = time.process_time):
        self.interval, self.stat, self.clock, self.cpu_time = interval, stat, clock, cpu_time
        self.enabled = os.environ.get("QIANWEN_ADAPT_THREADS", "1") != "0"
        self.free: int | None = None
        self.last: tuple[float, float, dict[int, tuple[int, int]]] | None = None

    def counters(self) -> dict[int, tuple[int, int]]:
        """Per core: (busy, total) clock ticks since boot."""
        out = {}
        with open(self.stat) as f:
            for line in f:
                if line.startswith("cpu") and line[3:4].isdigit():
                    name, *fields = line.split()
                    v = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
                    out[int(name[3:])] = (sum(v) - v[3] - v[4], sum(v))
        return out

    def sample(self) -> int | None:
        """Take a reading. `free`: the cores this process may use, less those other processes kept
        busy since the last reading (the last measured value when no clock tick passed in between)."""
        now, own, cores = self.clock(), self.cpu_time(), self.counters()
        mine = os.sched_getaffinity(0) & cores.keys()
        cap = max(1, len(mine))
        last, self.last = self.last, (now, own, cores)
        if last is not None and now > last[0]:
            t0, own0, cores0 = last
            mine &= cores0.keys()
            total = sum(cores[c][1] - cores0[c][1] for c in mine)
            if total > 0:
                busy = sum(cores[c][0] - cores0[c][0] for c in mine) / total * len(mine)  # cores in use
                others = busy - (own - own0) / (now - t0)
                self.free = max(1, min(cap, math.floor(len(mine) - others + SLACK)))
                return self.free
        self.free = cap if self.free is None else min(cap, self.free)
        return self.free

    def threads(self, want: int) -> int:
        """`want` threads, or as many as there are free cores if fewer."""
        if not self.enabled or want <= 1:
            return want
        if self.last is None or self.clock() - self.last[0] >= self.interval:
            try:
                self.sample()
            except (OSError, ValueError):  # no /proc (not Linux): keep the count asked for
                self.enabled = False
                return want
        return min(want, self.free)


watch = CoreWatch()
_asked = threading.local()  # per thread (OpenMP's count is): what torch was set to, what we applied


def kernel_threads() -> int:
    """Set the calling thread's OpenMP thread count for the next kernel calls and return it: torch's
    setting, or fewer while other processes keep cores busy (`watch`). OpenMP's count is per thread,
    and torch's own ops in this thread follow it too; torch.get_num_threads() then reports it, so a
    value other than the one applied last is a new setting from the user."""
    import torch

    now = torch.get_num_threads()  # in a thread torch did not start, this is torch.set_num_threads's value
    if getattr(_asked, "applied", None) != now:
        _asked.want = now
    n = watch.threads(_asked.want)
    lib().set_threads(n)
    _asked.applied = n
    return n
