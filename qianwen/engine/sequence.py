"""A request's state inside the engine: its token step (ids, sampling, stops, text) and its cache slot."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any

import torch

from ..generation.params import SamplingParams
from ..generation.step import TokenStepper

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class StepOutput:
    """One generated token of one sequence, as the engine reports it after a step."""

    seq_id: int
    token_id: int  # -1 when the sequence ended without a token (abort, error)
    text: str  # newly complete text (stop strings never included)
    logprob: float | None
    top_logprobs: list[tuple[int, float]] | None
    finish_reason: str | None  # "stop", "length", "abort" or "error" on the sequence's last output
    error: str | None = None  # what went wrong, with finish_reason "error"


@dataclass
class Sequence:
    stepper: TokenStepper
    seq_id: int = field(default_factory=lambda: next(_ids))
    status: Status = Status.WAITING
    finish_reason: str | None = None
    kv: Any = None  # the cache manager's slot while running
    num_cached: int = 0  # tokens whose K/V are in the cache
    prefilling: bool = False  # admitted, its prompt (or, after preemption, prompt + output) not all cached yet
    extra: dict[str, Any] = field(default_factory=dict)  # per-sequence model state (Qwen-7B NTK alpha)
    user_data: Any = None  # whatever the caller attached

    @property
    def prompt_ids(self) -> list[int]:
        return self.stepper.prompt_ids

    @property
    def output_ids(self) -> list[int]:
        return self.stepper.output_ids

    @property
    def params(self) -> SamplingParams:
        return self.stepper.params

    @property
    def max_new_tokens(self) -> int:
        return self.stepper.max_new_tokens

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def step(self, logits: torch.Tensor, found: tuple[float, int, float | None] | None = None) -> StepOutput:
        """Choose the next token from logits [V] float32 (raises what the token step raises); `found` as in
        `TokenStepper.step`."""
        s = self.stepper.step(logits, found)
        if s.finish_reason:
            self.status, self.finish_reason = Status.FINISHED, s.finish_reason
        return StepOutput(self.seq_id, s.token_id, s.text, s.logprob, s.top_logprobs, s.finish_reason)
