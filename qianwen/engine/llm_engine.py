"""The engine loop (schedule, prefill, decode, sample, collect) and the offline API `LLM`.

`LLMEngine` is synchronous and thread-safe for producers: `add` and `abort` may be called from any
thread while another thread calls `step()`; they take effect at the next step boundary.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..errors import QianwenError
from ..fast.cache import kv_cache_dtype
from ..generation.constrain import CONSTRAINT_OPTIONS
from ..generation.params import SamplingParams
from ..generation.sampling import LogitsProcessor, penalized_rows
from ..generation.step import TokenStepper, check_prompt
from .cache_manager import CacheManager
from .model_runner import ModelRunner
from .scheduler import Scheduler, SchedulerConfig
from .sequence import Sequence, Status, StepOutput

if TYPE_CHECKING:
    from ..api import Model  # the loaded model (type only: no upward import at run time)

# Tokens per prefill forward (at multiples of it) and per cached prefix block when prompts run in forwards
# of their own (model_runner.py: this alignment makes results independent of chunking and caching). Pieces
# of this size also run the quantized layers on their row-by-row kernels (quant/linear.py PREFILL_TOKENS).
PREFILL_BLOCK = 64
# Tokens per cached prefix block when every step is one forward of rows (model_runner.py `step_rows`): any
# chunking gives the same bits there, so blocks are small and a chat's next turn recomputes little.
ROW_BLOCK = 16


@dataclass
class EngineConfig:
    max_num_seqs: int = 16
    max_prefill_tokens: int = 512  # prompt tokens prefilled per step; longer prompts run in chunks
    kv_cache_mb: float = 2048.0  # KV cache budget (live sequences and cached prefix blocks)
    kv_cache_dtype: str = "auto"  # auto (the model's dtype), bfloat16, float32 or int8 (fast/cache.py)
    batch_invariant: bool = True
    prefix_caching: bool = True  # reuse the K/V of prompt prefixes earlier prefills computed


class LLMEngine:
    def __init__(self, model: Model, config: EngineConfig | None = None) -> None:
        self.model = model
        self.config = config = config or EngineConfig()
        c = model.config
        n_kv, head_dim = c.num_key_value_heads, c.head_dim
        kv_dtype = kv_cache_dtype(config.kv_cache_dtype, model.dtype)
        per_token = CacheManager.bytes_per_token(c.num_hidden_layers, n_kv, head_dim, kv_dtype)
        if config.max_prefill_tokens < 1:
            raise QianwenError("max_prefill_tokens must be at least 1")
        # Qwen-7B's dynamic NTK picks its rotary base from the whole prompt's length at its first forward:
        # such a prompt is prefilled in one piece and never starts from a cached prefix
        whole = bool(getattr(c, "use_dynamic_ntk", False))
        self.runner = ModelRunner(model.net, model.device, model.dtype, config.batch_invariant,
                                  1 << 62 if whole else PREFILL_BLOCK)
        block = 1 << 62 if whole else ROW_BLOCK if self.runner.rows else PREFILL_BLOCK
        self.cache = CacheManager(c.num_hidden_layers, n_kv, head_dim, kv_dtype, model.device,
                                  int(config.kv_cache_mb * 2**20) // per_token,
                                  prefix_block_size=block if config.prefix_caching and not whole else None,
                                  prefix_partial=self.runner.rows)
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, block if whole else config.max_prefill_tokens,
                                                   block), self.cache)
        self.context_length: int = model.context_length
        self._lock = threading.Lock()
        self._inbox: list[Sequence] = []
        self._aborts: set[int] = set()
        self.seqs: dict[int, Sequence] = {}
        self.num_steps = 0

    # ------------------------------------------------------------------ requests

    def make_sequence(self, prompt_ids: list[int], params: SamplingParams, user_data: Any = None,
                      logits_processors: Iterable[LogitsProcessor] = ()) -> Sequence:
        """Validate and build a sequence (not yet queued). Raises QianwenError for prompts that can't run.
        `logits_processors`: fn(prompt_ids, output_ids, logits[V] float32) -> logits, after the penalties."""
        n = len(prompt_ids)
        check_prompt(n, self.context_length)
        if not self.scheduler.fits_ever(n + 1):
            raise QianwenError(f"the prompt has {n} tokens; the KV cache holds {self.cache.max_tokens}")
        # never more than the context, nor more than the whole cache budget could ever hold
        max_new = min(params.max_tokens, self.context_length - n, self.cache.max_tokens - n)
        stepper = TokenStepper(self.model.tokenizer, prompt_ids, params, max(1, max_new), logits_processors)
        return Sequence(stepper, user_data=user_data)

    def add(self, seq: Sequence) -> Sequence:
        with self._lock:
            self._inbox.append(seq)
        return seq

    def add_request(self, prompt_ids: list[int], params: SamplingParams, user_data: Any = None,
                    logits_processors: Iterable[LogitsProcessor] = ()) -> Sequence:
        return self.add(self.make_sequence(prompt_ids, params, user_data, logits_processors))

    def abort(self, seq_id: int) -> None:
        with self._lock:
            self._aborts.add(seq_id)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting) + len(self._inbox)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def prefill_pending(self) -> bool:
        """Whether the next step will run prompt tokens: a new or queued request, or a prompt in chunks.
        (Read from another thread it may be a step late; it only steers the thread count.)"""
        return bool(self._inbox or self.scheduler.waiting or any(s.prefilling for s in self.scheduler.running))

    def has_work(self) -> bool:
        return bool(self._inbox or self._aborts or self.scheduler.has_work())

    def prefix_cache_stats(self) -> dict[str, float]:
        """Prompt tokens looked up in the prefix cache, those found (`hit_tokens`), their ratio, and the
        tokens the cached blocks hold now."""
        p = self.cache.prefix
        if p is None:
            return {"queried_tokens": 0, "hit_tokens": 0, "hit_rate": 0.0, "cached_tokens": 0}
        return {"queried_tokens": p.queried_tokens, "hit_tokens": p.hit_tokens, "hit_rate": p.hit_rate,
                "cached_tokens": self.cache.cached_tokens}

    # ------------------------------------------------------------------ the loop

    @torch.inference_mode()  # the logits rows are inference tensors, and the token steps change them in place
    def step(self) -> list[StepOutput]:
        """One engine iteration; returns one output per sequence that produced a token or ended."""
        outputs: list[StepOutput] = []
        with self._lock:
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, set()
        for seq in inbox:
            self.seqs[seq.seq_id] = seq
            self.scheduler.add(seq)
        for sid in aborts:
            seq = self.seqs.pop(sid, None)
            if seq is not None and not seq.is_finished:
                self.scheduler.finish(seq)
                seq.finish_reason = "abort"
                outputs.append(StepOutput(sid, -1, "", None, None, "abort"))
        sched = self.scheduler.schedule()
        if sched.empty:
            return outputs
        self.num_steps += 1
        if self.runner.rows:
            return outputs + self._step_rows(sched.prefill, sched.chunks, sched.decode)
        # a failure inside one sequence (its prefill, its token step) ends that sequence only
        for seq in sched.prefill:
            try:
                logits = self.runner.prefill(seq, sched.chunks.get(seq.seq_id))
            except Exception as e:
                outputs.append(self._fail(seq, e))
                continue
            self.cache.remember(seq.all_ids, seq.kv, seq.num_cached)
            if logits is not None:  # the last chunk: the first token
                outputs += self._sample([seq], [logits])
        if sched.decode:
            outputs += self._sample(sched.decode, self.runner.decode(sched.decode))
        return outputs

    def _step_rows(self, prefill: list[Sequence], chunks: dict[int, int], decode: list[Sequence]) -> list[StepOutput]:
        """The step as one forward of rows (model_runner.py `step_rows`); a failure of that forward ends the
        sequences in it, and the engine carries on."""
        try:
            seqs, logits = self.runner.step_rows([(s, chunks[s.seq_id]) for s in prefill], decode)
        except Exception as e:
            return [self._fail(s, e) for s in [*decode, *prefill]]
        for seq in prefill:
            self.cache.remember(seq.all_ids, seq.kv, seq.num_cached)
        return self._sample(seqs, logits) if seqs else []

    def _sample(self, seqs: list[Sequence], rows: torch.Tensor | list[torch.Tensor]) -> list[StepOutput]:
        """Each sequence's token step on its logits row (rows: [B, V] or B rows of [V]). Rows with no processor
        but the repetition penalty (`TokenStepper.fused`) get it, their first largest logit and top_k's
        threshold from one call for the whole batch (sampling.py `penalized_rows`), exactly as each row alone
        would. (A logits processor that needs the whole batch at once, e.g. one grammar mask kernel for all
        rows, would run here, before the per-row steps.)"""
        outputs = []
        found: list[tuple[float, int, float | None] | None] = [None] * len(seqs)
        which = [i for i, s in enumerate(seqs) if s.stepper.fused] if isinstance(rows, torch.Tensor) else []
        if which:
            inputs = [seqs[i].stepper.fused_inputs() for i in which]
            for i, f in zip(which, penalized_rows(rows, which, inputs), strict=True):
                found[i] = f
        for seq, logits, f in zip(seqs, rows, found, strict=True):
            try:
                out = seq.step(logits, f)
            except Exception as e:
                outputs.append(self._fail(seq, e))
                continue
            if out.finish_reason:
                if self.runner.rows:  # what its decode steps wrote is as good as a prefill's: keep it too
                    self.cache.remember(seq.all_ids, seq.kv, seq.num_cached, tail=True)
                    self.cache.donate(seq.all_ids[:seq.num_cached], seq.kv)
                self.scheduler.finish(seq)
                self.seqs.pop(seq.seq_id, None)
            outputs.append(out)
        return outputs

    def _fail(self, seq: Sequence, error: Exception) -> StepOutput:
        """End `seq` with finish_reason "error"; the engine and the other sequences carry on."""
        self.scheduler.finish(seq)
        self.seqs.pop(seq.seq_id, None)
        seq.finish_reason = "error"
        message = str(error) if isinstance(error, QianwenError) else f"{type(error).__name__}: {error}"
        return StepOutput(seq.seq_id, -1, "", None, None, "error", message)

    def run_until_done(self, on_output: Callable[[StepOutput], None] | None = None) -> None:
        while self.has_work():
            for out in self.step():
                if on_output:
                    on_output(out)


# ---------------------------------------------------------------------- offline API

@dataclass
class Completion:
    """The result of one offline request."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    request: dict[str, Any] = field(default_factory=dict, repr=False)
    error: str | None = None  # with finish_reason "error": why this request failed (the others still ran)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class LLM:
    """Offline batched generation: `LLM(model).generate(requests) -> completions`, in request order.

    A request is a prompt string, or a dict with `prompt` (text or token ids) or `messages` (chat),
    plus any sampling option of `SamplingParams` (max_tokens, temperature, top_p, seed, stop, ...) and
    `logits_processors` (a list of fn(prompt_ids, output_ids, logits) -> logits) and an output constraint
    (`json_schema`, `response_format`, `regex`, `choice`, `grammar`). A request that fails while generating
    comes back with finish_reason "error" and its `error`; the others are unaffected.
    """

    def __init__(self, model: Model | str | None = None, config: EngineConfig | None = None, **load_kwargs: Any) -> None:
        if model is None or isinstance(model, str) or hasattr(model, "__fspath__"):
            from ..api import load

            model = load(model, **load_kwargs)
        self.model = model
        self.engine = LLMEngine(model, config)

    def encode(self, request: str | dict[str, Any]) -> tuple[list[int], dict[str, Any]]:
        req = {"prompt": request} if isinstance(request, str) else dict(request)
        options = {k: v for k, v in req.items() if k not in ("prompt", "messages", "tools")}
        if "messages" in req:
            ids = self.model.encode_chat(req["messages"], tools=req.get("tools"))
        elif isinstance(req.get("prompt"), list):
            ids = [int(t) for t in req["prompt"]]
        elif isinstance(req.get("prompt"), str):
            tok = self.model.tokenizer
            ids = ([tok.bos_id] if tok.add_bos and tok.bos_id is not None else []) + tok.encode(req["prompt"])
        else:
            raise QianwenError("each request needs a 'prompt' or 'messages'")
        return ids, options

    def generate(self, requests: Iterable[str | dict[str, Any]], progress: bool = False) -> list[Completion]:
        reqs = list(requests)
        seqs = []
        for req in reqs:
            ids, options = self.encode(req)
            spec = {k: options.pop(k) for k in CONSTRAINT_OPTIONS if k in options}
            processors = list(options.pop("logits_processors", None) or ()) + self.model.constraint(**spec)
            params = self.model.params(**options)
            seqs.append(self.engine.add_request(ids, params, logits_processors=processors))
        results: dict[int, StepOutput] = {}
        texts: dict[int, list[str]] = {s.seq_id: [] for s in seqs}
        lps: dict[int, list] = {s.seq_id: [] for s in seqs}
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(seqs), desc="generating", unit="req")

        def collect(out: StepOutput) -> None:
            texts[out.seq_id].append(out.text)
            if out.token_id >= 0:
                lps[out.seq_id].append((out.logprob, out.top_logprobs))
            if out.finish_reason:
                results[out.seq_id] = out
                if bar is not None:
                    bar.update(1)

        self.engine.run_until_done(collect)
        if bar is not None:
            bar.close()
        completions = []
        for req, seq in zip(reqs, seqs, strict=True):
            want_lp = seq.params.logprobs is not None
            completions.append(Completion(
                text="".join(texts[seq.seq_id]), token_ids=list(seq.output_ids),
                finish_reason=results[seq.seq_id].finish_reason or "stop", prompt_tokens=len(seq.prompt_ids),
                logprobs=[lp for lp, _ in lps[seq.seq_id]] if want_lp else None,
                top_logprobs=[t for _, t in lps[seq.seq_id]] if want_lp else None,
                request=req if isinstance(req, dict) else {"prompt": req}, error=results[seq.seq_id].error))
        return completions


__all__ = ["LLM", "Completion", "EngineConfig", "LLMEngine", "Status"]
