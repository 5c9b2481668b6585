"""Which sequences run this step: admit waiting ones (prefill) within the budgets, decode the rest.

Policy: first come, first served. Every step decodes all running sequences; new sequences are admitted
while there is a free slot, KV budget for their tokens and prefill budget left in this step (the first
admission of a step ignores the prefill budget so long prompts are never starved). When a running
sequence needs a new cache block and none is free, the most recently admitted sequence is preempted:
its cache is freed and it waits at the front of the queue, to be recomputed when it is admitted again.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .cache_manager import CacheManager
from .sequence import Sequence, Status


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 16  # running at once
    max_prefill_tokens: int = 2048  # prompt tokens prefilled per step (soft: one prompt always fits)


@dataclass
class Schedule:
    prefill: list[Sequence] = field(default_factory=list)
    decode: list[Sequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode


class Scheduler:
    def __init__(self, config: SchedulerConfig, cache: CacheManager) -> None:
        self.config, self.cache = config, cache
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def fits_ever(self, n_tokens: int) -> bool:
        """Whether a sequence of n_tokens can be cached even with the whole budget to itself."""
        return self.cache._round(n_tokens) <= self.cache.max_tokens

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.cache.free(seq.kv)
        seq.kv, seq.num_cached, seq.status = None, 0, Status.WAITING
        self.waiting.appendleft(seq)

    def schedule(self) -> Schedule:
        out = Schedule()
        # room for one more token in every running sequence, preempting the newest when needed
        for seq in list(self.running):
            if seq not in self.running:
                continue
            while not self.cache.ensure(seq.kv, seq.num_tokens, seq.num_cached):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
        out.decode = list(self.running)
        # admit waiting sequences
        budget = self.config.max_prefill_tokens
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if seq.is_finished:  # aborted while waiting
                self.waiting.popleft()
                continue
            need = seq.num_tokens
            if out.prefill and need > budget:
                break
            if out.preempted and seq in out.preempted:
                break  # just preempted for room: retry next step
            kv = self.cache.allocate(need + 1)
            if kv is None:
                break
            self.waiting.popleft()
            seq.kv, seq.num_cached, seq.status = kv, 0, Status.RUNNING
            self.running.append(seq)
            out.prefill.append(seq)
            budget -= need
        return out

    def finish(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence and free its cache at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.cache.free(seq.kv)
        seq.kv = None
        seq.status = Status.FINISHED
