"""The decode loop: one public token iterator that the API, CLI, server and evaluation build on."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..errors import QianwenError
from ..fast.cache import StaticKVCache
from ..models.cache import KVCache
from ..models.layers import Transformer
from ..tokenizer.stream import StreamDecoder
from .params import SamplingParams
from .sampling import apply_penalties, logprobs_of, make_generator, sample
from .stops import StopMatcher


@dataclass
class TokenStep:
    token_id: int
    text: str  # newly emitted text: complete UTF-8, stop strings removed
    logprob: float
    finish_reason: str | None = None  # "stop" or "length" on the last step
    top_logprobs: list[tuple[int, float]] | None = None


def check_prompt(n_prompt: int, context: int) -> None:
    if n_prompt == 0:
        raise QianwenError("the prompt is empty")
    if n_prompt >= context:
        raise QianwenError(f"the prompt has {n_prompt} tokens; this model's context is {context} tokens")


@torch.inference_mode()
def stream_tokens(net: Transformer, tokenizer, prompt_ids: list[int], params: SamplingParams,
                  context: int | None = None, logits_processors: list[Callable] | None = None
                  ) -> Iterator[TokenStep]:
    """Yield one TokenStep per generated token; the last one carries the finish reason.
    `logits_processors`: fn(prompt_ids, output_ids, logits[V]) -> logits, applied after the penalties."""
    context = context or net.config.max_position_embeddings
    check_prompt(len(prompt_ids), context)
    device = next(net.parameters()).device
    max_new = min(params.max_tokens, context - len(prompt_ids))
    # on the CPU, preallocated for the whole request (pages are touched only when written): no regrowth
    # copies while decoding; elsewhere a growing cache, so a long token budget reserves nothing up front
    cache = (StaticKVCache.for_model(net, 1, len(prompt_ids) + max_new) if device.type == "cpu"
             else KVCache(net.config.num_hidden_layers))
    gen = make_generator(params.seed)
    decoder = StreamDecoder(tokenizer)
    stops = StopMatcher(params.stop)
    context_ids = torch.tensor(prompt_ids, dtype=torch.long)
    generated: list[int] = []
    # prefill: the lm_head runs on the last position only
    hidden = net.hidden_states(torch.tensor([prompt_ids], device=device), cache=cache)
    logits = net.lm_head(hidden[:, -1:])[0, -1].float().cpu()
    for i in range(max_new):
        out_ids = torch.tensor(generated, dtype=torch.long)
        scores = apply_penalties(logits.clone(), torch.cat([context_ids, out_ids]), out_ids, params)
        for fn in logits_processors or ():
            scores = fn(prompt_ids, generated, scores)
        token = sample(scores, params, gen)
        lp, top = logprobs_of(logits, token, params.logprobs)
        if token in params.stop_token_ids and not params.ignore_eos:
            text, _ = stops.feed(decoder.flush())
            yield TokenStep(token, text + stops.flush(), lp, "stop", top)
            return
        generated.append(token)
        text, hit = stops.feed(decoder.push(token))
        if hit:
            yield TokenStep(token, text, lp, "stop", top)
            return
        if i == max_new - 1:
            text += stops.feed(decoder.flush())[0] + stops.flush()
            yield TokenStep(token, text, lp, "length", top)
            return
        yield TokenStep(token, text, lp, None, top)
        logits = net(torch.tensor([[token]], device=device), cache=cache)[0, -1].float().cpu()
