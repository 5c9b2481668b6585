"""One token step: processors compose, stream_tokens and the engine agree, sampling is safe for every accepted
value, and the sampling options are declared once (CLI flags, server fields and eval derive from them)."""

from __future__ import annotations

import math

import pytest
import torch

import qianwen
from qianwen.engine import LLM
from qianwen.errors import QianwenError
from qianwen.generation.params import OPTIONS, SamplingParams, check_option, plain_options
from qianwen.generation.sampling import SamplingError, make_logits_processors, sample

from .conftest import kernel_body


@pytest.fixture(scope="module")
def model(tiny_qwen2_dir):
    return qianwen.load(str(tiny_qwen2_dir), dtype="float32")


def ban(token: int):
    def fn(prompt_ids, output_ids, logits):
        logits[token] = float("-inf")
        return logits
    return fn


def test_processors_compose_and_both_paths_agree(model):
    """The same processors in the Python API and the engine give the same tokens; they run in order after
    the penalties, each seeing the previous one's output."""
    kw = {"max_tokens": 12, "temperature": 0, "ignore_eos": True}
    plain = model.stream_tokens(model.encode_chat([{"role": "user", "content": "hi"}]), model.params(**kw))
    first_two = [s.token_id for s in plain][:2]
    procs = [ban(first_two[0]), ban(first_two[1])]
    prompt = [{"role": "user", "content": "hi"}]
    ids = model.encode_chat(prompt)
    api = [s.token_id for s in model.stream_tokens(ids, model.params(**kw), logits_processors=procs)]
    assert first_two[0] not in api and first_two[1] not in api
    engine = LLM(model).generate([{"messages": prompt, **kw, "logits_processors": procs}])[0]
    assert engine.token_ids == api
    assert model.chat(prompt, **kw, logits_processors=procs) == engine.text
    seen = []

    def spy(prompt_ids, output_ids, logits):
        seen.append((list(prompt_ids), list(output_ids), logits.dtype, tuple(logits.shape)))
        return logits

    model.generate("abc", max_tokens=3, temperature=0, ignore_eos=True, logits_processors=[spy])
    assert [len(o) for _, o, _, _ in seen] == [0, 1, 2]
    assert all(d == torch.float32 and s == (model.config.vocab_size,) for _, _, d, s in seen)
    # penalties are processors too, listed first
    p = SamplingParams(repetition_penalty=1.3, presence_penalty=0.5)
    assert len(make_logits_processors(p, [spy])) == 3 and make_logits_processors(p, [spy])[-1] is spy
    assert make_logits_processors(SamplingParams(), []) == []


def test_sample_is_safe():
    p = SamplingParams(temperature=1.0)
    g = torch.Generator().manual_seed(0)
    with pytest.raises(SamplingError, match="NaN"):
        sample(torch.tensor([0.0, float("nan"), 1.0]), p, g)
    with pytest.raises(SamplingError, match="masked"):
        sample(torch.full((4,), float("-inf")), p, g)
    with pytest.raises(SamplingError, match="NaN"):
        sample(torch.tensor([0.0, float("nan")]), p.replace(temperature=0), g)
    inf = torch.tensor([1.0, float("inf"), 2.0, float("inf")])
    assert {sample(inf, p, g) for _ in range(50)} == {1, 3}
    tiny_t = p.replace(temperature=1e-45)  # dividing the logits by it would overflow
    assert all(sample(torch.tensor([1.0, 3.0, 2.0]), tiny_t, g) == 1 for _ in range(20))


EXTREMES = [{"repetition_penalty": 5e-324}, {"repetition_penalty": 1e-30}, {"repetition_penalty": 10},
            {"temperature": 1e-45}, {"temperature": 2}, {"top_p": 5e-324}, {"min_p": 1.0}, {"top_k": 10**9},
            {"top_k": 10**400},            {"top_k": -1}, {"presence_penalty": -2, "frequency_penalty": 2}, {"seed": -2**63},
            {"seed": 2**63 - 1}]


