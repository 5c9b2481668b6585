"""Run untrusted (model-generated) Python programs so that nothing they do can harm the machine.

Each program runs:
- as an unprivileged user `qwsandboxN` (one per parallel worker, created with `useradd` when missing,
  because RLIMIT_NPROC counts processes per user), never as root;
- in fresh network, mount and PID namespaces (`unshare -n -m -p -f --kill-child`): no network at all,
  and when the namespace's first process dies the kernel kills every process left in it;
- in its own session/process group, with a wall-clock timeout that kills the whole group;
- under RLIMIT_AS / CPU / NPROC / FSIZE / NOFILE limits;
- in a throwaway working directory: a small private tmpfs mounted on /tmp (it vanishes with the
  namespace); the other world-writable places (/var/tmp, /dev/shm, /run/lock) are covered by
  read-only mounts, so the rest of the filesystem is unwritable for the sandbox user;
- with a cleared environment and Python's isolated mode (`-I`).

Not running as root: no user switch is possible, so the program runs as the calling user inside a user
namespace (`unshare -r`) with the same limits, tmpfs and no network, and a warning says so.
"""

from __future__ import annotations

import os
import pwd
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..errors import QianwenError

USER_PREFIX = "qwsandbox"
MASKED_DIRS = ("/var/tmp", "/dev/shm", "/run/lock", "/dev/mqueue")

# Runs as (namespace) root inside the new namespaces, then drops to the sandbox user and execs Python.
# $1 program file, $2 uid, $3 gid, $4 tmpfs size, $5 python, then the prlimit options.
_LAUNCH = r"""
set -e
exec 3<"$1"
prog=$1; uid=$2; gid=$3; size=$4; py=$5; shift 5
mount -t tmpfs -o "size=$size,mode=0700,uid=$uid,gid=$gid,nosuid,nodev" qwsandbox /tmp
for d in MASKED; do
  if [ -d "$d" ]; then mount -t tmpfs -o ro,size=4k,nosuid,nodev,noexec qwsandbox-ro "$d" 2>/dev/null || true; fi
done
cat <&3 >/tmp/main.py
exec 3<&-
cd /tmp
if [ "$uid" = "$(id -u)" ]; then
  exec prlimit "$@" -- "$py" -I -B main.py
fi
chown "$uid:$gid" /tmp/main.py
exec prlimit "$@" -- setpriv --reuid="$uid" --regid="$gid" --clear-groups --no-new-privs -- "$py" -I -B main.py
""".replace("MASKED", " ".join(MASKED_DIRS))


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock
    cpu_s: int = 10
    memory_bytes: int = 1 << 30  # RLIMIT_AS
    nproc: int = 32  # processes of the sandbox user
    fsize_bytes: int = 16 << 20  # largest file it may write (stdout included)
    nofile: int = 64
    tmpfs_bytes: int = 32 << 20  # its working directory


@dataclass
class SandboxResult:
    status: str  # "passed" (exit 0), "failed" (non-zero exit or signal), "timeout"
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _world_executable(path: Path) -> bool:
    """True when any user can execute `path` (every ancestor directory searchable by others)."""
    try:
        if not (path.stat().st_mode & 0o005) == 0o005:
            return False
        return all(p.stat().st_mode & 0o001 for p in path.parents)
    except OSError:
        return False


def find_python() -> str:
    """An interpreter the sandbox user can run: $QIANWEN_SANDBOX_PYTHON, this one, or the system's."""
    env = os.environ.get("QIANWEN_SANDBOX_PYTHON")
    if env:
        return env
    for cand in (os.path.realpath(sys.executable), "/usr/bin/python3", "/usr/local/bin/python3"):
        if _world_executable(Path(cand)):
            return cand
    raise QianwenError("no Python interpreter readable by unprivileged users for the sandbox; "
                       "set QIANWEN_SANDBOX_PYTHON")


