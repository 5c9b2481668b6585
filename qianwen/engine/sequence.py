"""A request's state inside the engine: its tokens, sampling state, text streaming and cache slot."""

from __future__ import annotations

import enum
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..generation.params import SamplingParams
from ..generation.sampling import make_generator
from ..generation.stops import StopMatcher
from ..tokenizer.stream import StreamDecoder

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class StepOutput:
    """One generated token of one sequence, as the engine reports it after a step."""

    seq_id: int
    token_id: int
    text: str  # newly complete text (stop strings never included)
    logprob: float | None
    top_logprobs: list[tuple[int, float]] | None
    finish_reason: str | None  # "stop", "length" or "abort" on the sequence's last output


@dataclass
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    decoder: StreamDecoder
    seq_id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None
    kv: Any = None  # the cache manager's slot while running
    num_cached: int = 0  # tokens whose K/V are in the cache
    extra: dict[str, Any] = field(default_factory=dict)  # per-sequence model state (Qwen-7B NTK alpha)
    generator: torch.Generator | None = None
    user_data: Any = None  # whatever the caller attached
    # fn(prompt_ids, output_ids, logits[V]) -> logits, applied before sampling (constrained decoding, tests)
    logits_processors: list[Callable[[list[int], list[int], torch.Tensor], torch.Tensor]] = field(
        default_factory=list)

    def __post_init__(self) -> None:
        self.stops = StopMatcher(self.params.stop)
        if self.generator is None and not self.params.greedy:
            self.generator = make_generator(self.params.seed)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def append(self, token: int, logprob: float | None, top: list[tuple[int, float]] | None) -> StepOutput:
        """Record a sampled token; decide whether the sequence ends here and what text it adds."""
        p = self.params
        self.output_ids.append(token)
        reason = None
        if token in p.stop_token_ids and not p.ignore_eos:
            text, _ = self.stops.feed(self.decoder.flush())
            text += self.stops.flush()
            reason = "stop"
        else:
            text, hit = self.stops.feed(self.decoder.push(token))
            if hit:
                reason = "stop"
            elif len(self.output_ids) >= self.max_new_tokens:
                text += self.stops.feed(self.decoder.flush())[0] + self.stops.flush()
                reason = "length"
        if reason:
            self.status, self.finish_reason = Status.FINISHED, reason
        return StepOutput(self.seq_id, token, text, logprob, top, reason)
