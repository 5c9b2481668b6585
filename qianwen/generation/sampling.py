"""Penalties and token choice for one row of logits; the decode loop and the engine share these."""

from __future__ import annotations

import torch

from .params import SamplingParams


def apply_penalties(logits: torch.Tensor, context_ids: torch.Tensor, generated_ids: torch.Tensor,
                    p: SamplingParams) -> torch.Tensor:
    """logits [V] float32. Repetition penalty over prompt + output (as transformers and vLLM do);
    presence and frequency penalties over the output only (as OpenAI defines them)."""
    if p.repetition_penalty != 1.0 and context_ids.numel():
        ids = context_ids.unique()
        vals = logits[ids]
        logits[ids] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and generated_ids.numel():
        ids, counts = generated_ids.unique(return_counts=True)
        logits[ids] -= p.presence_penalty + p.frequency_penalty * counts.to(logits.dtype)
    return logits


def sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    """Choose a token from a penalised logits row [V] float32."""
    if p.greedy:
        return int(torch.argmax(logits))
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.min_p > 0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    if p.top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_p, dim=-1)
        drop = cum - sorted_p > p.top_p  # keep the smallest set whose mass reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, idx, sorted_p)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def logprobs_of(logits: torch.Tensor, token: int, top: int | None) -> tuple[float, list[tuple[int, float]] | None]:
    """The model's log-probability of `token` (before sampling transforms) and the `top` best alternatives."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    alts = None
    if top:
        v, i = torch.topk(lp, top)
        alts = list(zip(i.tolist(), v.tolist(), strict=True))
    return float(lp[token]), alts


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g
