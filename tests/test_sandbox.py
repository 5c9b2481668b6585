"""Hostile programs end as failures within their limits; the machine and the evaluator are unharmed."""

from __future__ import annotations

import os
import pwd
import tempfile
from pathlib import Path

import pytest

from qianwen.eval.sandbox import USER_PREFIX, Limits, Sandbox

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the full sandbox needs root (CI runs as root)")

LIMITS = Limits(timeout_s=4.0, cpu_s=3, memory_bytes=512 << 20, nproc=16, fsize_bytes=1 << 20)


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox(workers=2, limits=LIMITS)


@pytest.fixture()
def canary():
    # world-writable on purpose: only the sandbox, not file permissions, protects it
    d = Path(tempfile.mkdtemp(prefix="qw-canary-"))
    d.chmod(0o777)
    f = d / "canary.txt"
    f.write_text("alive")
    f.chmod(0o666)
    yield f
    f.unlink(missing_ok=True)
    d.rmdir()


def _sandbox_uids() -> set[int]:
    return {p.pw_uid for p in pwd.getpwall() if p.pw_name.startswith(USER_PREFIX)}


def _process_state() -> tuple[int, int]:
    """(processes owned by sandbox users, live descendants of this test process)."""
    uids, me, owned, children = _sandbox_uids(), os.getpid(), 0, 0
    for e in os.listdir("/proc"):
        if not e.isdigit():
            continue
        try:
            status = Path(f"/proc/{e}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(fields["Uid"].split()[1]) in uids:
            owned += 1
        if int(fields["PPid"]) == me and fields["State"].strip()[0] != "Z":
            children += 1
    return owned, children


WRITE_PROBE = (
    "for d in ['/var/tmp', '/dev/shm', '/work', '/', '/root']:\n"
    "    try:\n        open(d + '/qw-pwned', 'w').write('x')\n        ok = True\n"
    "    except OSError:\n        ok = False\n    assert not ok, d\n"
)

HOSTILE = {
    "fork_bomb": "import os\nwhile True:\n    os.fork()\n",
    "infinite_loop": "while True:\n    pass\n",
    "allocate_10gb": "x = bytearray(10 * 1024**3)\nprint(len(x))\n",
    "socket": "import socket\ns = socket.create_connection(('127.0.0.1', 22), timeout=1)\n",
    "socket_dns": "import urllib.request\nurllib.request.urlopen('http://pypi.org', timeout=2)\n",
    "delete_outside": "import os\nos.remove(CANARY)\n",
    "write_outside": "open(CANARY, 'w').write('pwned')\n",
    "huge_file": "open('big.bin', 'wb').write(b'x' * (64 << 20))\n",
    "kill_everyone": "import os, signal\nos.kill(-1, signal.SIGKILL)\nos.kill(1, signal.SIGKILL)\n"
                     "raise SystemExit(3)\n",
    "escape_group": "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(1000)\n"
                    "raise SystemExit(1)\n",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_program_contained(sandbox: Sandbox, canary: Path, name: str):
    before_owned, before_children = _process_state()
    code = HOSTILE[name].replace("CANARY", repr(str(canary)))
    res = sandbox.run(code)
    assert not res.passed, (name, res)
    # within its limits: at most the wall-clock timeout plus start/kill overhead
    assert res.wall_s < LIMITS.timeout_s + 3.0, res.wall_s
    if name == "infinite_loop":  # the wall clock or RLIMIT_CPU, whichever comes first under load
        assert res.status == "timeout" or res.returncode != 0
    if name == "allocate_10gb":
        assert "MemoryError" in res.stderr
    if name.startswith("socket"):
        assert "unreachable" in res.stderr or "Errno" in res.stderr or "URLError" in res.stderr
    assert canary.read_text() == "alive"
    after_owned, after_children = _process_state()
    assert after_owned == 0 and before_owned == 0
    assert after_children <= before_children


def test_write_outside_fails_as_assertion(sandbox: Sandbox):
    # write_tmp_dirs asserts inside the program that every write failed: exit 0 means all were refused
    res = sandbox.run(WRITE_PROBE + "print('refused')\n")
    assert res.passed and "refused" in res.stdout, res
    for d in ["/var/tmp", "/dev/shm", "/work", "/"]:
        assert not Path(d, "qw-pwned").exists()


def test_benign_program_runs_unprivileged_with_clean_env(sandbox: Sandbox):
    os.environ["QW_SECRET_TEST"] = "leak"
    try:
        res = sandbox.run("import os\nprint(os.getuid(), os.getcwd(), sorted(os.environ))\n"
                          "open('scratch.txt', 'w').write('ok')\nprint(open('scratch.txt').read())\n")
    finally:
        del os.environ["QW_SECRET_TEST"]
    assert res.passed, res
    uid, cwd, rest = res.stdout.split(" ", 2)
    assert int(uid) in _sandbox_uids() and int(uid) != 0
    assert "QW_SECRET_TEST" not in rest and "ok" in rest


def test_throwaway_workdir(sandbox: Sandbox):
    assert sandbox.run("open('left.txt', 'w').write('x')\n").passed
    res = sandbox.run("import os\nassert not os.path.exists('left.txt'), os.listdir('.')\n")
    assert res.passed, res


def test_parallel_runs(sandbox: Sandbox):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(sandbox.run, [f"print({i} * 2)" for i in range(8)]))
    assert [r.stdout.strip() for r in results] == [str(i * 2) for i in range(8)]
