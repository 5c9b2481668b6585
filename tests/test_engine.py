"""The continuous batching engine: batch invariance, per-request sampling, budgets, preemption, aborts."""

from __future__ import annotations

import pytest
import torch

import qianwen
from qianwen.engine import LLM, EngineConfig, LLMEngine

PROMPTS = [f"Hello {i}: " + "the quick brown fox " * (i % 6) + "你好" * (i % 3) for i in range(16)]


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def model(request, tiny_qwen2_dir):
    return qianwen.load(str(tiny_qwen2_dir), dtype=request.param)


def greedy(prompt: str, max_tokens: int = 24, **kw) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "logprobs": 3, **kw}


def test_batch_invariance(model):
    """A greedy request gives the same tokens and the same logits (top logprobs, bitwise) alone or among 15."""
    llm = LLM(model)
    alone = [llm.generate([greedy(p)])[0] for p in PROMPTS]
    together = llm.generate([greedy(p) for p in PROMPTS])
    for a, b in zip(alone, together, strict=True):
        assert a.token_ids == b.token_ids
        assert a.top_logprobs == b.top_logprobs
        assert len(a.token_ids) == 24 and a.finish_reason == "length"


def test_requests_joining_mid_flight(model):
    """Sequences join and leave at token granularity, each with its own parameters and lengths."""
    llm = LLM(model)
    ref = {p: llm.generate([greedy(p, 8 + i)])[0].token_ids for i, p in enumerate(PROMPTS)}
    engine = llm.engine
    seqs = {}
    for i, p in enumerate(PROMPTS[:6]):
        ids, _ = llm.encode(p)
        seqs[p] = engine.add_request(ids, model.params(**{k: v for k, v in greedy(p, 8 + i).items() if k != "prompt"}))
    sampled = engine.add_request(llm.encode(PROMPTS[0])[0], model.params(max_tokens=20, temperature=1.0, seed=7))
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
        if steps == 3:  # the rest arrive while the first ones decode
            for i, p in enumerate(PROMPTS[6:], start=6):
                ids, _ = llm.encode(p)
                seqs[p] = engine.add_request(
                    ids, model.params(**{k: v for k, v in greedy(p, 8 + i).items() if k != "prompt"}))
    for p, seq in seqs.items():
        assert seq.output_ids == ref[p]
    assert len(sampled.output_ids) == 20 or sampled.finish_reason == "stop"
    # the same seed gives the same sample, alone
    again = llm.generate([{"prompt": PROMPTS[0], "max_tokens": 20, "temperature": 1.0, "seed": 7}])[0]
    assert again.token_ids == sampled.output_ids


def test_engine_matches_the_simple_decode_loop(model):
    """Alone in the engine, a request gives what Model.stream_tokens gives."""
    params = model.params(max_tokens=16, temperature=0, ignore_eos=True)
    for p in PROMPTS[:3]:
        ids = model.tokenizer.encode(p)
        ref = [s.token_id for s in model.stream_tokens(ids, params)]
        assert LLM(model).generate([{"prompt": ids, "max_tokens": 16, "temperature": 0, "ignore_eos": True}])[0] \
            .token_ids == ref


def test_stop_strings_and_finish_reasons(model):
    llm = LLM(model)
    full = llm.generate([greedy(PROMPTS[1], 20)])[0]
    assert full.finish_reason == "length"
    stop = full.text[5:8]
    assert stop
    cut = llm.generate([greedy(PROMPTS[1], 20, stop=[stop])])[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:full.text.find(stop)]
    assert stop not in cut.text


def test_kv_budget_queues_requests(tiny_qwen2_dir):
    """With room for only a few sequences, the rest wait, and every result is unchanged."""
    model = qianwen.load(str(tiny_qwen2_dir), dtype="float32")
    ref = LLM(model).generate([greedy(p) for p in PROMPTS])
    c = model.config
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4
    cfg = EngineConfig(kv_cache_mb=3 * 64 * per_token / 2**20)  # three 64-token blocks
    llm = LLM(model, cfg)
    llm.engine.cache.block_size = 64
    llm.engine.cache.max_tokens = 3 * 64
    peak = []
    orig = llm.engine.step

    def step():
        out = orig()
        peak.append(llm.engine.num_running)
        assert llm.engine.cache.used <= llm.engine.cache.max_tokens
        return out

    llm.engine.step = step
    got = llm.generate([greedy(p) for p in PROMPTS])
    assert max(peak) <= 3
    assert [g.token_ids for g in got] == [r.token_ids for r in ref]
    assert llm.engine.cache.used == 0


