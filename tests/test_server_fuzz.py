"""A seeded, schema-driven fuzz of the server's OpenAPI spec: a few hundred requests built from
`app.openapi()` (valid bodies with random in-range values, then extreme, wrong-typed and missing fields,
bad JSON, wrong content types) against a tiny checkpoint. No request may get a 5xx or a non-OpenAI error,
and the server must stay healthy."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from fastapi.testclient import TestClient

from qianwen.engine import EngineConfig
from qianwen.server import ServerConfig, create_app

from ._server_fixtures import load_tiny

NAME = "tiny"
SEED = 20261130
N_REQUESTS = 300

# values that break careless code: extremes, wrong types, NaN-like strings, huge containers
HOSTILE: list[Any] = [
    None, True, False, 0, -1, 1, 2, 3, 21, 255, 256, 257, 10 ** 6, 2 ** 31, 2 ** 63, 2 ** 64, -(2 ** 63) - 1,
    10 ** 30, 10 ** 400, 0.0, -0.0, 5e-324, 1e-300, 1e-38, 1e-8, 0.5, 1.0000001, 1.5, 1e308, -1e308,
    "", "NaN", "nan", "Infinity", "-Infinity", "1e999", "0x10", " 1", "null", "true", "\x00", "<|im_end|>",
    "你好" * 50, "x" * 20000, [], {}, [None], [1] * 300, [[1, 2], [3]], [[]], [""], ["a"] * 50, {"a": 1},
    [{"role": "user"}], [{"type": "function"}], {"type": "function", "function": {"name": ""}},
]
# optional fields a valid body leaves out (only the mutations set them): the server refuses suffix,
# max_completion_tokens would override the short max_tokens valid bodies get, and a random value of an
# output-constraint field is almost never a valid schema, regex or grammar (400s that would crowd out the rest)
RARE = {"suffix", "max_completion_tokens", "response_format", "guided_json", "guided_regex", "guided_choice",
        "guided_grammar", "structured_outputs"}
# JSON numbers Python's json accepts but strict JSON does not
RAW_NUMBERS = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1" + "0" * 5000]


def resolve(spec: dict, schema: dict) -> dict:
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def valid(spec: dict, schema: dict, rng: random.Random, name: str = "", depth: int = 0) -> Any:
    """A random value the schema allows (small numbers where size costs time)."""
    schema = resolve(spec, schema)
    if "anyOf" in schema:
        options = [s for s in schema["anyOf"] if s.get("type") != "null" or rng.random() < 0.2]
        # bounds written beside anyOf (the sampling fields derived from SamplingParams) apply to each option
        bounds = {k: v for k, v in schema.items() if k in ("minimum", "exclusiveMinimum", "maximum")}
        return valid(spec, {**resolve(spec, rng.choice(options or schema["anyOf"])), **bounds}, rng, name, depth)
    if "enum" in schema:
        return rng.choice(schema["enum"])
    if "const" in schema:
        return schema["const"]
    t = schema.get("type")
    if t == "null":
        return None
    if name == "model":
        return NAME
    if t == "object" or "properties" in schema:
        props = schema.get("properties", {})
        required = set(schema.get("required", []))
        out = {}
        for key, sub in props.items():
            if key in required or (depth < 3 and key not in RARE and rng.random() < 0.5):
                out[key] = valid(spec, sub, rng, key, depth + 1)
        if "max_tokens" in props:  # short answers keep the run short (a fuzzed body may still drop it)
            out["max_tokens"] = rng.randint(0 if "echo" in props else 1, 4)
        if out.get("top_logprobs") is not None:
            out["logprobs"] = True
        return out
    if t == "array":
        hi = 1 if depth >= 3 else 3
        return [valid(spec, schema.get("items", {}), rng, name, depth + 1) for _ in range(rng.randint(1, hi))]
    if t == "string":
        lo, hi = schema.get("minLength", 0), min(schema.get("maxLength", 24), 24)
        alphabet = "abc xyz 你好 <|im_end|>\n"
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(max(lo, 1), max(hi, lo, 1))))
    if t == "boolean":
        return rng.random() < 0.5
    if t == "integer":
        lo = int(schema.get("minimum", -5))
        hi = int(schema.get("maximum", lo + 8))
        if name in ("max_tokens", "max_completion_tokens", "n"):
            hi = min(hi, lo + 4)
        if name in ("prompt", "tokens"):  # token ids: the tiny vocabulary's
            lo, hi = 0, 383
        return rng.randint(lo, max(lo, hi))
    if t == "number":
        lo = schema.get("minimum", schema.get("exclusiveMinimum", -2.0))
        hi = schema.get("maximum", lo + 4)
        edge = [lo, hi, (lo + hi) / 2]
        if "exclusiveMinimum" in schema:
            edge = [5e-324, 1e-300, 1e-38, hi]  # just above an open bound: the numerically dangerous end
        return rng.choice(edge) if rng.random() < 0.5 else rng.uniform(lo, hi)
    return rng.choice(["x", 1, None])


def all_fields(spec: dict, schema: dict, prefix: tuple = ()) -> list[tuple]:
    """Paths of every property (nested objects included) in a request schema."""
    schema = resolve(spec, schema)
    out = []
    for key, sub in schema.get("properties", {}).items():
        out.append(prefix + (key,))
        sub = resolve(spec, sub)
        for option in sub.get("anyOf", [sub]):
            option = resolve(spec, option)
            if "properties" in option:
                out += all_fields(spec, option, prefix + (key,))
    return out


def set_path(body: dict, path: tuple, value: Any, delete: bool = False) -> dict:
    node = body
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    if delete:
        node.pop(path[-1], None)
    else:
        node[path[-1]] = value
    return body


def cases(spec: dict, rng: random.Random) -> list[tuple[str, bytes, dict[str, str]]]:
    """(path, body, headers) for N_REQUESTS requests."""
    j = {"content-type": "application/json"}
    routes = [(p, op["requestBody"]["content"]["application/json"]["schema"])
              for p, item in spec["paths"].items() for m, op in item.items() if m == "post" and "requestBody" in op]
    weights = [len(all_fields(spec, schema)) for _, schema in routes]  # richer routes get more requests
    out: list[tuple[str, bytes, dict[str, str]]] = []
    while len(out) < N_REQUESTS:
        path, schema = rng.choices(routes, weights)[0]
        body = valid(spec, schema, rng)
        kind = rng.random()
        if kind < 0.3:  # in-range values only (sampling edge values included)
            pass
        elif kind < 0.75:  # one to three fields hostile
            fields = all_fields(spec, schema)
            for f in rng.sample(fields, min(len(fields), rng.randint(1, 3))):
                set_path(body, f, rng.choice(HOSTILE))
        elif kind < 0.85:  # a field missing
            set_path(body, rng.choice(all_fields(spec, schema)), None, delete=True)
        elif kind < 0.92:  # a number JSON does not allow, or a huge one
            text = json.dumps({**body, rng.choice(["temperature", "top_p", "max_tokens", "n", "seed",
                                                   "logprobs", "repetition_penalty"]): "@@"})
            out.append((path, text.replace('"@@"', rng.choice(RAW_NUMBERS)).encode(), j))
            continue
        else:  # bytes that are not the JSON object asked for, or the wrong content type
            raw = json.dumps(body).encode()
            bad = [raw[: rng.randint(0, len(raw))], b"\xff\xfe" + raw, b"[" + raw + b"]", b"null", b"",
                   raw.replace(b'"', b"'"), b"{" * 5000, b"[" * 100000]
            headers = rng.choice([j, {"content-type": "text/plain"}, {"content-type": "application/x-www-form-urlencoded"},
                                  {}])
            out.append((path, rng.choice(bad) if headers is j else raw, headers))
            continue
        out.append((path, json.dumps(body).encode(), j))
    return out


def is_openai_error(data: Any) -> bool:
    err = data.get("error") if isinstance(data, dict) else None
    return (isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}
            and isinstance(err["message"], str) and bool(err["message"]))


@pytest.fixture(scope="module")
def client(tiny_qwen2_dir):
    model = load_tiny(tiny_qwen2_dir, "float32")
    app = create_app(model, EngineConfig(max_num_seqs=8), ServerConfig(model_name=NAME, max_n=4, max_queue=64))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def test_fuzz_openapi_no_5xx(client):
    spec = client.get("/openapi.json").json()
    rng = random.Random(SEED)
    failures = []
    statuses: dict[int, int] = {}
    for path, body, headers in cases(spec, rng):
        r = client.post(path, content=body, headers=headers)
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        what = f"{r.status_code} {path} {body[:300]!r} -> {r.text[:300]}"
        if r.status_code >= 500:
            failures.append(what)
        elif r.status_code >= 400:
            try:
                ok = is_openai_error(r.json())
            except ValueError:
                ok = False
            if not ok:
                failures.append("not an OpenAI error: " + what)
        elif r.headers["content-type"].startswith("text/event-stream"):
            events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
            if events[-1:] != ["[DONE]"] or any('"error"' in e for e in events):
                failures.append("bad stream: " + what)
        else:
            data = r.json()
            if path.startswith("/v1/") and not data.get("choices"):
                failures.append("no choices: " + what)
    assert not failures, f"{len(failures)} bad responses (statuses {statuses}):\n" + "\n".join(failures[:30])
    assert statuses.get(200, 0) >= N_REQUESTS // 10, statuses  # the fuzz also reaches generation
    assert client.get("/health").status_code == 200
    ok = client.post("/v1/completions", json={"model": NAME, "prompt": "still fine?", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] is not None