@pytest.mark.parametrize("extreme", EXTREMES, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_every_accepted_value_samples(model, extreme):
    """Issue 10: repetition_penalty 5e-324 gave "probability tensor contains inf, nan" and killed the server."""
    for k, v in extreme.items():
        assert check_option(k, v) == v  # accepted ...
    opts = {"max_tokens": 6, "temperature": 1.0, "ignore_eos": True, "seed": 1, **extreme}
    out = model.generate("the quick brown fox " * 3, **opts)  # ... and safe
    assert isinstance(out, str)
    assert LLM(model).generate([{"prompt": "the quick brown fox " * 3, **opts}])[0].finish_reason == "length"


BAD = [("temperature", -1), ("temperature", 2.5), ("top_p", 5), ("top_p", 0), ("max_tokens", 0), ("top_k", -2),
       ("min_p", 1.5), ("repetition_penalty", 0), ("presence_penalty", 3), ("frequency_penalty", -2.5),
       ("seed", 2**64), ("temperature", math.nan), ("temperature", math.inf), ("max_tokens", 1.5),
       ("stop", [""]), ("stop", ["a"] * 17), ("stop", 5), ("ignore_eos", 1)]


@pytest.mark.parametrize("name,value", BAD)
def test_one_validation_everywhere(model, name, value):
    """The CLI, the Python API and the server reject the same values (issue 10: the CLI ran them silently)."""
    from fastapi.testclient import TestClient

    from qianwen.cli.main import build_parser
    from qianwen.server import ServerConfig, create_app

    with pytest.raises(QianwenError, match=name):
        check_option(name, value)
    with pytest.raises(QianwenError, match=name):
        model.generate("hi", **{name: value})
    if OPTIONS[name].kind in (int, float) and math.isfinite(value):  # on the command line
        flag = "--" + name.replace("_", "-")
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args(["generate", "hi", flag, str(value)])
        assert e.value.code == 2
    app = create_app(model, config=ServerConfig(model_name="m"))
    with TestClient(app) as c:
        body = {"model": "m", "prompt": "hi", name: value}
        r = c.post("/v1/completions", content=_json(body), headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        assert name in r.json()["error"]["message"]


def _json(body: dict) -> str:
    import json

    return json.dumps(body)  # NaN and Infinity as JavaScript literals: what a careless client sends


def test_cli_bad_value_is_one_line(capsys):
    from qianwen.cli.main import main

    for args in (["--temperature", "-1"], ["--top-p", "5"], ["--max-tokens", "0"], ["--top-k", "x"]):
        with pytest.raises(SystemExit) as e:
            main(["generate", "hi", *args])  # rejected before any model is loaded
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and args[0] in err and "error" in err


def test_sampling_options_declared_once():
    """CLI flags, server request fields (with their ranges in the OpenAPI schema) and eval's plain decoding
    all come from SamplingParams' declaration."""
    from qianwen.cli.main import build_parser
    from qianwen.eval.runner import _requests
    from qianwen.server.schemas import ChatCompletionRequest, CompletionRequest

    parser = build_parser()
    for cmd in ("generate", "chat"):
        args = parser.parse_args([cmd, "x"] if cmd == "generate" else [cmd])
        assert set(OPTIONS) <= set(vars(args))
    for schema in (ChatCompletionRequest, CompletionRequest):
        props = schema.model_json_schema()["properties"]
        for name, opt in OPTIONS.items():
            field = props[opt.api or name]
            if schema is CompletionRequest and name == "max_tokens":  # the one exception: 0 scores with echo
                assert field["anyOf"][0]["minimum"] == 0 and "echo" in field["description"]
                continue
            assert field.get("description") == opt.help
            assert field.get("minimum") == opt.ge and field.get("maximum") == opt.le
            assert field.get("exclusiveMinimum") == opt.gt
    plain = plain_options()
    assert set(plain) == {n for n, o in OPTIONS.items() if o.off is not None} and "repetition_penalty" in plain

    class Stub:
        context_length = 100

    req = _requests(Stub(), [[1, 2]], ["\n"], 5, 0.0, [None])[0]
    assert {k: req[k] for k in plain if k != "temperature"} == {k: v for k, v in plain.items() if k != "temperature"}


def test_repetition_penalty_kept_up_to_date_equals_fresh():
    """The penalty keeps the seen ids as the output grows; each step equals a fresh processor's, also when
    the same processor is handed another sequence's lists or a shorter output."""
    torch.manual_seed(0)
    kept = make_logits_processors(SamplingParams(repetition_penalty=1.3))[0]
    prompt, output = [5, 9, 5, 17], []
    other_prompt, other_output = [1, 2, 3], [4, 4]
    for step in range(40):
        logits = torch.randn(64)
        fresh = make_logits_processors(SamplingParams(repetition_penalty=1.3))[0]
        assert torch.equal(kept(prompt, output, logits.clone()), fresh(prompt, output, logits.clone()))
        if step % 7 == 3:  # another sequence in between, then back
            assert torch.equal(kept(other_prompt, other_output, logits.clone()),
                               fresh(other_prompt, other_output, logits.clone()))
        output.append(int(torch.randint(0, 64, ()))) if step % 5 else output.append(5)
    shorter = output[:3]
    assert torch.equal(kept(prompt, shorter, logits.clone()),
                       make_logits_processors(SamplingParams(repetition_penalty=1.3))[0](prompt, shorter, logits.clone()))


@pytest.mark.parametrize("penalty", [1.3, 1.05, 0.7, 1e-30])
def test_repetition_penalty_equals_transformers(penalty):
    """The penalty (run on the row's numpy view) gives transformers' RepetitionPenaltyLogitsProcessor bit for
    bit, huge, zero and infinite logits and an extreme penalty included."""
    from transformers import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(2)
    logits = torch.randn(300) * 20
    logits[:8] = torch.tensor([0.0, -0.0, 3e38, -3e38, 1e-45, float("inf"), float("-inf"), 7.0])
    prompt, output = list(range(0, 12)), [40, 41, 40, 299]
    want = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([prompt + output]), logits[None].clone())[0]
    got = make_logits_processors(SamplingParams(repetition_penalty=penalty))[0](prompt, output, logits.clone())
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(0.0), want.nan_to_num(0.0))
    assert torch.equal(got.signbit(), want.signbit())


