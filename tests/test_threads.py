"""Threads on a shared machine: $QIANWEN_THREADS takes effect at load (torch and the kernels' OpenMP
pool), the kernels' thread count follows the cores other processes leave free (qianwen.native's
CoreWatch), and results are bit for bit the same whatever the thread count."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

import qianwen
from qianwen import native
from qianwen.convert import quantize_folder
from qianwen.errors import QianwenError
from qianwen.fast import StaticKVCache

from .conftest import save_tiny

CPUS = sorted(os.sched_getaffinity(0))


@pytest.mark.parametrize("n", [1, 3])
def test_qianwen_threads_sets_torch_and_the_kernel_pool_at_load(tiny_qwen2_dir, n):
    """In a fresh process (libgomp reads its settings once): the parallel regions the kernels open really
    get n threads, in the loading thread and in a thread started later (the server's engine thread)."""
    code = (f"import threading, torch, qianwen\nfrom qianwen import native\n"
            f"qianwen.load({str(tiny_qwen2_dir)!r}, dtype='float32')\n"
            "seen = [torch.get_num_threads(), native.lib().team_size()]\n"
            "def later():\n    native.kernel_threads()\n    seen.append(native.lib().team_size())\n"
            "t = threading.Thread(target=later)\nt.start()\nt.join()\nprint(seen)\n")
    env = {**os.environ, "QIANWEN_THREADS": str(n), "QIANWEN_ADAPT_THREADS": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert eval(out.stdout.strip().splitlines()[-1]) == [n, n, n]


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_bad_qianwen_threads_is_one_clear_error(tiny_qwen2_dir, monkeypatch, value):
    monkeypatch.setenv("QIANWEN_THREADS", value)
    with pytest.raises(QianwenError, match="QIANWEN_THREADS must be a positive whole number"):
        qianwen.load(str(tiny_qwen2_dir), dtype="float32")


class FakeStat:
    """A /proc/stat the test writes, a clock and this process's CPU time the test moves."""

    def __init__(self, path):
        self.path, self.now, self.own = path, 100.0, 5.0
        self.ticks = {c: [0] * 8 for c in CPUS}  # user nice system idle iowait irq softirq steal
        self.write()

    def write(self):
        lines = ["cpu  0 0 0 0 0 0 0 0 0 0"] + [f"cpu{c} " + " ".join(map(str, t)) + " 0 0" for c, t in self.ticks.items()]
        self.path.write_text("\n".join(lines) + "\nintr 0\n")

    def advance(self, seconds: float, busy_cores: int, own_cpu: float, field: int = 0):
        """`seconds` pass with `busy_cores` cores busy (counted in `field`) and the rest idle; this
        process used `own_cpu` seconds of CPU in that time."""
        for i, c in enumerate(CPUS):
            self.ticks[c][field if i < busy_cores else 3] += int(100 * seconds)
        self.now += seconds
        self.own += own_cpu
        self.write()

    def watch(self, interval: float = 0.25) -> native.CoreWatch:
        w = native.CoreWatch(interval, str(self.path), clock=lambda: self.now, cpu_time=lambda: self.own)
        w.enabled = True
        return w


def test_thread_count_follows_the_cores_other_processes_keep_busy(tmp_path):
    fake = FakeStat(tmp_path / "stat")
    w, n = fake.watch(), len(CPUS)
    assert w.threads(n) == n  # one reading only: nothing measured yet, the count asked for
    fake.advance(1.0, busy_cores=n, own_cpu=n)  # every core busy, all of it this process
    assert w.threads(n) == n
    fake.advance(1.0, busy_cores=n, own_cpu=n - 1)  # another process kept one core busy
    assert w.threads(n) == max(1, n - 1) and w.threads(64) == max(1, n - 1)
    fake.advance(0.1, busy_cores=0, own_cpu=0)  # within the interval: no new reading
    assert w.threads(n) == max(1, n - 1)
    fake.advance(1.0, busy_cores=0, own_cpu=0)  # the others stopped
    assert w.threads(n) == n
    fake.advance(1.0, busy_cores=n, own_cpu=0, field=7)  # the hypervisor gave our cores away (steal)
    assert w.threads(n) == 1
    assert w.threads(1) == 1


def test_a_core_used_a_little_by_others_still_counts_as_free(tmp_path):
    fake = FakeStat(tmp_path / "stat")
    w = fake.watch()
    w.threads(2)
    fake.advance(1.0, busy_cores=len(CPUS), own_cpu=len(CPUS) - 0.1)  # others: 0.1 of a core
    assert w.threads(len(CPUS)) == len(CPUS)


def test_thread_count_follows_the_cpu_affinity():
    """Fewer cores allowed (taskset, a container's cpuset): at most that many threads."""
    if len(CPUS) < 2:
        pytest.skip("needs two CPUs")
    w = native.CoreWatch(interval=0)
    w.enabled = True
    try:
        os.sched_setaffinity(0, CPUS[:1])
        w.threads(len(CPUS))
        assert w.threads(len(CPUS)) == 1
    finally:
        os.sched_setaffinity(0, CPUS)


def test_busy_processes_on_every_core_leave_one_thread():
    """The real /proc/stat: with a spinning process per core, the other processes fill the machine."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in CPUS]
    try:
        w = native.CoreWatch(interval=0)
        w.enabled = True
        w.sample()
        time.sleep(0.5)  # what they do meanwhile is measured
        assert w.threads(len(CPUS) + 1) == 1
    finally:
        for p in busy:
            p.kill()
            p.wait()


def test_kernels_use_the_free_cores_and_come_back_to_torchs_setting(monkeypatch):
    """kernel_threads sets the calling thread's OpenMP count (torch's ops in it follow too) and
    remembers what torch was set to, so the count comes back once the cores are free again."""
    free = {"n": None}
    monkeypatch.setattr(native.watch, "threads", lambda want: want if free["n"] is None else min(want, free["n"]))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        free["n"] = 1
        assert native.kernel_threads() == 1
        assert native.lib().team_size() == 1 and torch.get_num_threads() == 1
        free["n"] = None
        assert native.kernel_threads() == 3 and native.lib().team_size() == 3
        torch.set_num_threads(2)  # a new setting from the user
        assert native.kernel_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module", params=[4, 8])
def wide(request, tmp_path_factory):
    """A tiny model wide enough that the kernels split its projections (64-row blocks) and its
    attention (256-position chunks) over threads."""
    src = save_tiny(tmp_path_factory.mktemp("src"), "qwen2", hidden_size=256, intermediate_size=512,
                    max_position_embeddings=2048)
    return quantize_folder(src, tmp_path_factory.mktemp(f"q{request.param}"), bits=request.param,
                           group_size=32 if request.param == 4 else None)


def test_decode_is_bit_identical_whatever_the_thread_count(wide, monkeypatch):
    monkeypatch.setattr(native.watch, "enabled", False)
    net = qianwen.load(str(wide), dtype=torch.bfloat16).net
    assert net.fast_decode is not None
    ids = [3 + i % 300 for i in range(600)]
    before, results = torch.get_num_threads(), []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(1)  # the prefill (torch's bf16 matmul) the same each time
            cache = StaticKVCache.for_model(net, 2, 620)
            with torch.inference_mode():
                net.hidden_states(torch.tensor([ids, ids[::-1]]), cache=cache)
                torch.set_num_threads(n)
                steps = [net(torch.tensor([[t], [t + 1]]), cache=cache)[:, -1].float() for t in (5, 17, 9)]
            assert native.lib().get_threads() == n
            results.append(torch.stack(steps))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def test_server_kernels_leave_a_core_to_the_front_end_while_few_sequences_run(tiny_qwen2_dir, monkeypatch):
    """With `frontend_cores=1` the engine thread runs small batches' decode steps on one thread fewer than
    asked, and steps with prompt tokens and batches of more than FRONTEND_MAX_SEQS on all of them, with the
    same tokens; the count asked for is back once the engine stops."""
    import asyncio

    from qianwen.engine import LLMEngine
    from qianwen.engine.async_engine import FRONTEND_MAX_SEQS, AsyncEngine

    model = qianwen.load(str(tiny_qwen2_dir), dtype="float32")
    params = model.params(max_tokens=4, temperature=0, ignore_eos=True)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        async def run(n: int, frontend: int) -> tuple[list[list[int]], list[int]]:
            eng = AsyncEngine(LLMEngine(model), frontend_cores=frontend)
            eng.start()
            try:
                async def collect(i: int) -> list[int]:
                    seq = eng.engine.make_sequence([3 + i % 5, 4, 5], params)
                    return [o.token_id async for o in eng.stream(seq)]

                return list(await asyncio.gather(*[collect(i) for i in range(n)])), list(eng.step_threads)
            finally:
                eng.shutdown()

        one, threads_one = asyncio.run(run(1, 1))
        many, threads_many = asyncio.run(run(FRONTEND_MAX_SEQS + 4, 1))
        assert torch.get_num_threads() == 2  # set back after the engine thread stopped
        ref_one, threads_all = asyncio.run(run(1, 0))
        assert threads_one[0] == 2 and set(threads_one[1:]) == {1} and set(threads_all) == {2}
        assert 2 in threads_many  # the big batch took every thread while more than FRONTEND_MAX_SEQS ran
        assert one == ref_one and many[0] == one[0]
    finally:
        torch.set_num_threads(before)


def test_serve_frontend_cores_default_and_bad_value(tiny_qwen2_dir):
    from qianwen.server import ServerConfig, create_app

    app = create_app(qianwen.load(str(tiny_qwen2_dir), dtype="float32"), config=ServerConfig(model_name="t"))
    assert app.state.engine.frontend_cores == int(len(os.sched_getaffinity(0)) >= 2)
    r = subprocess.run([sys.executable, "-m", "qianwen.cli.main", "serve", "--frontend-cores", "-1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--frontend-cores must be 0 or more" in r.stderr and "Traceback" not in r.stderr


def _run_choice(choice, n: int, steps: int, seconds: dict[int, float]) -> list[int]:
    """Drive `choice` as the engine thread does for `steps` steps of `n` sequences, each step taking
    seconds[count]; returns the counts used."""
    used, before = [], None
    for _ in range(steps):
        threads = choice.threads(n)
        choice.record(n, threads, seconds[threads], switched=before is not None and before != threads)
        used.append(threads)
        before = threads
    return used


def test_thread_choice_keeps_the_faster_count_and_measures_the_other_less_often():
    """ThreadChoice starts on the front end's count, measures every thread for PROBE_STEPS steps, keeps the
    faster, and measures the slower again after EXPLORE_STEPS[0] steps, then twice as many."""
    from qianwen.engine.async_engine import EXPLORE_STEPS, PROBE_STEPS, ThreadChoice

    faster_all = ThreadChoice(1, 2)
    used = _run_choice(faster_all, 1, 2 * PROBE_STEPS + 1, {1: 0.005, 2: 0.004})
    assert used[:PROBE_STEPS] == [1] * PROBE_STEPS and used[PROBE_STEPS:2 * PROBE_STEPS] == [2] * PROBE_STEPS
    assert used[-1] == 2  # every thread was faster: kept
    slower_all = ThreadChoice(1, 2)
    used = _run_choice(slower_all, 1, 4 * PROBE_STEPS + 3 * EXPLORE_STEPS[0] + 1,
                       {1: 0.004, 2: 0.009})
    probes = [i for i in range(1, len(used)) if used[i] == 2 and used[i - 1] == 1]
    # the other count again after EXPLORE_STEPS[0] steps on the faster one, then after twice as many
    assert probes == [PROBE_STEPS, 2 * PROBE_STEPS + EXPLORE_STEPS[0], 3 * PROBE_STEPS + 3 * EXPLORE_STEPS[0]]
    assert used[-1] == 1
    # batch sizes are measured apart: 4 sequences start on the front end's count again
    assert slower_all.threads(4) == 1 and faster_all.threads(4) == 1 and faster_all.threads(1) == 2


def test_thread_choice_follows_a_change_and_skips_the_step_after_a_switch():
    """When the kept count becomes the slower one (the machine got busy), the next measurement switches; the
    first step after each change of count (OpenMP resizing its team) is not counted."""
    from qianwen.engine.async_engine import EXPLORE_STEPS, PROBE_STEPS, ThreadChoice

    choice = ThreadChoice(1, 2)
    _run_choice(choice, 1, 2 * PROBE_STEPS + 1, {1: 0.005, 2: 0.004})
    assert choice.threads(1) == 2
    _run_choice(choice, 1, EXPLORE_STEPS[0] + PROBE_STEPS, {1: 0.005, 2: 0.008})
    assert choice.threads(1) == 1
    # a slow first step after each switch does not decide anything
    choice = ThreadChoice(1, 2)
    used, before = [], None
    for _ in range(2 * PROBE_STEPS + 1):
        threads = choice.threads(1)
        switched = before is not None and before != threads
        choice.record(1, threads, 1.0 if switched else {1: 0.005, 2: 0.004}[threads], switched)
        used.append(threads)
        before = threads
    assert used[-1] == 2


def test_server_engine_runs_few_sequences_on_either_count_with_the_same_tokens(tiny_qwen2_dir, monkeypatch):
    """With a front-end core the engine thread measures both thread counts on one stream (short probes here)
    and the tokens are those of an engine that always runs on every thread."""
    import asyncio

    from qianwen.engine import LLMEngine
    from qianwen.engine import async_engine as A

    monkeypatch.setattr(A, "PROBE_STEPS", 2)
    monkeypatch.setattr(A, "EXPLORE_STEPS", (4, 8))
    model = qianwen.load(str(tiny_qwen2_dir), dtype="float32")
    params = model.params(max_tokens=24, temperature=0, ignore_eos=True)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        async def run(frontend: int) -> tuple[list[int], list[int]]:
            eng = A.AsyncEngine(LLMEngine(model), frontend_cores=frontend)
            eng.start()
            try:
                seq = eng.engine.make_sequence([3, 4, 5], params)
                return [o.token_id async for o in eng.stream(seq)], list(eng.step_threads)
            finally:
                eng.shutdown()

        tokens, threads = asyncio.run(run(1))
        ref, threads_all = asyncio.run(run(0))
        assert set(threads) == {1, 2} and set(threads_all) == {2}
        assert tokens == ref and len(tokens) == 24
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(len(CPUS) < 2, reason="needs two cores for a team of two threads")
def test_release_pool_gives_back_the_calling_threads_openmp_threads():
    """In a fresh process: a parallel region on the main thread leaves its pool's thread alive; release_pool
    ends it (libgomp stops spinning at barriers once a process holds more OpenMP threads than cores)."""
    code = ("import os, torch\nfrom qianwen import native\ntorch.set_num_threads(2)\n"
            "tasks = lambda: len(os.listdir('/proc/self/task'))\nbefore = tasks()\n"
            "torch.ones(1 << 22).sum()\nopened = tasks()\nok = native.release_pool()\n"
            "print([opened - before, ok, tasks() - before])\n")
    env = {**os.environ, "QIANWEN_ADAPT_THREADS": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert eval(out.stdout.strip().splitlines()[-1]) == [1, True, 0]


def test_server_threads_that_stop_running_kernels_release_their_openmp_pools(tiny_qwen2_dir, monkeypatch):
    """AsyncEngine.start releases the starting thread's pool (the engine thread runs the kernels from then
    on), and the scoring thread releases its own after each prompt-scoring job."""
    import asyncio
    import threading

    from qianwen.engine import LLMEngine
    from qianwen.engine.async_engine import AsyncEngine
    from qianwen.server.metrics import Metrics
    from qianwen.server.serving import ServerConfig, Serving

    released: list[str] = []
    monkeypatch.setattr(native, "release_pool", lambda: released.append(threading.current_thread().name) or True)
    model = qianwen.load(str(tiny_qwen2_dir), dtype="float32")
    engine = AsyncEngine(LLMEngine(model))
    engine.start()
    try:
        assert released == [threading.current_thread().name]
        serving = Serving(model, engine, ServerConfig(model_name="tiny"), Metrics(*[lambda: 0] * 4, lambda: {}))
        scored = asyncio.run(serving.score([[3, 4, 5, 6]], 2))
        assert len(scored[0][0]) == 3
        assert released[1:] == [t.name for t in serving.scorer._threads]
        assert released[1].startswith("qianwen-score")
    finally:
        engine.shutdown()


def test_server_step_runs_wholly_on_the_cores_other_processes_leave(tiny_qwen2_dir, monkeypatch):
    """While other processes keep cores busy (CoreWatch), the engine thread lowers its count before the step,
    so torch's ops of the step run on it too, not only the kernels (a region on more threads would leave
    an OpenMP thread spinning beside the busy processes)."""
    import asyncio

    from qianwen.engine import LLMEngine
    from qianwen.engine.async_engine import AsyncEngine

    model = qianwen.load(str(tiny_qwen2_dir), dtype="float32")
    params = model.params(max_tokens=6, temperature=0, ignore_eos=True)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        async def run() -> tuple[list[int], list[int]]:
            eng = AsyncEngine(LLMEngine(model), frontend_cores=0)
            seen: list[int] = []
            step = eng.engine.step
            eng.engine.step = lambda: seen.append(torch.get_num_threads()) or step()
            eng.start()
            try:
                seq = eng.engine.make_sequence([3, 4, 5], params)
                return [o.token_id async for o in eng.stream(seq)], seen
            finally:
                eng.shutdown()

        ref, _ = asyncio.run(run())
        monkeypatch.setattr(native.watch, "threads", lambda want: 1)  # one core left free
        tokens, seen = asyncio.run(run())
        assert seen and set(seen) == {1} and tokens == ref
    finally:
        torch.set_num_threads(before)
