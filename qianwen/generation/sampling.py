"""Logits processors and token choice for one row of logits.

A logits processor is `fn(prompt_ids, output_ids, logits[V] float32) -> logits[V]`; it may change its
input in place. The penalties are processors too, and `make_logits_processors` lists the ones a
SamplingParams asks for followed by the caller's (as mlx-lm's `make_logits_processors` does), so
constrained decoding or a test's forcing plugs in with the same contract.

Rows are on the CPU (the engine and `stream_tokens` move them there). What every token pays runs where it
costs least right after a forward, which leaves nothing in cache (docs/server.md): for a batch's rows with no
processor but the repetition penalty, the penalty, the largest logit and top_k's threshold in one C call
(`penalized_rows`); for a single row, the greedy choice and the penalty on its numpy view; for a sampled row,
the cuts on its candidates only (`candidates`).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

from .. import native
from ..errors import QianwenError
from .params import SamplingParams

LogitsProcessor = Callable[[list[int], list[int], torch.Tensor], torch.Tensor]


class SamplingError(QianwenError):
    """This sequence cannot choose a token (NaN logits, every token masked): it ends with an error."""


class _Seen:
    """The distinct ids of prompt + output as an index array, kept up to date as the output grows (one sequence's
    lists only grow: the token step appends), so a step costs O(new tokens), not O(all tokens). Other lists
    (another sequence, a shorter output) rebuild it."""

    def __init__(self) -> None:
        self.prompt: list[int] | None = None
        self.output: list[int] | None = None
        self.n_out = 0
        self.seen: set[int] = set()
        self.ids = np.empty(0, dtype=np.int64)

    def __call__(self, prompt_ids: list[int], output_ids: list[int]) -> np.ndarray:
        if prompt_ids is not self.prompt or output_ids is not self.output or len(output_ids) < self.n_out:
            self.prompt, self.output, self.n_out = prompt_ids, output_ids, 0
            self.seen = set(prompt_ids)
            self.ids = np.array(sorted(self.seen), dtype=np.int64)
        new = []
        for t in output_ids[self.n_out:]:
            if t not in self.seen:
                self.seen.add(t)
                new.append(t)
        self.n_out = len(output_ids)
        if new:
            self.ids = np.concatenate([self.ids, np.array(new, dtype=np.int64)])
        return self.ids


class RepetitionPenalty:
    """The logits processor that divides positive logits (multiplies negative ones) of every token in prompt +
    output, as transformers and vLLM do. A step whose only processor it is can hand its ids and penalty to
    `penalized_rows` instead (step.py `TokenStepper.fused_inputs`)."""

    def __init__(self, penalty: float) -> None:
        self.penalty = penalty
        self.seen = _Seen()

    def __call__(self, prompt_ids: list[int], output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        _penalize(logits.numpy(), self.seen(prompt_ids, output_ids), self.penalty)
        return logits


def _penalize(row: np.ndarray, ids: np.ndarray, penalty: float) -> None:
    """The repetition penalty on a float32 row, in place: float32 arithmetic, bit for bit torch.where's."""
    vals = row[ids]
    with np.errstate(all="ignore"):  # overflow and a zero penalty give ±inf or NaN, as in torch
        row[ids] = np.where(vals > 0, vals / penalty, vals * penalty)