def test_batched_greedy_choice_is_each_rows_own():
    """The engine's one max over a batch picks, for every row, the token the row alone gives (the first of
    tied maxima), and a NaN or fully masked row raises for that row only."""
    from qianwen.engine.llm_engine import LLMEngine
    from qianwen.engine.sequence import Sequence
    from qianwen.generation.step import TokenStepper

    class Tok:  # the token step's detokenizer needs only these
        strip_leading_space = False
        special_ids = frozenset()

        def id_to_token_bytes(self, i):
            return b"x"

    torch.manual_seed(1)
    rows = torch.randn(6, 50)
    rows[1, [3, 7, 40]] = 9.0  # ties: the first wins
    rows[2] = 2.0  # every logit tied
    rows[3, 11] = float("nan")
    rows[4] = float("-inf")
    params = SamplingParams(temperature=0, ignore_eos=True)
    seqs = [Sequence(TokenStepper(Tok(), [1], params, 5)) for _ in range(6)]
    assert all(s.stepper.fused for s in seqs)
    engine = LLMEngine.__new__(LLMEngine)  # only _sample's bookkeeping is used
    engine.seqs, engine.scheduler = {}, type("S", (), {"finish": lambda self, s: None})()
    outs = engine._sample(seqs, rows)
    for i in (0, 1, 2, 5):
        assert outs[i].token_id == sample(rows[i].clone(), params, None) == int(torch.argmax(rows[i]))
    assert outs[1].token_id == 3 and outs[2].token_id == 0
    assert outs[3].finish_reason == "error" and "NaN" in outs[3].error
    assert outs[4].finish_reason == "error" and "masked" in outs[4].error


