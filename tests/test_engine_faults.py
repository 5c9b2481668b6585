"""A failure inside one sequence (a logits processor that raises, NaN logits) ends that request with an error;
every other request and the engine carry on (issue 10 item 3). Fault injection at the engine, the async
engine and the server."""

from __future__ import annotations

import asyncio
import concurrent.futures

import httpx
import pytest

import qianwen
from qianwen.engine import LLM, LLMEngine
from qianwen.engine.async_engine import AsyncEngine
from qianwen.server import ServerConfig, create_app

from ._server_fixtures import ThreadServer

GOOD = {"max_tokens": 10, "temperature": 0, "ignore_eos": True}
MARK = 7  # a prompt that starts with this token id triggers the fault


@pytest.fixture(scope="module")
def model(tiny_qwen2_dir):
    return qianwen.load(str(tiny_qwen2_dir), dtype="float32")


def raises_at(step: int):
    def boom(prompt_ids, output_ids, logits):
        if prompt_ids[0] == MARK and len(output_ids) == step:
            raise RuntimeError("injected fault")
        return logits
    return boom


def nan_at(step: int):
    def poison(prompt_ids, output_ids, logits):
        if prompt_ids[0] == MARK and len(output_ids) == step:
            logits[:] = float("nan")
        return logits
    return poison


FAULTS = {"raises_first": (raises_at(0), "injected fault"), "raises_later": (raises_at(3), "injected fault"),
          "nan_first": (nan_at(0), "NaN"), "nan_later": (nan_at(4), "NaN")}


@pytest.mark.parametrize("fault", FAULTS, ids=list(FAULTS))
def test_llm_engine_isolates_a_failing_sequence(model, fault):
    fn, message = FAULTS[fault]
    engine = LLMEngine(model)
    good_prompt = [11, 12, 13, 14]
    alone = LLM(model).generate([{"prompt": good_prompt, **GOOD}])[0].token_ids
    bad = engine.add_request([MARK, 12, 13], model.params(**GOOD), logits_processors=[fn])
    good = engine.add_request(good_prompt, model.params(**GOOD), logits_processors=[fn])
    outs = []
    engine.run_until_done(outs.append)
    bad_end = [o for o in outs if o.seq_id == bad.seq_id][-1]
    assert bad_end.finish_reason == "error" and message in bad_end.error
    assert bad.is_finished and bad.kv is None
    assert good.output_ids == alone and good.finish_reason == "length"
    assert engine.cache.used == 0 and not engine.seqs and not engine.has_work()  # its cache was freed
    # the engine still serves
    again = engine.add_request(good_prompt, model.params(**GOOD))
    engine.run_until_done()
    assert again.output_ids == alone


def test_llm_generate_reports_the_failed_request(model):
    reqs = [{"prompt": [MARK, 1, 2], **GOOD, "logits_processors": [raises_at(2)]}, {"prompt": [3, 4, 5], **GOOD}]
    bad, good = LLM(model).generate(reqs)
    assert bad.finish_reason == "error" and "injected fault" in bad.error
    assert good.finish_reason == "length" and len(good.token_ids) == 10 and good.error is None


def test_async_engine_isolates_a_failing_sequence(model):
    async def run():
        eng = AsyncEngine(LLMEngine(model))
        eng.start()
        try:
            async def collect(ids, procs):
                seq = eng.engine.make_sequence(ids, model.params(**GOOD), logits_processors=procs)
                return [o async for o in eng.stream(seq)]

            bad, good = await asyncio.gather(collect([MARK, 1, 2], [nan_at(2)]), collect([3, 4, 5], [nan_at(2)]))
            after = await collect([3, 4, 5], [])
            return bad, good, after, eng.error, eng.alive
        finally:
            eng.shutdown()

    bad, good, after, error, alive = asyncio.run(run())
    assert bad[-1].finish_reason == "error" and "NaN" in bad[-1].error
    assert good[-1].finish_reason == "length" and sum(o.token_id >= 0 for o in good) == 10
    assert [o.token_id for o in after] == [o.token_id for o in good]
    assert error is None and alive


def test_server_survives_a_failing_request(model):
    app = create_app(model, config=ServerConfig(model_name="m"))
    app.state.serving.logits_processors = [raises_at(2)]
    good_body = {"model": "m", "prompt": [3, 4, 5], **GOOD}
    bad_body = {"model": "m", "prompt": [MARK, 4, 5], **GOOD}
    with ThreadServer(app) as s, httpx.Client(base_url=s.base, timeout=120) as http:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            fb = pool.submit(http.post, "/v1/completions", json=bad_body)
            fg = pool.submit(http.post, "/v1/completions", json=good_body)
            rb, rg = fb.result(), fg.result()
        assert rb.status_code == 500
        err = rb.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and "injected fault" in err["message"]
        assert rg.status_code == 200 and rg.json()["choices"][0]["finish_reason"] == "length"
        assert rg.json()["usage"]["completion_tokens"] == 10
        # streamed: the failing request ends with an error event, the stream closes cleanly
        with http.stream("POST", "/v1/completions", json={**bad_body, "stream": True}) as r:
            lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
        assert any('"error"' in ln and "injected fault" in ln for ln in lines) and lines[-1] == "data: [DONE]"
        # the value that used to kill the server for good (issue 10)
        r = http.post("/v1/completions", json={**good_body, "temperature": 1, "repetition_penalty": 5e-324})
        assert r.status_code == 200, r.text
        assert http.get("/health").status_code == 200
        r = http.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                    "max_tokens": 3})
        assert r.status_code == 200


@pytest.mark.parametrize("wait", [True, False])
def test_async_engine_hands_each_step_over_once(model, wait):
    """Outputs reach their readers the same whether the engine thread waits for the event loop after each
    step (the CPU default when the kernels take every core) or not; one loop call per step for all of its
    readers."""
    async def run():
        eng = AsyncEngine(LLMEngine(model), wait_for_loop=wait)
        calls = []
        loop = asyncio.get_running_loop()
        original = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a, **k: (calls.append(a[0]), original(*a, **k))[1]
        eng.start()
        try:
            async def collect(ids):
                seq = eng.engine.make_sequence(ids, model.params(**GOOD))
                return [o.token_id async for o in eng.stream(seq)]

            got = await asyncio.gather(collect([3, 4, 5]), collect([6, 7, 8]))
            return got, calls, eng.engine.num_steps
        finally:
            eng.shutdown()
            loop.call_soon_threadsafe = original

    (a, b), calls, steps = asyncio.run(run())
    engine = LLMEngine(model)
    ref = [engine.add_request(ids, model.params(**GOOD)) for ids in ([3, 4, 5], [6, 7, 8])]
    engine.run_until_done()
    assert a == ref[0].output_ids and b == ref[1].output_ids
    from qianwen.engine.async_engine import _deliver

    # one per step (both readers share each call), however many steps apart the two requests arrived
    assert sum(c is _deliver for c in calls) <= steps