def test_preemption_when_the_cache_runs_out(tiny_qwen2_dir):
    model = qianwen.load(str(tiny_qwen2_dir), dtype="float32")
    llm = LLM(model)
    eng = llm.engine
    eng.cache.block_size, eng.cache.max_tokens = 16, 96  # sequences outgrow it while decoding
    got = llm.generate([greedy(p, 40) for p in PROMPTS[:4]])
    assert all(len(g.token_ids) == 40 for g in got)
    assert eng.cache.used == 0


def test_abort_frees_the_cache(model):
    engine = LLMEngine(model)
    seq = engine.add_request(model.tokenizer.encode(PROMPTS[2]), model.params(max_tokens=100, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.num_running == 1 and engine.cache.used > 0
    engine.abort(seq.seq_id)
    outs = engine.step()
    assert [o.finish_reason for o in outs] == ["abort"]
    assert engine.num_running == 0 and engine.cache.used == 0 and not engine.has_work()


def test_prompt_checks(model):
    engine = LLMEngine(model)
    with pytest.raises(qianwen.errors.QianwenError, match="context"):
        engine.make_sequence([1] * model.context_length, model.params())
    with pytest.raises(qianwen.errors.QianwenError, match="empty"):
        engine.make_sequence([], model.params())
    seq = engine.make_sequence([1] * (model.context_length - 4), model.params(max_tokens=100))
    assert seq.max_new_tokens == 4


def test_offline_chat_messages(model):
    llm = LLM(model)
    msgs = [{"role": "user", "content": "Hi"}]
    got = llm.generate([{"messages": msgs, "max_tokens": 5, "temperature": 0}])[0]
    assert got.prompt_tokens == len(model.encode_chat(msgs))
    assert 1 <= got.completion_tokens <= 5


def test_batch_invariance_on_quantized_weights(tiny_qwen2_dir):
    """Weight-only int4 layers (the fast CPU path) keep a row's result independent of the batch."""
    linear_mod = pytest.importorskip("qianwen.quant.linear")
    model = qianwen.load(str(tiny_qwen2_dir), dtype="bfloat16", fast=False)
    for layer in model.net.model.layers:
        for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                              (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for n in names:
                setattr(parent, n, linear_mod.Int4Linear.from_float(getattr(parent, n), 32))
    assert isinstance(model.net.model.layers[0].mlp.up_proj, linear_mod.Int4Linear)
    llm = LLM(model)
    alone = [llm.generate([greedy(p, 12)])[0] for p in PROMPTS]
    together = llm.generate([greedy(p, 12) for p in PROMPTS])
    assert [a.token_ids for a in alone] == [b.token_ids for b in together]
    assert [a.top_logprobs for a in alone] == [b.top_logprobs for b in together]


def test_padding_rows_attend_to_themselves_only():
    from qianwen.engine.cache_manager import BatchCache, CacheManager

    cm = CacheManager(1, 2, 8, torch.float32, torch.device("cpu"), 64, 16)
    kv = cm.allocate(4)
    q, k, v = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8)
    out = BatchCache([kv, None], [0, 0]).attend(0, q, k, v)
    assert torch.equal(out[1], v[1].repeat_interleave(2, dim=0))
    assert torch.allclose(out[0], v[0].repeat_interleave(2, dim=0))


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_fused_greedy_batch_equals_alone_and_isolates_a_nan_row(model, penalty):
    """Greedy requests with no processor but the repetition penalty take their tokens from one call over the
    decode batch (sampling.py `penalized_rows`): the same tokens as each alone; a row whose logits turn NaN ends
    that request only."""
    llm = LLM(model)
    reqs = [greedy(p, 12, repetition_penalty=penalty, logprobs=None) for p in PROMPTS[:8]]
    alone = [llm.generate([r])[0].token_ids for r in reqs]
    engine = llm.engine
    runner = engine.runner
    name = "step_rows" if runner.rows else "decode"  # the forward that gives the decode rows' logits
    forward = getattr(runner, name)
    poisoned: list[int] = []

    def poison(*args):
        out = forward(*args)
        seqs, rows = out if runner.rows else (args[0], out)
        rows = rows.clone()
        assert isinstance(rows, torch.Tensor) and rows.shape[0] == len(seqs)  # one [B, V] for the batch
        for i, s in enumerate(seqs):
            if s.seq_id == poisoned[0] and len(s.output_ids) == 4:
                rows[i, 5] = float("nan")
        return (seqs, rows) if runner.rows else rows

    setattr(runner, name, poison)
    seqs = [engine.add_request(llm.encode(r)[0], model.params(**{k: v for k, v in r.items() if k != "prompt"}))
            for r in reqs]
    assert all(s.stepper.fused for s in seqs)
    poisoned.append(seqs[3].seq_id)
    engine.run_until_done()
    setattr(runner, name, forward)
    for i, (s, ref) in enumerate(zip(seqs, alone, strict=True)):
        if i == 3:
            assert s.finish_reason == "error" and s.output_ids == ref[:4]
        else:
            assert s.output_ids == ref and s.finish_reason == "length"


@pytest.mark.parametrize("kv_dtype", ["auto", "int8"])
def test_a_prompt_prefilled_as_rows_writes_what_decoding_writes(tiny_qwen2_model, kv_dtype):
    """On the C kernels every step is one forward of rows (model_runner.py `step_rows`): a prompt run in
    one piece, one token per forward (what decode steps do) or in odd chunks writes bitwise the same K/V
    and gives the same logits, alone or beside another sequence's rows."""
    model = tiny_qwen2_model
    eng = LLMEngine(model, EngineConfig(kv_cache_dtype=kv_dtype))
    assert eng.runner.rows, "the C decode step is not installed"
    ids = list(range(5, 45))

    def run(pieces, beside=None):
        seq = eng.make_sequence(ids, model.params(max_tokens=1))
        seq.kv, seq.prefilling = eng.cache.allocate(len(ids) + 1), True
        for n in pieces:
            other = []
            if beside is not None:  # another prompt's chunk in the same forward
                other = [(beside, 3)] if beside.num_cached + 3 < beside.num_tokens else []
            done, logits = eng.runner.step_rows([*other, (seq, n)], [])
        kv = seq.kv.buf[:, :, :, :len(ids)].clone()
        scales = None if seq.kv.scales is None else seq.kv.scales[:, :, :, :len(ids)].clone()
        assert done[-1] is seq and not seq.prefilling
        eng.cache.free(seq.kv)
        return kv, scales, logits[-1]

    whole = run([len(ids)])
    neighbour = eng.make_sequence(list(range(60, 100)), model.params(max_tokens=1))
    neighbour.kv, neighbour.prefilling = eng.cache.allocate(41), True
    for got in (run([1] * len(ids)), run([7, 13, 20]), run([5] * 8, beside=neighbour)):
        assert torch.equal(whole[0], got[0]) and torch.equal(whole[2], got[2])
        assert (whole[1] is None and got[1] is None) or torch.equal(whole[1], got[1])


def test_sampled_rows_in_a_batch_equal_the_token_iterator(model):
    """A seeded sampled request (Qwen's default cuts: top_k 20, top_p 0.8, repetition penalty 1.05) draws the
    same tokens in an engine batch, where the penalty and top_k's threshold come from one call for all rows
    (`penalized_rows`), as alone in the token iterator, which runs them itself."""
    llm = LLM(model)
    opts = dict(max_tokens=16, temperature=0.9, top_p=0.8, top_k=20, repetition_penalty=1.05, ignore_eos=True)
    engine = llm.engine
    seqs = [engine.add_request(llm.encode(p)[0], model.params(**opts, seed=s))
            for s, p in enumerate(PROMPTS[:5])]
    assert all(s.stepper.fused for s in seqs)
    engine.run_until_done()
    for s, (seq, p) in enumerate(zip(seqs, PROMPTS[:5], strict=True)):
        alone = [t.token_id for t in model.stream_tokens(llm.encode(p)[0], model.params(**opts, seed=s))]
        assert seq.output_ids == alone, s
