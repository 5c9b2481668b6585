"""Automatic prefix caching: the same results with the cache on or off, hit counting, reuse after a
sequence finishes, eviction under a small budget (cached blocks go before live sequences), metrics."""

from __future__ import annotations

import pytest

import qianwen
from qianwen.engine import LLM, EngineConfig
from qianwen.engine.llm_engine import PREFILL_BLOCK

from .conftest import greedy

SYSTEM = "You are a careful assistant. Answer briefly and exactly. " * 4  # a few prefill blocks of tokens
PROMPTS = [SYSTEM + f"Question {i}: " + "the quick brown fox " * (i % 4) for i in range(8)]


def test_same_tokens_and_logprobs_with_and_without_the_cache(tiny_qwen2_model):
    """Bitwise: prefill runs in the same aligned pieces whether or not a prefix came from the cache."""
    model = tiny_qwen2_model
    assert len(LLM(model).encode(SYSTEM)[0]) > 2 * PREFILL_BLOCK
    off = LLM(model, EngineConfig(prefix_caching=False))
    ref = [off.generate([greedy(p)])[0] for p in PROMPTS]
    on = LLM(model)
    alone = [on.generate([greedy(p)])[0] for p in PROMPTS]
    assert on.engine.prefix_cache_stats()["hit_tokens"] > 0
    together = on.generate([greedy(p) for p in PROMPTS])
    mixed = LLM(model).generate([greedy(p) for p in PROMPTS])  # cold cache, all admitted at once
    for got in (alone, together, mixed):
        for a, b in zip(ref, got, strict=True):
            assert a.token_ids == b.token_ids
            assert a.top_logprobs == b.top_logprobs


