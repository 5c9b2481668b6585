"""The engine loop on a background thread, fed and drained from an asyncio event loop.

Each request gets an asyncio.Queue; after each step the engine thread hands that step's outputs to each
event loop in one `call_soon_threadsafe`. Closing a request's stream (a client that went away) aborts its
sequence, which frees its cache at the next step boundary.

Sharing the cores: when the kernels' threads took every core this process may run on (the CPU engine's
default on a quiet machine; fewer while other processes keep cores busy), the event loop's work for a step (waking the readers, formatting and writing the stream chunks)
would run beside the next step's parallel regions, whose barriers then wait for a thread the scheduler has
put aside (docs/server.md measures it). So after a step with few outputs (HANDOFF_WAIT_MAX_OUTPUTS) the engine
thread waits, at most HANDOFF_WAIT seconds, until the loop has run the readers it woke; the loop never waits for the engine, and a slow client never holds it up
(its writes are buffered by the transport).

A core for the front end, when that is faster: a step of a few sequences is short, and the event loop, the
HTTP streams and the clients' own processes need a core every few milliseconds. With `frontend_cores` (the
server's default: one, on a CPU with two or more cores) a decode step of at most FRONTEND_MAX_SEQS sequences runs
either on that many kernel threads fewer (the front end works beside the step) or on all of them (the step
is shortest, and the engine waits for the loop as above, so the two take turns instead of stalling each other).
Which is faster depends on the cores, the model, the clients and the machine's other load, so `ThreadChoice`
measures it as the server runs: each batch size's steps run mostly on the count that served them faster and
now and then on the other, to notice a change. Bigger batches run on every thread (their long steps suffer
less from the front end's work; vLLM's CPU backend also keeps cores for its front end), and so do steps
with prompt tokens (long, and the front end has nothing to do until they end). Results do not
depend on the thread count (docs/conventions.md).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable

from .. import native
from .llm_engine import LLMEngine
from .sequence import Sequence, StepOutput

HANDOFF_WAIT = 0.01  # seconds the engine thread waits for an event loop to take a step's outputs
# the loop's work grows with the outputs it is handed, the stall it causes beside a step does not: waiting
# paid off for steps of 1-2 outputs and lost for 4 (docs/server.md)
HANDOFF_WAIT_MAX_OUTPUTS = 2
# up to this many sequences a step may run on the cores the front end leaves (the module docstring); bigger
# batches' long steps run on every thread
FRONTEND_MAX_SEQS = 8
PROBE_STEPS = 8  # steps per measurement of the other thread count (their median is compared)
# steps on the faster count before the other is measured again: doubled each time the other lost again
EXPLORE_STEPS = (128, 2048)

Target = tuple[asyncio.AbstractEventLoop, asyncio.Queue]


def _deliver(loop: asyncio.AbstractEventLoop, items: list[tuple[asyncio.Queue, StepOutput]],
             done: threading.Event | None) -> None:
    """On the event loop: queue a step's outputs; `done` is set once the readers they wake have run
    (callbacks run in order, and each woken reader was scheduled before this one)."""
    for queue, out in items:
        queue.put_nowait(out)
    if done is not None:
        loop.call_soon(done.set)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class ThreadChoice:
    """Which of two kernel thread counts (`few`, `every`) serves steps of each batch size faster, from the
    time between the starts of consecutive steps (the step, the hand-over and any wait for the event loop).
    Each batch size starts on `few`; after PROBE_STEPS steps it runs PROBE_STEPS on `every`, then keeps
    the count whose last PROBE_STEPS steps had the shorter median, and measures the other again after
    EXPLORE_STEPS[0] steps, twice as many each time the other loses again (at most EXPLORE_STEPS[1]). The
    first step after a change of count is not measured (OpenMP resizes its team)."""

    def __init__(self, few: int, every: int) -> None:
        self.few, self.every = few, every
        self.best: dict[int, int] = {}  # batch size -> the count its steps run on
        self.times: dict[tuple[int, int], deque[float]] = {}  # (batch size, count) -> recent step times
        self.left: dict[int, int] = {}  # batch size -> steps until the other count is measured (<= 0: it is)
        self.gap: dict[int, int] = {}  # batch size -> steps between measurements of the other count

    def threads(self, n: int) -> int:
        """The count for the next step of `n` sequences."""
        best = self.best.setdefault(n, self.few)
        left = self.left.setdefault(n, PROBE_STEPS)
        return best if left > 0 else (self.every if best == self.few else self.few)

    def record(self, n: int, threads: int, seconds: float, switched: bool) -> None:
        """A step of `n` sequences (counted by `threads(n)` just before) on `threads` took `seconds` until
        the next began; `switched`: the step before ran on another count."""
        if not switched:
            self.times.setdefault((n, threads), deque(maxlen=PROBE_STEPS)).append(seconds)
        self.left[n] -= 1
        if self.left[n] > -PROBE_STEPS:
            return
        few, every = (self.times.get((n, c)) for c in (self.few, self.every))
        best = self.best[n]
        if few and every:
            self.best[n] = self.every if statistics.median(every) < statistics.median(few) else self.few
        gap = self.gap.get(n, EXPLORE_STEPS[0] // 2)
        self.gap[n] = min(2 * gap, EXPLORE_STEPS[1]) if self.best[n] == best else EXPLORE_STEPS[0]
        self.left[n] = self.gap[n]


class AsyncEngine:
    def __init__(self, engine: LLMEngine, on_step: Callable[[float, int], None] | None = None,
                 wait_for_loop: bool | None = None, frontend_cores: int = 0) -> None:
        self.engine = engine
        self.on_step = on_step  # (seconds, tokens) per step, for metrics
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self._targets: dict[int, Target] = {}
        # None: on a CPU, wait after each step whose kernels took every core (module docstring)
        self.wait_for_loop = wait_for_loop
        self._cores = usable_cores() if engine.model.device.type == "cpu" else None
        self.frontend_cores = frontend_cores if self._cores is not None else 0
        self.step_threads: deque[int] = deque(maxlen=64)  # the kernels' thread count of recent steps (tests)
        self.choice: ThreadChoice | None = None  # with frontend_cores, set when the engine thread starts

    def start(self) -> None:
        if self._thread is None:
            if self._cores is not None:  # the kernels run on the engine thread from now on: this thread's
                native.release_pool()  # OpenMP pool would make the engine's barriers sleep (qianwen/native)
            self._thread = threading.Thread(target=self._loop, name="qianwen-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        import torch

        every = torch.get_num_threads()  # the user's setting ($QIANWEN_THREADS, --threads), in this thread
        few = max(1, every - self.frontend_cores)
        self.choice = ThreadChoice(few, every) if few < every else None
        try:
            self._steps(every)
        finally:  # torch.set_num_threads also sets the count threads started later begin with
            torch.set_num_threads(every)

    def _steps(self, every: int) -> None:
        import torch

        # the step before, for `choice`: (sequences, threads, whether its count differed from the one before, start)
        last: tuple[int, int, bool, float] | None = None
        threads = every
        with torch.inference_mode():
            while not self._stop:
                if not self.engine.has_work():
                    last = None  # an idle gap is no step's time
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                t0 = time.perf_counter()
                if last is not None and self.choice is not None:
                    self.choice.record(last[0], last[1], t0 - last[3], last[2])
                n, before = self.engine.num_running + self.engine.num_waiting, threads  # arrivals too
                # a step with prompt tokens is long and leaves the front end nothing to do: every thread, and
                # its time says nothing of the decode steps `choice` compares
                chosen = self.choice is not None and n <= FRONTEND_MAX_SEQS and not self.engine.prefill_pending
                threads = self.choice.threads(n) if chosen else every
                last = (n, threads, threads != before, t0) if chosen else None
                # fewer while other processes keep cores busy (qianwen/native's CoreWatch), decided once for the
                # whole step: torch's ops too, and the kernels' own checks inside it can only lower it
                use = native.watch.threads(threads) if self._cores is not None else threads
                if torch.get_num_threads() != use:
                    torch.set_num_threads(use)  # this thread's count: the kernels follow it (qianwen/native)
                self.step_threads.append(threads)
                try:
                    outputs = self.engine.step()
                except Exception as e:  # the whole step failed (one sequence's failure ends only that one,
                    # in LLMEngine.step): never leave clients hanging, end every sequence with the error
                    self.error = e
                    outputs = self._fail_all(e)
                if self.on_step and outputs:
                    self.on_step(time.perf_counter() - t0, sum(o.token_id >= 0 for o in outputs))
                # torch.get_num_threads() in this thread: the count the step's kernels used (fewer than
                # asked while other processes keep cores busy, qianwen/native/)
                wait = self.wait_for_loop if self.wait_for_loop is not None else (
                    self._cores is not None and len(outputs) <= HANDOFF_WAIT_MAX_OUTPUTS
                    and torch.get_num_threads() >= self._cores)
                handed = self._hand_over(outputs, wait)
                deadline = time.monotonic() + HANDOFF_WAIT
                for done in handed:
                    done.wait(max(0.0, deadline - time.monotonic()))

    def _hand_over(self, outputs: list[StepOutput], wait: bool) -> list[threading.Event]:
        """One call into each event loop with this step's outputs for its readers; with `wait`, returns the
        events that say each loop has run them."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, StepOutput]]] = {}
        for out in outputs:
            # a finished sequence's target is dropped here too, in case its reader never started
            target = self._targets.pop(out.seq_id, None) if out.finish_reason else self._targets.get(out.seq_id)
            if target is not None:
                by_loop.setdefault(target[0], []).append((target[1], out))
        handed = []
        for loop, items in by_loop.items():
            done = threading.Event() if wait else None
            try:
                loop.call_soon_threadsafe(_deliver, loop, items, done)
            except RuntimeError:  # that event loop is closed
                for _, out in items:
                    self._targets.pop(out.seq_id, None)
                continue
            if done is not None:
                handed.append(done)
        return handed

    def _fail_all(self, error: Exception) -> list[StepOutput]:
        eng = self.engine
        outs = []
        for seq in list(eng.seqs.values()):
            eng.scheduler.finish(seq)
            outs.append(StepOutput(seq.seq_id, -1, "", None, None, "error", f"{type(error).__name__}: {error}"))
        eng.seqs.clear()
        return outs

    def submit(self, seqs: list[Sequence]) -> asyncio.Queue:
        """Queue built sequences; their outputs (tagged by seq_id) arrive on one asyncio queue."""
        queue: asyncio.Queue = asyncio.Queue()
        target = (asyncio.get_running_loop(), queue)
        for seq in seqs:
            self._targets[seq.seq_id] = target
            self.engine.add(seq)
        self._wake.set()
        return queue

    def release(self, seqs: list[Sequence]) -> None:
        """Stop delivering outputs of these sequences, aborting those still running (client gone)."""
        for seq in seqs:
            self._targets.pop(seq.seq_id, None)
            if not seq.is_finished:
                self.engine.abort(seq.seq_id)
        self._wake.set()

    async def stream(self, seq: Sequence) -> AsyncIterator[StepOutput]:
        """Outputs of one sequence until it finishes; leaving early aborts it."""
        queue = self.submit([seq])
        try:
            while True:
                out = await queue.get()
                yield out
                if out.finish_reason:
                    return
        finally:
            self.release([seq])
