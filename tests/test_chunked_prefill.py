"""Chunked prefill: a long prompt is prefilled a chunk per step between the other sequences' decode
steps, with the same result as in one piece."""

from __future__ import annotations

import pytest

import qianwen
from qianwen.engine import LLM, EngineConfig, LLMEngine
from qianwen.engine.llm_engine import PREFILL_BLOCK
from qianwen.errors import QianwenError

from .conftest import greedy

LONG = "A long document about foxes and dogs, read before the question. " * 3


def test_chunked_equals_unchunked(tiny_qwen2_model):
    model = tiny_qwen2_model
    prompts = [LONG + f"Question {i}?" for i in range(4)] + ["short one", "another short prompt"]
    whole = LLM(model, EngineConfig(max_prefill_tokens=10**6, prefix_caching=False))
    ref = [whole.generate([greedy(p)])[0] for p in prompts]
    for budget in (1, PREFILL_BLOCK, 3 * PREFILL_BLOCK):
        got = LLM(model, EngineConfig(max_prefill_tokens=budget, prefix_caching=False)).generate(
            [greedy(p) for p in prompts])
        for a, b in zip(ref, got, strict=True):
            assert a.token_ids == b.token_ids
            assert a.top_logprobs == b.top_logprobs


def test_a_long_prompt_does_not_stall_a_decoding_stream(tiny_qwen2_model):
    model = tiny_qwen2_model
    eng = LLMEngine(model, EngineConfig(max_prefill_tokens=PREFILL_BLOCK, prefix_caching=False))
    tok = model.tokenizer
    params = model.params(max_tokens=40, temperature=0, ignore_eos=True)
    first = eng.add_request(tok.encode("Hello"), params)
    eng.step()  # prefilled, first token
    assert len(first.output_ids) == 1
    long_ids = tok.encode(LONG)
    assert len(long_ids) > 2 * PREFILL_BLOCK
    late = eng.add_request(long_ids, model.params(max_tokens=5, temperature=0, ignore_eos=True))
    chunks = -(-len(long_ids) // PREFILL_BLOCK)
    prefilled = []
    for step in range(chunks):
        before = len(first.output_ids)
        eng.step()
        assert len(first.output_ids) == before + 1  # the decoding stream got its token this step
        prefilled.append(late.num_cached)
        assert (len(late.output_ids) == 1) == (step == chunks - 1)  # the first token after the last chunk
    assert prefilled == [min(len(long_ids), (i + 1) * PREFILL_BLOCK) for i in range(chunks)]
    eng.run_until_done()
    ref = LLM(model, EngineConfig(prefix_caching=False)).generate([greedy(long_ids, 5)])[0]
    assert late.output_ids == ref.token_ids


def test_prefill_budget_is_shared_by_the_prompts_of_a_step(tiny_qwen2_dir):
    model = qianwen.load(str(tiny_qwen2_dir), dtype="float32")
    budget = 2 * PREFILL_BLOCK
    eng = LLMEngine(model, EngineConfig(max_prefill_tokens=budget, prefix_caching=False))
    params = model.params(max_tokens=2, temperature=0, ignore_eos=True)
    seqs = [eng.add_request(model.tokenizer.encode(LONG + str(i)), params) for i in range(3)]
    while eng.has_work():
        cached = sum(s.num_cached for s in seqs)
        sched_sizes = []
        orig = eng.runner.prefill

        def spy(seq, n=None, orig=orig, sizes=sched_sizes):
            before = seq.num_cached
            out = orig(seq, n)
            sizes.append(seq.num_cached - before)
            return out

        eng.runner.prefill = spy
        eng.step()
        eng.runner.prefill = orig
        assert sum(sched_sizes) <= budget
        assert sum(s.num_cached for s in seqs) >= cached  # progress every step
    assert all(len(s.output_ids) == 2 for s in seqs)


def test_bad_budget(tiny_qwen2_dir):
    model = qianwen.load(str(tiny_qwen2_dir), dtype="float32")
    with pytest.raises(QianwenError, match="max_prefill_tokens"):
        LLMEngine(model, EngineConfig(max_prefill_tokens=0))
