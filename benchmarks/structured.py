"""Structured-output benchmark: the cost of grammar-constrained decoding against free decoding.

    .venv/bin/python benchmarks/structured.py [--model FILE.gguf] [--schema FILE.json] [--steps 48]
                                             [--threads 2] [--skip-llama]

Measured in one run, on the same GGUF and the same JSON schema:
- llguidance: vocabulary setup (once per tokenizer), schema compile (grammar + matcher), mask time per token;
- qianwen's engine: decode step time, free vs constrained, at batch 1 and 16 (and 8 + 8 mixed), and the time
  each step spends in the constraint (computing the masks after the forward and applying them);
- llama.cpp (llama-cpp-python, if installed, AMX repack off as in benchmarks/decode.py): json_schema ->
  GBNF grammar compile, and decode tokens/s free vs with the grammar.
Overhead = time in the constraint / free step (the goal is <= 10%); on a busy machine the step times of
separate runs differ by more than that, so the time in the constraint is the figure to read.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path

import torch

# a schema whose answers are long enough to time (30 records), with ranges, enums and length limits
SCHEMA = {"type": "array", "minItems": 30, "maxItems": 30, "items": {
    "type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                                     "name": {"type": "string", "maxLength": 12},
                                     "level": {"enum": ["low", "mid", "high"]}, "ok": {"type": "boolean"}},
    "required": ["id", "name", "level", "ok"], "additionalProperties": False}}
PROMPT = "List thirty employees as JSON records with id, name, level and ok."


def _ms(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1e3:.3f} ms"


def bench_llguidance(model, schema: dict) -> None:
    import llguidance as llg

    from qianwen.generation import constrain as C

    t0 = time.perf_counter()
    C._tokenizers.clear()
    lltok = C.ll_tokenizer(model.tokenizer, model.stop_token_ids)
    print(f"llguidance vocabulary setup: {time.perf_counter() - t0:.2f} s ({model.tokenizer.vocab_size} tokens)")
    compile_s = []
    for _ in range(5):
        t0 = time.perf_counter()
        g = C.json_schema_grammar(schema)
        C.check_grammar(g, lltok)
        llg.LLMatcher(lltok, g, log_level=0)
        compile_s.append(time.perf_counter() - t0)
    print(f"llguidance schema compile (grammar + check + matcher): median {_ms(compile_s)}")


def _engine_steps(model, schema: dict, n: int, constrained: list[bool], steps: int) -> tuple[float, float]:
    """Median decode step, and median time per step spent in the constraint (waiting for masks and
    applying them, all sequences together), over `steps` decode steps."""
    from qianwen.engine import LLMEngine
    from qianwen.generation import constrain as C

    engine = LLMEngine(model)
    ids = model.encode_chat([{"role": "user", "content": PROMPT}])
    grammar = C.json_schema_grammar(schema)
    lltok = C.ll_tokenizer(model.tokenizer, model.stop_token_ids)
    spent = [0.0]

    def timed(proc):
        def fn(prompt_ids, out_ids, logits):
            t0 = time.perf_counter()
            r = proc(prompt_ids, out_ids, logits)
            spent[0] += time.perf_counter() - t0
            return r

        return fn

    for i in range(n):
        params = model.params(temperature=0, max_tokens=steps + 4, ignore_eos=not constrained[i])
        procs = [timed(C.GrammarProcessor(lltok, grammar, model.config.vocab_size))] if constrained[i] else []
        engine.add(engine.make_sequence(ids, params, logits_processors=procs))
    times, costs = [], []
    while engine.has_work() and len(times) < steps:
        spent[0] = 0.0
        t0 = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - t0
        if engine.num_steps > 1 and len(outs) == n:  # decode steps with every sequence still running
            times.append(dt)
            costs.append(spent[0])
    return statistics.median(times), statistics.median(costs)


def bench_engine(model, schema: dict, steps: int) -> None:
    for n in (1, 16):
        free, _ = _engine_steps(model, schema, n, [False] * n, steps)
        con, cost = _engine_steps(model, schema, n, [True] * n, steps)
        print(f"batch {n:2d}: step free {free * 1e3:.1f} ms, constrained {con * 1e3:.1f} ms; time in the "
              f"constraint per step {cost * 1e3:.2f} ms ({cost / free * 100:.2f}% of the free step)")
    mixed, cost = _engine_steps(model, schema, 16, [i % 2 == 0 for i in range(16)], steps)
    print(f"batch 16, 8 constrained + 8 free in one batch: step {mixed * 1e3:.1f} ms, constraint {cost * 1e3:.2f} ms")


def bench_llama(path: str, schema: dict, steps: int, threads: int) -> None:
    import llama_cpp

    default = llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False  # the AMX repack path crashes on this CPU (benchmarks/decode.py)
        return p

    llama_cpp.llama_model_default_params = params
    llama_cpp.llama.llama_cpp.llama_model_default_params = params
    llm = llama_cpp.Llama(path, n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False)
    compile_s = []
    for _ in range(5):
        t0 = time.perf_counter()
        grammar = llama_cpp.LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
        compile_s.append(time.perf_counter() - t0)
    print(f"llama.cpp json_schema -> grammar compile: median {_ms(compile_s)}")
    prompt = f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
    llm.create_completion(prompt, max_tokens=1, temperature=0)  # warm up; the prompt stays cached for both runs
    rates = {}
    for name, g in (("free", None), ("grammar", grammar)):
        t0 = time.perf_counter()
        out = llm.create_completion(prompt, max_tokens=steps, temperature=0, grammar=g)
        dt = time.perf_counter() - t0
        rates[name] = out["usage"]["completion_tokens"] / dt
    print(f"llama.cpp decode: free {rates['free']:.1f} tok/s, with grammar {rates['grammar']:.1f} tok/s "
          f"({(rates['free'] / rates['grammar'] - 1) * 100:+.1f}% time per token)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a .gguf file (default: the default model)")
    ap.add_argument("--schema", default=None, help="a JSON schema file (default: 30 records)")
    ap.add_argument("--steps", type=int, default=48, help="decode steps timed per run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-llama", action="store_true")
    ap.add_argument("--skip-qianwen", action="store_true", help="only the llama.cpp part")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import qianwen
    from qianwen.artifacts import DEFAULT_GGUF, fetch

    path = args.model or str(fetch(DEFAULT_GGUF))
    schema = json.loads(Path(args.schema).read_text()) if args.schema else SCHEMA
    if not args.skip_qianwen:
        model = qianwen.load(path)
        print(f"model {Path(path).name}, dtype {model.dtype}, threads {args.threads}")
        bench_llguidance(model, schema)
        bench_engine(model, schema, args.steps)
    if args.skip_llama:
        return 0
    if importlib.util.find_spec("llama_cpp") is None:
        print("llama.cpp skipped: llama-cpp-python is not installed (pip install llama-cpp-python==0.3.36)")
        return 0
    bench_llama(path, schema, args.steps, args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
