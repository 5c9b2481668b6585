"""Tensors in, logits out: the engine's forwards (the engine samples each row with its sequence's token step).

On the C kernels (a model with `fast_decode`, qianwen/fast/decode.py) every step is ONE forward of rows
(`step_rows`): each row is one token of some sequence at its position, decode rows and the tokens of
prompt chunks alike, several prompts packed together. The kernels compute each row on its own (kernels.c:
row-invariant matmuls; K/V of all rows stored before any row attends, causally by its position), so a
token's K/V and logits are bitwise the same whether it was decoded, prefilled alone, in a chunk of any
size or beside any other sequences. That is what lets the prefix cache keep the K/V decode steps wrote
(a chat's earlier answers) as well as prompts'.

Elsewhere (a GPU, a model part without kernels, Qwen-7B's dynamic NTK) prefill and decode are separate
forwards, and batch invariance (docs/conventions.md) is kept as follows:
- Prefill runs each new sequence in its own forwards, in aligned pieces of `prefill_block` tokens, so the
  result is the same alone or batched, chunked or not, with or without a cached prefix.
- Decode batches rows, and matmul kernels pick different code paths by row count. Measured on this
  CPU with torch 2.13 (docs/server.md): bf16 `F.linear` gives bitwise-equal rows for every count from
  1 to 32; fp32 has one path for 1 row, another for 2-15 and another from 16 rows up (16-40 agree for
  every shape tried, larger counts sometimes switch again). So decode runs in groups of at most 32
  rows, and fp32/fp16 groups are padded to 16 rows with dummy rows that attend only to themselves.
- Attention runs per sequence over its own cache (BatchCache), the same call as when alone.
"""

from __future__ import annotations

import torch

from .cache_manager import BatchCache
from .sequence import Sequence

MAX_ROWS = 32  # rows per decode forward: bf16 kernels are row-invariant up to here
MIN_ROWS = {torch.float32: 16, torch.float16: 16}  # pad small decode batches of these dtypes