def ensure_users(n: int) -> list[tuple[int, int]]:
    """(uid, gid) of sandbox users qwsandbox0..n-1, creating missing ones (needs root)."""
    out = []
    for i in range(n):
        name = f"{USER_PREFIX}{i}"
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            if shutil.which("useradd") is None:
                raise QianwenError("useradd is not available to create sandbox users") from None
            proc = subprocess.run(["useradd", "--system", "--no-create-home", "--user-group",
                                   "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name],
                                  capture_output=True, text=True)
            try:  # another process may have created it at the same moment
                pw = pwd.getpwnam(name)
            except KeyError:
                raise QianwenError(f"could not create sandbox user {name}: {proc.stderr.strip()}") from None
        out.append((pw.pw_uid, pw.pw_gid))
    return out


def _uid_pids(uid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                for line in f:
                    if line.startswith("Uid:"):
                        if int(line.split()[1]) == uid:
                            pids.append(int(entry))
                        break
        except (OSError, ValueError):
            continue
    return pids


def kill_user_processes(uid: int, rounds: int = 50) -> None:
    """Kill every process of a sandbox user (belt and braces: the PID namespace already does it)."""
    if uid == 0 or uid == os.getuid():
        return
    for _ in range(rounds):
        pids = _uid_pids(uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)


def _tail(path: Path, limit: int) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - limit))
        return f.read().decode("utf-8", errors="replace")


class Sandbox:
    """A pool of `workers` sandbox users; `run` is thread-safe and blocks until a user is free."""

    def __init__(self, workers: int = 1, limits: Limits | None = None, python: str | None = None):
        for tool in ("unshare", "prlimit", "setpriv"):
            if shutil.which(tool) is None:
                raise QianwenError(f"the code sandbox needs `{tool}` (util-linux), which is not installed")
        self.limits = limits or Limits()
        self.python = python or find_python()
        self.root = os.geteuid() == 0
        if self.root:
            users = ensure_users(workers)
        else:
            warnings.warn("not running as root: sandboxed programs run as the calling user "
                          "(namespaces and limits still apply)", stacklevel=2)
            users = [(os.getuid(), os.getgid())] * workers
        self._free: queue.Queue[tuple[int, int]] = queue.Queue()
        for u in users:
            self._free.put(u)
        self._lock = threading.Lock()

    def _command(self, prog: Path, uid: int, gid: int) -> list[str]:
        lim = self.limits
        ns = ["unshare", "-n", "-m", "-p", "-f", "--kill-child", "--mount-proc"]
        if not self.root:
            ns.insert(1, "-r")
            uid_arg = gid_arg = "0"  # the caller is root inside its own user namespace
        else:
            uid_arg, gid_arg = str(uid), str(gid)
        rl = [f"--as={lim.memory_bytes}", f"--cpu={lim.cpu_s}", f"--nproc={lim.nproc}",
              f"--fsize={lim.fsize_bytes}", f"--nofile={lim.nofile}", "--core=0"]
        return [*ns, "--", "/bin/sh", "-c", _LAUNCH, "sh", str(prog), uid_arg, gid_arg,
                str(lim.tmpfs_bytes), self.python, *rl]

    def run(self, code: str, timeout_s: float | None = None, output_limit: int = 8192) -> SandboxResult:
        """Execute the Python source `code`; never raises for anything the program does."""
        timeout = self.limits.timeout_s if timeout_s is None else timeout_s
        uid, gid = self._free.get()
        try:
            return self._run(code, uid, gid, timeout, output_limit)
        finally:
            self._free.put((uid, gid))

    def _run(self, code: str, uid: int, gid: int, timeout: float, output_limit: int) -> SandboxResult:
        if self.root:
            kill_user_processes(uid)  # a clean slate, so NPROC counts only this program
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8"}
        with tempfile.TemporaryDirectory(prefix="qw-sandbox-") as tmpd:
            tmp = Path(tmpd)
            prog = tmp / "main.py"
            prog.write_text(code, encoding="utf-8")
            out_p, err_p = tmp / "stdout", tmp / "stderr"
            t0 = time.monotonic()
            with open(out_p, "wb") as out_f, open(err_p, "wb") as err_f:
                proc = subprocess.Popen(self._command(prog, uid, gid), stdin=subprocess.DEVNULL,
                                        stdout=out_f, stderr=err_f, env=env, cwd="/",
                                        start_new_session=True, close_fds=True)
                timed_out = False
                try:
                    rc = proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    timed_out = True
                    rc = None
                finally:
                    # unshare leads the group; killing it kills the namespace's init and so all of it
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
                    proc.wait()
            wall = time.monotonic() - t0
            if self.root:
                kill_user_processes(uid)
            stdout, stderr = _tail(out_p, output_limit), _tail(err_p, output_limit)
        status = "timeout" if timed_out else ("passed" if rc == 0 else "failed")
        return SandboxResult(status, rc, stdout, stderr, wall)
