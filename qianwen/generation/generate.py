"""The decode loop: one public token iterator that the API, CLI, server and evaluation build on."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from ..fast.cache import StaticKVCache
from ..models.cache import KVCache
from ..models.layers import Transformer
from .params import SamplingParams
from .sampling import LogitsProcessor
from .step import TokenStep, TokenStepper, check_prompt


@torch.inference_mode()
def stream_tokens(net: Transformer, tokenizer, prompt_ids: list[int], params: SamplingParams,
                  context: int | None = None, logits_processors: Iterable[LogitsProcessor] = (),
                  kv_dtype: torch.dtype | None = None) -> Iterator[TokenStep]:
    """Yield one TokenStep per generated token; the last one carries the finish reason. An error of the
    token step (a processor that raises, NaN logits) is raised to the caller. `kv_dtype`: the KV cache's
    element type (default the model's; int8: fast/cache.py)."""
    context = context or net.config.max_position_embeddings
    check_prompt(len(prompt_ids), context)
    device = next(net.parameters()).device
    max_new = min(params.max_tokens, context - len(prompt_ids))
    # on the CPU, preallocated for the whole request (pages are touched only when written): no regrowth
    # copies while decoding; elsewhere a growing cache, so a long token budget reserves nothing up front
    # (unless the cache is to hold another dtype than the model's, which only the static cache does)
    own = kv_dtype in (None, net.model.norm.weight.dtype)
    cache = (StaticKVCache.for_model(net, 1, len(prompt_ids) + max_new, kv_dtype)
             if device.type == "cpu" or not own else KVCache(net.config.num_hidden_layers))
    stepper = TokenStepper(tokenizer, prompt_ids, params, max_new, logits_processors)
    # prefill: the lm_head runs on the last position only
    hidden = net.hidden_states(torch.tensor([prompt_ids], device=device), cache=cache)
    logits = net.compute_logits(hidden[:, -1:])[0, -1].cpu()
    while True:
        step = stepper.step(logits)
        yield step
        if step.finish_reason:
            return
        logits = net(torch.tensor([[step.token_id]], device=device), cache=cache)[0, -1].float().cpu()