@pytest.mark.parametrize("body", ["native", "portable", "numpy"])
def test_penalized_rows_equal_the_penalty_then_the_rows_own_values(body, monkeypatch, tmp_path_factory):
    """`penalized_rows` (one call for a batch: in C on the kernels' threads, else numpy) applies each row's
    repetition penalty in place and finds its first largest logit, a NaN first, and its top_k-th largest: bit
    for bit what `RepetitionPenalty` then `row_maxima` and `torch.topk` give the row alone, for any rows chosen,
    batch size and thread count (parts of a row scanned by different threads)."""
    from qianwen import native
    from qianwen.generation.sampling import RepetitionPenalty, penalized_rows, row_maxima

    if body == "numpy":
        monkeypatch.setattr(native, "lib", lambda: None)
    elif body == "portable":  # kernels.c's plain C body, as CPUs without AVX-512 run it
        so = kernel_body(tmp_path_factory, "portable", ["-mno-avx512f"])
        monkeypatch.setattr(native, "lib", lambda: so)
    gen = torch.Generator().manual_seed(3)
    before = torch.get_num_threads()
    try:
        for trial in range(80):
            B, V = 1 + trial % 5, [7, 16, 49, 1000, 4099][trial % 5]
            rows = torch.randn(B, V, generator=gen) * 5
            if trial % 3 == 0:
                rows[:, ::7] = rows[:, 3:4]  # ties, in different parts of the row
            if trial % 4 == 1:
                rows[0, V // 2:] = float("nan")
            if trial % 6 == 2:
                rows[-1] = float("-inf")
            if trial % 5 == 3:
                rows[0, V - 1] = float("inf")
            which = sorted(set(torch.randint(0, B, (B,), generator=gen).tolist()))
            inputs = []
            for i in which:
                n = int(torch.randint(0, min(V, 30), (), generator=gen))
                ids = torch.randperm(V, generator=gen)[:n].numpy()
                k = [0, 1, 3, 20, V - 1, V, 2 * V][(i + trial) % 7]
                inputs.append((ids, [1.0, 1.3, 0.7, 1e-30][(i + trial) % 4], k))
            want = []
            for i, (ids, p, k) in zip(which, inputs, strict=True):
                row = rows[i].clone()
                RepetitionPenalty(p)(list(map(int, ids)), [], row) if len(ids) and p != 1.0 else None
                value, index = row_maxima(row)[0]
                kth = float(torch.topk(row, k).values[-1]) if 0 < k < V and value == value else None
                want.append((row, value, index, kth))
            torch.set_num_threads(1 + trial % 3)
            got_rows = rows.clone()
            got = penalized_rows(got_rows, which, inputs)
            for i, (row, value, index, kth), (g_value, g_index, g_kth) in zip(which, want, got, strict=True):
                assert g_index == index and (g_value == value or value != value and g_value != g_value), trial
                assert g_kth == kth, (trial, g_kth, kth)
                assert torch.equal(got_rows[i].nan_to_num(7.0), row.nan_to_num(7.0)), trial
            untouched = [i for i in range(B) if i not in which]
            assert torch.equal(got_rows[untouched].nan_to_num(7.0), rows[untouched].nan_to_num(7.0))
    finally:
        torch.set_num_threads(before)


def reference_cuts(scores: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The documented cuts, written out on the whole row in float64 (a full sort for top_p): each token's
    probability of being sampled."""
    s = scores.double()
    best = s.max()
    logits = (s == best).double().log() if best == float("inf") else (s - best) / p.temperature
    if 0 < p.top_k < len(s):
        kth = torch.sort(s, descending=True).values[p.top_k - 1]
        logits[s < kth] = float("-inf")  # ties with the k-th stay
    w = torch.exp(logits)
    total = w.sum()
    if p.min_p > 0:
        w[w < p.min_p] = 0.0
    if p.top_p < 1.0:
        order = torch.sort(w, descending=True, stable=True).indices
        cum = torch.cumsum(w[order], 0)
        w[order[cum - w[order] > p.top_p * total]] = 0.0
    return w / w.sum()


SAMPLED = [dict(temperature=0.7, top_k=20, top_p=0.8), dict(temperature=1.0), dict(temperature=0.3, top_p=0.9),
           dict(temperature=2.0, top_p=0.95), dict(temperature=1.0, min_p=0.1), dict(temperature=1.5, top_p=0.5,
           min_p=0.02), dict(temperature=0.7, top_k=5), dict(temperature=1.0, top_k=1000, top_p=0.99)]


@pytest.mark.parametrize("V", [12, 300, 5000])
@pytest.mark.parametrize("options", SAMPLED, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_sampled_candidates_are_the_documented_cuts(V, options):
    """A sampled step works on candidates only (top_k's, min_p's, top_p's shortlist grown by topk or the
    sorted row, sampling.py `candidates`): the tokens it may choose and their probabilities are those of the
    cuts applied to the whole row, including ties with the k-th logit, masked tokens and +inf logits."""
    from qianwen.generation.sampling import candidates

    gen = torch.Generator().manual_seed(V)
    p = SamplingParams(**options)
    for trial in range(4):
        scores = torch.randn(V, generator=gen) * [1.0, 3.0, 0.2, 8.0][trial]  # peaked to flat
        if trial == 1:
            scores[::3] = float("-inf")
        if trial == 2 and p.top_p == 1.0:
            scores[: V // 2] = scores.max()  # many ties with the best (and the k-th)
        if trial == 3:
            scores[[1, V - 2]] = float("inf")
        want = reference_cuts(scores, p)
        cand, weights = candidates(scores, float(scores.max()), p)
        got = torch.zeros(V, dtype=torch.float64)
        got[cand if cand is not None else slice(None)] = weights.double()
        got /= got.sum()
        assert torch.equal(got > 0, want > 0), (trial, (got > 0).sum(), (want > 0).sum())
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-7), trial


def test_draws_follow_the_weights_and_the_seed():
    from qianwen.generation.sampling import _draw

    weights = torch.tensor([0.0, 3.0, 1.0, 0.0, 6.0, 0.0])

    def draws(seed: int) -> list[int]:
        gen = torch.Generator().manual_seed(seed)
        return [_draw(weights, gen) for _ in range(20000)]

    got = draws(5)
    assert got == draws(5) and got[:50] != draws(6)[:50]
    freq = torch.bincount(torch.tensor(got), minlength=6).double() / len(got)
    assert freq[[0, 3, 5]].sum() == 0
    assert torch.allclose(freq, weights.double() / weights.sum(), atol=0.015), freq
