"""JSON-schema structured output on the default model: every answer validates, greedy and sampled,
alone (Model.chat) and batched in the engine (LLM), plus regex/choice/grammar and the errors."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from qianwen.errors import QianwenError
from qianwen.generation.constrain import GrammarError, grammar_from_request, make_processor

from .structured_schemas import SCHEMAS


@pytest.fixture(scope="module")
def model(default_gguf):
    import qianwen

    return qianwen.load(default_gguf)


@pytest.fixture(scope="module")
def llm(model):
    from qianwen.engine import LLM

    return LLM(model)


def _messages(prompt: str, schema: dict) -> list[dict]:
    return [{"role": "user", "content": "Reply in JSON only. " + prompt}]


def _check(text: str, schema: dict) -> None:
    jsonschema.validate(json.loads(text), schema)


def test_free_decoding_does_not_follow_the_schemas(llm):
    """The constraint is what makes the answers valid: without it most of them are not JSON at all."""
    reqs = [{"messages": _messages(p, s), "temperature": 0, "max_tokens": 32} for p, s in SCHEMAS[:4]]
    bad = 0
    for c, (_, s) in zip(llm.generate(reqs), SCHEMAS[:4], strict=True):
        try:
            _check(c.text, s)
        except (json.JSONDecodeError, jsonschema.ValidationError):
            bad += 1
    assert bad >= 2


def test_every_schema_greedy_batched(llm):
    reqs = [{"messages": _messages(p, s), "json_schema": s, "temperature": 0, "max_tokens": 100} for p, s in SCHEMAS]
    outs = llm.generate(reqs)
    for c, (_, s) in zip(outs, SCHEMAS, strict=True):
        assert c.finish_reason == "stop", c.text
        _check(c.text, s)


def test_sampled_batched(llm):
    """Sampled with the chat defaults (temperature 0.7, top_p 0.8, top_k 20), on schemas without fractional
    numbers: sampling can extend a `number`'s digits without end (valid so far, then cut by max_tokens with
    finish_reason "length"; docs/server.md says so). Integers, strings, enums, $ref, anyOf, patterns here."""
    subset = [SCHEMAS[i] for i in (0, 1, 3, 5, 7, 15, 22, 30)]
    reqs = [{"messages": _messages(p, s), "json_schema": s, "seed": 7 + i, "max_tokens": 100}
            for i, (p, s) in enumerate(subset)]
    for c, (_, s) in zip(llm.generate(reqs), subset, strict=True):
        assert c.finish_reason == "stop", c.text
        _check(c.text, s)


@pytest.mark.parametrize("i", [5, 22])
def test_alone_greedy_and_sampled(model, i):
    prompt, schema = SCHEMAS[i]
    _check(model.chat(_messages(prompt, schema), json_schema=schema, temperature=0, max_tokens=160), schema)
    text = model.chat(_messages(prompt, schema), response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}},
        temperature=0.9, seed=3, max_tokens=160)
    _check(text, schema)


def test_alone_matches_batched(model, llm):
    """A constrained greedy answer does not depend on what else is in the batch (or on the path)."""
    prompt, schema = SCHEMAS[6]
    alone = model.chat(_messages(prompt, schema), json_schema=schema, temperature=0, max_tokens=80)
    batch = llm.generate([{"messages": _messages(p, s), "json_schema": s, "temperature": 0, "max_tokens": 80}
                          for p, s in SCHEMAS[4:9]])
    assert batch[2].text == alone


def test_json_object_regex_choice_and_grammar(model):
    text = model.generate("My favourite things:", response_format={"type": "json_object"}, temperature=0,
                          max_tokens=64)
    assert isinstance(json.loads(text), dict)
    assert model.generate("Phone:", regex=r"\d{3}-\d{4}", temperature=0.8, seed=1, max_tokens=20) \
        .count("-") == 1
    assert model.generate("Is water wet?", choice=["yes", "no", "maybe"], temperature=0.8, seed=2,
                          max_tokens=5) in ("yes", "no", "maybe")
    out = model.generate("Count:", grammar='start: NUM ("," NUM)~1\nNUM: /[1-9]/', temperature=0, max_tokens=12)
    assert len(out.split(",")) == 2 and all(x.isdigit() for x in out.split(","))
    gbnf = 'root ::= "a" | "b"'
    assert model.generate("x", grammar=gbnf, temperature=0, max_tokens=4) in ("a", "b")


def test_processor_masks_forbidden_tokens(model):
    grammar = grammar_from_request(choice=["yes", "no"])
    proc = make_processor(model.tokenizer, model.stop_token_ids, grammar, model.config.vocab_size)
    logits = torch.zeros(model.config.vocab_size)
    out = proc([], [], logits.clone())
    allowed = {model.tokenizer.decode([i]) for i in torch.nonzero(out > float("-inf")).flatten().tolist()}
    assert allowed and all("yes".startswith(a) or "no".startswith(a) for a in allowed)
    ids = model.tokenizer.encode("yes")
    out = proc([], ids, logits.clone())  # complete: only end tokens remain
    assert set(torch.nonzero(out > float("-inf")).flatten().tolist()) <= model.stop_token_ids


@pytest.mark.parametrize("spec, needle", [
    ({"json_schema": {"type": "object", "if": {"required": ["a"]}, "then": {}}}, "if"),
    ({"json_schema": {"type": "strin"}}, "strin"),
    ({"json_schema": {"type": "array", "uniqueItems": True}}, "uniqueItems"),
    ({"response_format": {"type": "xml"}}, "xml"),
    ({"response_format": {"type": "json_schema"}}, "schema"),
    ({"grammar": "start: ("}, "constraint"),
    ({"regex": "a(", "choice": ["a"]}, "at most one"),
])
def test_unenforceable_constraints_are_named(model, spec, needle):
    with pytest.raises(GrammarError, match=needle) as e:
        model.generate("hi", max_tokens=4, **spec)
    assert isinstance(e.value, QianwenError)


def test_cli_json_schema_and_json(default_gguf, tmp_path, capsys):
    from qianwen.cli.main import main

    prompt, schema = SCHEMAS[0]
    path = tmp_path / "person.json"
    path.write_text(json.dumps(schema))
    base = ["generate", "--chat", "-m", str(default_gguf), "--temperature", "0", "--max-tokens", "60"]
    assert main([*base, "--json-schema", str(path), prompt]) == 0
    _check(capsys.readouterr().out.strip(), schema)
    assert main([*base, "--json-schema", json.dumps(schema), prompt]) == 0  # the schema inline
    _check(capsys.readouterr().out.strip(), schema)
    assert main([*base, "--json", prompt]) == 0
    assert isinstance(json.loads(capsys.readouterr().out.strip()), dict)
    assert main([*base, "--json-schema", str(tmp_path / "missing.json"), prompt]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot read the JSON schema") and err.count("\n") == 1
    path.write_text(json.dumps({"type": "array", "uniqueItems": True}))
    assert main([*base, "--json-schema", str(path), prompt]) == 1
    assert "uniqueItems" in capsys.readouterr().err
