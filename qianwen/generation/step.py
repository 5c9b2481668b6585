"""The token step: one sequence's state from one row of logits to the next token and its text.

`TokenStepper.step(logits)` applies the logits processors (penalties first, then the caller's), samples,
takes the log-probabilities, appends the token and decides whether the sequence ends: a stop token, a
stop string, or the length budget. The text it returns is complete UTF-8 with stop strings removed; when
the sequence ends, an unfinished trailing character is dropped, never shown as U+FFFD. `stream_tokens`
(generation/generate.py) and the engine (engine/sequence.py) both run this one class.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from ..errors import QianwenError
from ..tokenizer.stream import StreamDecoder
from .params import SamplingParams
from .sampling import (
    LogitsProcessor,
    RepetitionPenalty,
    apply_processors,
    logprobs_of,
    make_generator,
    make_logits_processors,
    sample,
)
from .stops import StopMatcher

NO_IDS = np.empty(0, dtype=np.int64)


@dataclass
class TokenStep:
    token_id: int
    text: str  # newly emitted text: complete UTF-8, stop strings removed
    logprob: float | None  # None unless params.logprobs is set
    finish_reason: str | None = None  # "stop" or "length" on the last step
    top_logprobs: list[tuple[int, float]] | None = None


def check_prompt(n_prompt: int, context: int) -> None:
    if n_prompt == 0:
        raise QianwenError("the prompt is empty")
    if n_prompt >= context:
        raise QianwenError(f"the prompt has {n_prompt} tokens; this model's context is {context} tokens")


class TokenStepper:
    """Sampling state of one sequence. Any exception from `step` (a processor that raises, NaN logits:
    SamplingError) concerns this sequence only; the caller ends it and carries on with the others."""

    def __init__(self, tokenizer, prompt_ids: list[int], params: SamplingParams, max_new_tokens: int,
                 logits_processors: Iterable[LogitsProcessor] = ()) -> None:
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.params = params
        self.max_new_tokens = max_new_tokens
        self.processors = make_logits_processors(params, logits_processors)
        self.generator = None if params.greedy else make_generator(params.seed)
        self.decoder = StreamDecoder(tokenizer)
        self.stops = StopMatcher(params.stop)
        self.finish_reason: str | None = None

    @cached_property
    def fused(self) -> bool:
        """No log-probabilities and no processor but the repetition penalty: a caller holding many rows (the
        engine) applies the penalty and finds the largest logit (and top_k's threshold) for all of them at once
        (sampling.py `penalized_rows`, from `fused_inputs`) and passes them to `step`."""
        procs = self.processors
        return self.params.logprobs is None and len(procs) <= 1 and all(isinstance(f, RepetitionPenalty) for f in procs)

    def fused_inputs(self) -> tuple[np.ndarray, float, int]:
        """For a `fused` step: the ids the repetition penalty applies to now, the penalty (1.0: none) and the
        top_k a sampled step cuts at (0: none)."""
        top_k = 0 if self.params.greedy else self.params.top_k
        if not self.processors:
            return NO_IDS, 1.0, top_k
        pen = self.processors[0]
        return pen.seen(self.prompt_ids, self.output_ids), pen.penalty, top_k

    def step(self, logits: torch.Tensor, found: tuple[float, int, float | None] | None = None) -> TokenStep:
        """logits [V] float32 for the next token -> the chosen token and the text it completes. The
        processors change `logits` in place unless log-probabilities are asked for (they take the model's
        own). `found`: for a `fused` step, the penalty already applied to `logits` and (largest logit, its first
        index, top_k's threshold or None) found (`penalized_rows`)."""
        if found is not None and self.fused:
            token = sample(logits, self.params, self.generator, found)
        else:
            scores = apply_processors(self.processors, self.prompt_ids, self.output_ids, logits,
                                      copy=self.params.logprobs is not None)
            token = sample(scores, self.params, self.generator)
        lp, top = logprobs_of(logits, token, self.params.logprobs) if self.params.logprobs is not None \
            else (None, None)
        return self.append(token, lp, top)

    def append(self, token: int, logprob: float | None = None,
               top: list[tuple[int, float]] | None = None) -> TokenStep:
        """Record a chosen token; decide whether the sequence ends here and what text it adds."""
        p = self.params
        self.output_ids.append(token)
        reason = None
        if token in p.stop_token_ids and not p.ignore_eos:
            text, reason = self.stops.flush(), "stop"
        else:
            text, hit = self.stops.feed(self.decoder.push(token))
            if hit:
                reason = "stop"
            elif len(self.output_ids) >= self.max_new_tokens:
                text, reason = text + self.stops.flush(), "length"
        # ending here drops the bytes of an unfinished character (the decoder holds nothing else)
        self.finish_reason = reason
        return TokenStep(token, text, logprob, reason, top)