class ModelRunner:
    def __init__(self, net: torch.nn.Module, device: torch.device, dtype: torch.dtype,
                 batch_invariant: bool = True, prefill_block: int = 1 << 62) -> None:
        self.net, self.device, self.dtype = net, device, dtype
        self.prefill_block = prefill_block
        # every step one forward of rows (step_rows): the C decode step is installed, on the CPU, and no
        # prompt needs a forward of its own (Qwen-7B's dynamic NTK: prefill_block covers the whole prompt)
        self.rows = getattr(net, "fast_decode", None) is not None and device.type == "cpu" and prefill_block < 1 << 62
        self.max_rows = MAX_ROWS if batch_invariant else 1 << 30
        self.min_rows = MIN_ROWS.get(dtype, 1) if batch_invariant else 1

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: BatchCache,
                 last_only: bool) -> torch.Tensor:
        net = self.net
        if last_only and hasattr(net, "hidden_states") and hasattr(net, "compute_logits"):
            h = net.hidden_states(ids, positions, cache)
            return net.compute_logits(h[:, -1])
        return net(ids, positions, cache)[:, -1]

    @torch.inference_mode()
    def prefill(self, seq: Sequence, n_tokens: int | None = None) -> torch.Tensor | None:
        """Run the next `n_tokens` (default: all) uncached tokens of `seq` (its prompt, or prompt + output
        after preemption), after the `num_cached` already in its cache (a cached prefix, earlier chunks).
        Returns the logits [vocab] for the next token once the last token has run, else None.

        Tokens run in pieces of `prefill_block` at multiples of it (the last one shorter): one forward per
        piece, the same forwards however the prompt was chunked or how much of it was cached, so a token's
        K/V and the logits never depend on either (a whole-prompt forward would differ in the last bits)."""
        end = seq.num_tokens if n_tokens is None else min(seq.num_tokens, seq.num_cached + n_tokens)
        logits = None
        while seq.num_cached < end:
            start = seq.num_cached
            stop = min(end, (start // self.prefill_block + 1) * self.prefill_block)
            ids = torch.tensor([seq.all_ids[start:stop]], dtype=torch.long, device=self.device)
            pos = torch.arange(start, stop, device=self.device)[None]
            cache = BatchCache([seq.kv], [start], seq.extra)
            if stop < seq.num_tokens:  # only its K/V are needed
                getattr(self.net, "hidden_states", self.net)(ids, pos, cache)
            else:
                logits = self._forward(ids, pos, cache, last_only=True)[0].float().cpu()
                seq.prefilling = False
            seq.num_cached = stop
        return logits

    @torch.inference_mode()
    def step_rows(self, prefill: list[tuple[Sequence, int]], decode: list[Sequence]
                  ) -> tuple[list[Sequence], torch.Tensor]:
        """One forward of rows: the next token of each `decode` sequence and the next `n` uncached tokens of
        each `prefill` sequence. Returns the sequences with a next token to choose (the decode ones, then
        the prompts whose last token ran) and their logits [k, vocab] float32."""
        ids: list[int] = []
        pos: list[int] = []
        kvs = []
        want: list[int] = []  # the row whose logits each returned sequence needs
        done: list[Sequence] = []
        for seq in decode:
            ids.append(seq.all_ids[-1])
            pos.append(seq.num_tokens - 1)
            kvs.append(seq.kv)
            want.append(len(ids) - 1)
            done.append(seq)
        stops = []  # where each prefill sequence's cached tokens end after this forward
        for seq, n in prefill:
            start, stop = seq.num_cached, min(seq.num_tokens, seq.num_cached + n)
            stops.append(stop)
            ids += seq.all_ids[start:stop]
            pos += range(start, stop)
            kvs += [seq.kv] * (stop - start)
            if stop == seq.num_tokens:
                want.append(len(ids) - 1)
                done.append(seq)
        cache = BatchCache(kvs, pos, dict(decode[0].extra if decode else prefill[0][0].extra))
        h = self.net.hidden_states(torch.tensor(ids, device=self.device)[:, None],
                                   torch.tensor(pos, device=self.device)[:, None], cache)
        logits = self.net.compute_logits(h[want, 0]).float().cpu() if want else torch.empty(0)
        for seq in decode:
            seq.num_cached = seq.num_tokens
        for (seq, _), stop in zip(prefill, stops, strict=True):
            seq.num_cached, seq.prefilling = stop, stop < seq.num_tokens
        return done, logits

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> torch.Tensor | list[torch.Tensor]:
        """One token for each sequence (whose last token is not cached yet); logits [vocab] each: one
        [len(seqs), vocab] tensor when they ran in one forward (the usual case), else a list of rows."""
        groups: dict[tuple, list[Sequence]] = {}
        for s in seqs:  # sequences with different model state (Qwen-7B NTK alpha) never share a forward
            groups.setdefault(tuple(sorted(s.extra.items())), []).append(s)
        if len(groups) == 1 and len(seqs) <= self.max_rows:
            return self._decode_rows(seqs)
        out: dict[int, torch.Tensor] = {}
        for group in groups.values():
            for i in range(0, len(group), self.max_rows):
                chunk = group[i:i + self.max_rows]
                for s, row in zip(chunk, self._decode_rows(chunk), strict=True):
                    out[s.seq_id] = row
        return [out[s.seq_id] for s in seqs]

    def _decode_rows(self, seqs: list[Sequence]) -> torch.Tensor:
        pad = max(0, self.min_rows - len(seqs))
        ids = [s.output_ids[-1] if s.output_ids else s.prompt_ids[-1] for s in seqs] + [0] * pad
        pos = [s.num_tokens - 1 for s in seqs] + [0] * pad
        cache = BatchCache([s.kv for s in seqs] + [None] * pad, [s.num_cached for s in seqs] + [0] * pad,
                           dict(seqs[0].extra))
        logits = self.net(torch.tensor(ids, device=self.device)[:, None],
                          torch.tensor(pos, device=self.device)[:, None], cache)[:, -1]
        for s in seqs:
            s.num_cached = s.num_tokens
        return logits[:len(seqs)].float().cpu()