def test_hit_counting_and_reuse_after_finish(tiny_qwen2_dir):
    model = qianwen.load(str(tiny_qwen2_dir), dtype="float32")
    llm = LLM(model)
    eng = llm.engine
    b = eng.cache.prefix.block_size
    ids = llm.encode(PROMPTS[1])[0]
    first = llm.generate([greedy(ids)])[0]
    stats = eng.prefix_cache_stats()
    assert stats["queried_tokens"] == len(ids) and stats["hit_tokens"] == 0
    # the finished sequence's buffer is freed; the full blocks of what it cached stay, inside the budget:
    # its prompt's, and on the row path also those its decode steps wrote (all but the last token's K/V)
    # (with partial matching, prefix_cache.py, its last partial block too, in a whole block's room)
    partial = eng.cache.prefix.partial
    computed = len(ids) + (len(first.token_ids) - 1 if eng.runner.rows else 0)
    assert eng.cache.used == 0 and stats["cached_tokens"] == (-(-computed // b) * b if partial else computed // b * b)
    again = llm.generate([greedy(ids)])[0]
    assert again.token_ids == first.token_ids
    hit = len(ids) - 1 if partial else (len(ids) - 1) // b * b  # the last token always runs, for its logits
    stats = eng.prefix_cache_stats()
    assert stats["hit_tokens"] == hit and stats["queried_tokens"] == 2 * len(ids)
    assert stats["hit_rate"] == pytest.approx(hit / (2 * len(ids)))
    # a prompt that shares only the system prompt hits only the blocks inside it
    other = llm.encode(PROMPTS[2])[0]
    common = next(i for i, (x, y) in enumerate(zip(ids, other, strict=False)) if x != y)
    llm.generate([greedy(other)])
    assert eng.prefix_cache_stats()["hit_tokens"] == hit + (common if partial else common // b * b)


def test_a_next_turn_reuses_what_the_answer_decoded(tiny_qwen2_model):
    """On the row path (model_runner.py `step_rows`) decode steps write the same K/V a prefill would, so
    the blocks of an answer are cached when it finishes, its last partial block too: a prompt that
    continues prompt + answer hits every token the first computed, and gives exactly the tokens a run
    without the cache gives."""
    model = tiny_qwen2_model
    llm = LLM(model)
    assert llm.engine.runner.rows, "the C decode step is not installed"
    b = llm.engine.cache.prefix.block_size
    ids = llm.encode("A short question: " + "the quick brown fox " * 3)[0]
    first = llm.generate([greedy(ids, 3 * b)])[0]
    turn2 = ids + first.token_ids + llm.encode("And then?")[0]
    before = llm.engine.prefix_cache_stats()["hit_tokens"]
    got = llm.generate([greedy(turn2, 8)])[0]
    assert llm.engine.prefix_cache_stats()["hit_tokens"] - before == len(ids) + 3 * b - 1  # all it computed
    ref = LLM(model, EngineConfig(prefix_caching=False)).generate([greedy(turn2, 8)])[0]
    assert got.token_ids == ref.token_ids and got.top_logprobs == ref.top_logprobs


def test_a_next_turn_takes_over_the_finished_buffer(tiny_qwen2_model):
    """On the row path a finished sequence leaves its buffer (cache_manager.py `donate`): the prompt that
    continues it takes that very buffer, nothing copied in, and gives the tokens a run without the cache
    gives; a prompt that shares only the start of it (the system prompt) copies cached blocks instead and
    leaves the buffer; donated buffers are the first to go when room is needed."""
    model = tiny_qwen2_model
    llm = LLM(model)
    eng = llm.engine
    b = eng.cache.prefix.block_size
    ids = llm.encode(SYSTEM[:120] + "A short question: " + "the quick brown fox " * 3)[0]
    first = llm.generate([greedy(ids, 2 * b)])[0]
    (held, donated), = eng.cache.donors
    assert held == ids + first.token_ids[:-1] and eng.cache.used == 0 and eng.cache.donor_tokens > 0
    other = llm.encode(SYSTEM[:120] + "Another question entirely.")[0]
    llm.generate([greedy(other, 4)])
    assert any(kv.buf.data_ptr() == donated.buf.data_ptr() for _, kv in eng.cache.donors)  # left alone
    turn2 = ids + first.token_ids + llm.encode("And then?")[0]
    taken = []
    admit = eng.cache.admit
    eng.cache.admit = lambda i, n: taken.append(admit(i, n)) or taken[-1]
    got = llm.generate([greedy(turn2, 8)])[0]
    (kv, hold), = taken
    assert kv.buf.data_ptr() == donated.buf.data_ptr() and hold == len(held)
    ref = LLM(model, EngineConfig(prefix_caching=False)).generate([greedy(turn2, 8)])[0]
    assert got.token_ids == ref.token_ids and got.top_logprobs == ref.top_logprobs
    blocks = len(eng.cache.prefix.blocks)
    assert eng.cache._make_room(eng.cache.free_tokens + eng.cache.donor_tokens)
    assert not eng.cache.donors and eng.cache.donor_tokens == 0 and len(eng.cache.prefix.blocks) == blocks


def test_next_chat_turn_reuses_the_previous_prompt(tiny_qwen2_dir):
    model = qianwen.load(str(tiny_qwen2_dir), dtype="float32")
    llm = LLM(model)
    messages = [{"role": "system", "content": SYSTEM[:100]}, {"role": "user", "content": "Hi, who are you?"}]
    reply = llm.generate([{"messages": messages, "max_tokens": 8, "temperature": 0}])[0]
    turn2 = messages + [{"role": "assistant", "content": reply.text}, {"role": "user", "content": "And?"}]
    assert len(llm.encode({"messages": turn2})[0]) < 200
    before = llm.engine.prefix_cache_stats()["hit_tokens"]
    got = llm.generate([{"messages": turn2, "max_tokens": 8, "temperature": 0}])[0]
    first_prompt = len(llm.encode({"messages": messages})[0])
    b = llm.engine.cache.prefix.block_size
    assert llm.engine.prefix_cache_stats()["hit_tokens"] - before >= first_prompt // b * b - b
    ref = LLM(model, EngineConfig(prefix_caching=False)).generate(
        [{"messages": turn2, "max_tokens": 8, "temperature": 0}])[0]
    assert got.token_ids == ref.token_ids


def test_cached_blocks_are_evicted_before_live_sequences_are_preempted(tiny_qwen2_dir):
    model = qianwen.load(str(tiny_qwen2_dir), dtype="float32")
    ref = LLM(model, EngineConfig(prefix_caching=False)).generate([greedy(p, 40) for p in PROMPTS[:4]])
    llm = LLM(model)
    eng = llm.engine
    # room for three sequences' buffers and little more
    need = max(len(llm.encode(p)[0]) for p in PROMPTS[:4]) + 41
    eng.cache.block_size = PREFILL_BLOCK
    eng.cache.max_tokens = 3 * (-(-need // PREFILL_BLOCK) * PREFILL_BLOCK)
    # fill the cache with other prompts' blocks first
    llm.generate([greedy("Unrelated text, nothing shared. " * 5 + str(i), 1) for i in range(6)])
    assert eng.cache.cached_tokens > 0
    preempted, peak = [], []
    schedule = eng.scheduler.schedule

    def spy():
        out = schedule()
        preempted.extend(out.preempted)
        peak.append(eng.num_running)
        assert eng.cache.used + eng.cache.cached_tokens + eng.cache.donor_tokens <= eng.cache.max_tokens
        return out

    eng.scheduler.schedule = spy
    eng.scheduler.config.max_num_seqs = 3
    got = llm.generate([greedy(p, 40) for p in PROMPTS[:3]])
    assert not preempted and max(peak) == 3  # the cached blocks made way for all three at once
    assert [g.token_ids for g in got] == [r.token_ids for r in ref[:3]]
    # and a sequence that outgrows the budget still preempts (after the cache is empty), with the same result
    got = llm.generate([greedy(p, 40) for p in PROMPTS[:4]])
    assert [g.token_ids for g in got] == [r.token_ids for r in ref]
    assert eng.cache.used == 0


def test_turned_off(tiny_qwen2_dir):
    model = qianwen.load(str(tiny_qwen2_dir), dtype="float32")
    llm = LLM(model, EngineConfig(prefix_caching=False))
    llm.generate([greedy(PROMPTS[0])] * 2)
    assert llm.engine.prefix_cache_stats() == {"queried_tokens": 0, "hit_tokens": 0, "hit_rate": 0.0,
                                               "cached_tokens": 0}


def test_metrics_endpoint(tiny_qwen2_dir):
    from fastapi.testclient import TestClient

    from qianwen.server import ServerConfig, create_app

    model = qianwen.load(str(tiny_qwen2_dir), dtype="float32")
    with TestClient(create_app(model, EngineConfig(), ServerConfig(model_name="tiny"))) as client:
        for _ in range(2):
            r = client.post("/v1/completions", json={"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 2})
            assert r.status_code == 200
        text = client.get("/metrics").text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("qianwen_prefix")}
    assert values["qianwen_prefix_cache_hit_tokens"] > 0
    assert values["qianwen_prefix_cache_queried_tokens"] > values["qianwen_prefix_cache_hit_tokens"]
    assert 0 < values["qianwen_prefix_cache_hit_rate"] < 1


def test_int8_cache_blocks_keep_their_scales(tiny_qwen2_dir):
    model = qianwen.load(str(tiny_qwen2_dir), dtype="float32")
    off = LLM(model, EngineConfig(prefix_caching=False, kv_cache_dtype="int8"))
    ref = [off.generate([greedy(p)])[0] for p in PROMPTS[:4]]
    on = LLM(model, EngineConfig(kv_cache_dtype="int8"))
    got = [on.generate([greedy(p)])[0] for p in PROMPTS[:4]]
    assert on.engine.prefix_cache_stats()["hit_tokens"] > 0
    for a, b in zip(ref, got, strict=True):
        assert a.token_ids == b.token_ids
        assert a.top_logprobs == b.top_logprobs


def test_a_prompt_admitted_after_its_twin_reuses_its_blocks(tiny_qwen2_dir):
    """Two prompts sharing a prefix, the first leaving too little of a step's prefill budget for a block of
    the second: the second waits a step, then starts from the first's cached blocks."""
    model = qianwen.load(str(tiny_qwen2_dir), dtype="float32")
    llm = LLM(model)
    bs = llm.engine.cache.prefix.block_size
    a, b = llm.encode(PROMPTS[1])[0], llm.encode(PROMPTS[5])[0]
    assert len(a) > 3 * bs and a[:2 * bs] == b[:2 * bs]
    llm.engine.scheduler.config.max_prefill_tokens = len(a) + bs // 2  # a, and less than a block of b
    llm.generate([greedy(a, 2), greedy(b, 2)])
    assert llm.engine.prefix_cache_stats()["hit_tokens"] >= 2 * bs


def test_a_prompt_reuses_the_tokens_it_shares_inside_a_block(tiny_qwen2_model):
    """Token-granular matching past the last whole block (row path): a prompt that leaves another one
    part way through a block copies the shared tokens of that block too, with the same results as
    without the cache; blocks evicted leave no trace in the index."""
    model = tiny_qwen2_model
    llm = LLM(model)
    assert llm.engine.cache.prefix.partial
    b = llm.engine.cache.prefix.block_size
    a = llm.encode(PROMPTS[1])[0]
    common = 2 * b + b // 2
    other = a[:common] + [t + 1 for t in a[common:common + 20]]
    assert other[common] != a[common]
    llm.generate([greedy(a, 2)])
    before = llm.engine.prefix_cache_stats()["hit_tokens"]
    got = llm.generate([greedy(other, 6)])[0]
    assert llm.engine.prefix_cache_stats()["hit_tokens"] - before == common
    ref = LLM(model, EngineConfig(prefix_caching=False)).generate([greedy(other, 6)])[0]
    assert got.token_ids == ref.token_ids and got.top_logprobs == ref.top_logprobs
    prefix = llm.engine.cache.prefix
    while prefix.evict():
        pass
    assert not prefix.children and prefix.num_tokens == 0
