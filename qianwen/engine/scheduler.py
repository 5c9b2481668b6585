"""Which sequences run this step: prefill chunks of new prompts within the budgets, decode the rest.

Policy: first come, first served. Every step decodes every running sequence whose prompt is cached, and
prefills at most `max_prefill_tokens` prompt tokens in all (chunked prefill): first the next chunks of
sequences already prefilling, then the first chunks of newly admitted ones. So a long prompt is spread
over several steps and never stalls the others' decoding for long. A sequence is admitted while there is
a free slot and KV budget for its tokens; its buffer is made for the whole prompt at once, and the longest
cached prefix of its prompt is copied in (prefix_cache.py), so its prefill starts after it. When a running
sequence needs a new cache block and none is free (cached prefix blocks are evicted first), the most
recently admitted sequence is preempted: its cache is freed and it waits at the front of the queue, to
be recomputed when it is admitted again.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .cache_manager import CacheManager
from .sequence import Sequence, Status


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 16  # running at once
    max_prefill_tokens: int = 512  # prompt tokens prefilled per step, over all sequences (chunked prefill)
    prefill_block: int = 64  # chunks end at multiples of it (model_runner.py); at least one block a step


@dataclass
class Schedule:
    prefill: list[Sequence] = field(default_factory=list)
    chunks: dict[int, int] = field(default_factory=dict)  # seq_id -> tokens to prefill this step
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
        seq.kv, seq.num_cached, seq.status, seq.prefilling = None, 0, Status.WAITING, False
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
        out.decode = [s for s in self.running if not s.prefilling]
        budget = self.config.max_prefill_tokens
        for seq in self.running:  # the next chunks of prompts being prefilled
            if seq.prefilling and budget > 0:
                budget -= self._chunk(out, seq, budget) or budget
        # admit waiting sequences
        while self.waiting and len(self.running) < self.config.max_num_seqs and budget > 0:
            seq = self.waiting[0]
            if seq.is_finished:  # aborted while waiting
                self.waiting.popleft()
                continue
            if out.preempted and seq in out.preempted:
                break  # just preempted for room: retry next step
            if out.prefill and budget < min(seq.num_tokens, self.config.prefill_block):
                break  # none of it would run now: admit it next step, when this step's blocks are cached
            got = self.cache.admit(seq.all_ids, seq.num_tokens + 1)
            if got is None:
                break
            self.waiting.popleft()
            (seq.kv, seq.num_cached), seq.status, seq.prefilling = got, Status.RUNNING, True
            self.running.append(seq)
            budget -= self._chunk(out, seq, budget) or budget
        return out

    def _chunk(self, out: Schedule, seq: Sequence, budget: int) -> int:
        """Schedule the next chunk of `seq`'s prefill within `budget` tokens: its rest if that fits, else
        whole prefill blocks (chunks end at block boundaries), at least one block in a step; returns its
        size (0: nothing fits this step)."""
        b, left = self.config.prefill_block, seq.num_tokens - seq.num_cached
        n = left if left <= budget else budget // b * b or (0 if out.prefill else b)
        if n:
            out.prefill.append(seq)
            out.chunks[seq.seq_id] = n
        return n

    def finish(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence and free its cache at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.cache.free(seq.kv)
        seq.kv = None
        seq.status = Status.FINISHED