def presence_frequency_penalty(presence: float, frequency: float) -> LogitsProcessor:
    """Subtract `presence` once and `frequency` per occurrence for tokens in the output (OpenAI's definition)."""
    def fn(prompt_ids: list[int], output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if output_ids:
            ids, counts = torch.tensor(output_ids, dtype=torch.long).unique(return_counts=True)
            logits[ids] -= presence + frequency * counts.to(logits.dtype)
        return logits
    return fn


def make_logits_processors(p: SamplingParams, extra: Iterable[LogitsProcessor] = ()) -> list[LogitsProcessor]:
    """The processors `p` asks for (penalties), then `extra` in order."""
    out: list[LogitsProcessor] = []
    if p.repetition_penalty != 1.0:
        out.append(RepetitionPenalty(p.repetition_penalty))
    if p.presence_penalty or p.frequency_penalty:
        out.append(presence_frequency_penalty(p.presence_penalty, p.frequency_penalty))
    return out + list(extra)


def apply_processors(processors: Sequence[LogitsProcessor], prompt_ids: list[int], output_ids: list[int],
                     logits: torch.Tensor, copy: bool = True) -> torch.Tensor:
    """Run the processors in order on `logits` [V] float32: on a copy, or with `copy=False` on the row itself
    (a caller that has no further use for it saves a fresh allocation: 4-17 µs a 49k-entry row)."""
    scores = logits.clone() if processors and copy else logits
    for fn in processors:
        scores = fn(prompt_ids, output_ids, scores)
        if not isinstance(scores, torch.Tensor) or scores.shape != logits.shape:
            raise SamplingError(f"logits processor {getattr(fn, '__name__', fn)!r} returned "
                                f"{getattr(scores, 'shape', type(scores).__name__)}, not a tensor of {tuple(logits.shape)}")
    return scores.float()


def sample(scores: torch.Tensor, p: SamplingParams, generator: torch.Generator | None,
           found: tuple[float, int, float | None] | None = None) -> int:
    """Choose a token from a processed logits row [V] float32. Safe for every value: NaN or a row with every
    token masked raises SamplingError; +inf logits (a penalty divided by a tiny number) leave only those tokens;
    a tiny temperature never overflows (the best logit is subtracted before dividing).

    The cuts are transformers' and vLLM's: top_k keeps the k largest logits (ties with the k-th too), min_p
    then drops tokens less likely than min_p times the best, top_p keeps the smallest set of the rest whose
    probability reaches top_p. Only the candidates are worked on: top_k's (found with one topk over the
    row), else, for top_p, the most likely tokens until their mass passes top_p (`_top_mass`), so a step
    costs a few passes over the row instead of a sort of it: with top_k 20 and top_p 0.8 (Qwen's defaults)
    0.12 ms a 49k-entry row instead of 2.1, 0.27 ms a 152k-entry one instead of 6.3 (the 2-core dev VM).
    `found`: the row's largest logit, its first index and its top_k-th largest, already found (`penalized_rows`)."""
    best, index, kth = found if found is not None else (*row_maxima(scores)[0], None)
    token = best_token(best, index)
    if p.greedy:
        return token
    cand, weights = candidates(scores, best, p, kth)
    choice = _draw(weights, generator)
    return choice if cand is None else int(cand[choice])


def candidates(scores: torch.Tensor, best: float, p: SamplingParams, kth: float | None = None
               ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The tokens a sampled step may choose, after the cuts, and their unnormalized probabilities: (positions in
    the row, or None for the whole row; weights). `best`: the row's largest logit (finite or +inf); `kth`: its
    top_k-th largest, when already found."""
    cand = None
    if best == float("inf"):
        cand = torch.nonzero(scores == best)[:, 0]
        logits = torch.zeros(len(cand))
    elif 0 < p.top_k < scores.numel():
        if kth is None:
            kth = top_k_threshold(scores, p.top_k)
        cand = torch.nonzero(scores >= kth)[:, 0]
        logits = (scores[cand] - best) / p.temperature  # <= 0, the best exactly 0
    else:
        logits = (scores - best).div_(p.temperature)
    # unnormalized probabilities: the best token's is exp(0) = 1, so min_p compares with min_p itself and the
    # sum (of at least 1) never overflows
    weights = torch.exp(logits)
    total = float(weights.sum()) if p.top_p < 1.0 else 0.0
    if p.min_p > 0:  # the tokens left are the candidates now (the best always)
        kept = torch.nonzero(weights >= p.min_p)[:, 0]
        weights = weights[kept]
        cand = kept if cand is None else cand[kept]
    if p.top_p < 1.0:
        weights, order = _top_mass(weights, p.top_p * total)
        cum = torch.cumsum(weights, dim=-1)
        keep = int((cum - weights <= p.top_p * total).sum())  # the smallest set reaching top_p (the best always)
        weights, order = weights[:keep], order[:keep]
        cand = order if cand is None else cand[order]
    return cand, weights


def top_k_threshold(row: torch.Tensor, k: int) -> float:
    """The k-th largest value of a row (0 < k < its length): top_k keeps what is not below it."""
    return float(torch.topk(row, k, sorted=False).values.min())


def _draw(weights: torch.Tensor, generator: torch.Generator | None) -> int:
    """A position drawn with probability proportional to `weights` (>= 0, not all 0): the first whose running
    sum (float64) exceeds a uniform draw times the total. One pass; torch.multinomial draws an exponential
    variate per entry (0.7 ms a 49k-entry row on the 2-core dev VM)."""
    cum = torch.cumsum(weights, dim=0, dtype=torch.float64)
    x = torch.rand((1,), generator=generator, dtype=torch.float64) * cum[-1]
    i = int(torch.searchsorted(cum, x, right=True))
    return i if i < len(cum) else int(torch.nonzero(weights)[-1])  # x rounded up to the total


def _top_mass(weights: torch.Tensor, mass: float, first: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The largest weights, in descending order, and their positions: at least enough of them that those after
    them can not be in top_p's set (their sum exceeds `mass`): the first 64, 256, ... by topk, or the whole
    row sorted once a quarter of it would be needed."""
    n = weights.numel()
    m = min(first, n)
    while m < n // 4:
        values, order = torch.topk(weights, m)
        if float(values.sum()) > mass:
            return values, order
        m *= 4
    return torch.sort(weights, descending=True)


def row_maxima(rows: torch.Tensor) -> list[tuple[float, int]]:
    """(largest value, its first index) of each row of CPU logits [B, V] or [V] (as torch's max(dim=-1),
    a NaN counts as the largest: best_token then refuses the row), by numpy's argmax: 3 µs for a 49k-entry
    row, where torch's max takes 26."""
    a = rows.numpy().reshape(-1, rows.shape[-1])
    index = a.argmax(axis=1)
    return list(zip(a[np.arange(len(a)), index].tolist(), index.tolist(), strict=True))


def penalized_rows(rows: torch.Tensor, which: list[int], inputs: list[tuple[np.ndarray, float, int]]
                   ) -> list[tuple[float, int, float | None]]:
    """Rows `which` of CPU float32 logits [B, V], each after its repetition penalty (`inputs`: the ids it applies
    to, the penalty (1.0: none) and top_k (0: none)), which changes the rows in place: per row (largest value,
    its first index, and for 0 < top_k < V the top_k-th largest value), as `row_maxima` and `torch.topk` give them
    after `RepetitionPenalty`. On the C kernels one call for all the rows, on the threads that wrote them (the
    token step touches little Python after a forward that left nothing in cache); else numpy, row by row."""
    V = rows.shape[-1]
    ks = [k if 0 < k < V else 0 for _, _, k in inputs]  # top_k cuts nothing from V tokens or more
    so = native.lib() if rows.is_contiguous() and rows.dtype == torch.float32 else None
    if so is None:
        out = []
        for i, (ids, penalty, _), k in zip(which, inputs, ks, strict=True):
            if penalty != 1.0 and len(ids):
                _penalize(rows[i].numpy(), ids, penalty)
            best, index = row_maxima(rows[i])[0]
            out.append((best, index, top_k_threshold(rows[i], k) if k and best == best else None))
        return out
    n = len(which)
    base, stride = rows.data_ptr(), rows.stride(0) * 4
    ids = [np.ascontiguousarray(a, dtype=np.int64) for a, _, _ in inputs]  # held until the call returns
    best, index, kth = (ctypes.c_float * n)(), (ctypes.c_long * n)(), (ctypes.c_float * n)()
    so.penalized_rows((ctypes.c_void_p * n)(*(base + i * stride for i in which)), V, n,
                      (ctypes.c_void_p * n)(*(a.ctypes.data for a in ids)), (ctypes.c_long * n)(*map(len, ids)),
                      (ctypes.c_float * n)(*(p for _, p, _ in inputs)), (ctypes.c_int * n)(*ks),
                      best, index, kth)
    return [(b, i, k_th if k_th == k_th else None) for b, i, k_th in zip(best, index, kth, strict=True)]  # NaN: none


def best_token(best: float, index: int) -> int:
    """The greedy choice of a row whose largest logit `best` is first found at `index`; SamplingError for
    a row with NaN (max propagates it) or with every token masked."""
    if best != best:
        raise SamplingError("the logits contain NaN")
    if best == float("-inf"):
        raise SamplingError("every token is masked: no token can be chosen")
    return index


def logprobs_of(logits: torch.Tensor, token: int, top: int | None) -> tuple[float, list[tuple[int, float]] | None]:
    """The model's log-probability of `token` (before processors) and the `top` best alternatives."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    alts = None
    if top:
        v, i = torch.topk(lp, top)
        alts = list(zip(i.tolist(), v.tolist(), strict=True))
    value = float(lp[token])
    if value != value or (alts and any(x != x for _, x in alts)):
        raise SamplingError("the model's logits are not finite: no log-probability")
    return value, alts


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed % 2**64)  # any int64 (negative too) is a valid seed
    return g
