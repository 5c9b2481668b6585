"""The engine loop on a background thread, fed and drained from an asyncio event loop.

Each request gets an asyncio.Queue; the engine thread hands outputs to the event loop with
`call_soon_threadsafe`. Closing a request's stream (a client that went away) aborts its sequence,
which frees its cache at the next step boundary.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable

from .llm_engine import LLMEngine
from .sequence import Sequence, StepOutput


class AsyncEngine:
    def __init__(self, engine: LLMEngine, on_step: Callable[[float, int], None] | None = None) -> None:
        self.engine = engine
        self.on_step = on_step  # (seconds, tokens) per step, for metrics
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self._targets: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}

    def start(self) -> None:
        if self._thread is None:
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

        with torch.inference_mode():
            while not self._stop:
                if not self.engine.has_work():
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                t0 = time.perf_counter()
                try:
                    outputs = self.engine.step()
                except Exception as e:  # the whole step failed (one sequence's failure ends only that one,
                    # in LLMEngine.step): never leave clients hanging, end every sequence with the error
                    self.error = e
                    outputs = self._fail_all(e)
                if self.on_step and outputs:
                    self.on_step(time.perf_counter() - t0, sum(o.token_id >= 0 for o in outputs))
                for out in outputs:
                    # a finished sequence's target is dropped here too, in case its reader never started
                    target = self._targets.pop(out.seq_id, None) if out.finish_reason else \
                        self._targets.get(out.seq_id)
                    if target is not None:
                        loop, queue = target
                        try:
                            loop.call_soon_threadsafe(queue.put_nowait, out)
                        except RuntimeError:  # that event loop is closed
                            self._targets.pop(out.seq_id, None)

    def _fail_all(self, error: Exception) -> list[StepOutput]:
        eng = self.engine
        outs = []
        for seq in list(eng.seqs.values()):
            eng.scheduler.finish(seq)
            outs.append(StepOutput(seq.seq_id, -1, "", None, None, "error", f"{type(error).__name__}: {error}"))
        eng.seqs.clear()
        return outs

    def submit(self, seqs: list[Sequence], queue: asyncio.Queue | None = None) -> asyncio.Queue:
        """Queue built sequences; their outputs (tagged by seq_id) arrive on one asyncio queue."""
        queue = queue if queue is not None else asyncio.Queue()
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
