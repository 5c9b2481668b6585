"""Sampling parameters, declared once: each user-facing field carries its help text, valid range, the
value that turns it off, its OpenAI request name and its CLI flag. The CLI flags (cli/common.py), the
server's request fields (server/schemas.py) and evaluation's plain decoding (eval/runner.py) are all
derived from `OPTIONS`, and `check_option` is the one validation every entry point runs.

This module imports no torch, so the CLI can build its parser without it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import QianwenError

# docs/conventions.md: chat defaults when the checkpoint has no generation_config.json (Qwen2.5's values)
DEFAULTS: dict[str, Any] = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05, "max_tokens": 512}
MAX_STOPS = 16
INT64 = (-2**63, 2**63 - 1)


@dataclass(frozen=True)
class Option:
    """What a user-facing sampling field means and accepts."""

    help: str
    kind: type  # int, float, str (stop strings), bool
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    off: Any = None  # the value that disables it (evaluation's plain decoding); None: no such value
    api: str = ""  # the OpenAI request field ("" = the field name)
    flag: str = ""  # the CLI flag ("" = --field-name)

    def describe_range(self) -> str:
        low = f">= {self.ge}" if self.ge is not None else f"> {self.gt}" if self.gt is not None else ""
        high = f"<= {self.le}" if self.le is not None else ""
        return " and ".join(x for x in (low, high) if x)


def _opt(default: Any, **meta: Any) -> Any:
    return field(default=default, metadata={"option": Option(**meta)})


@dataclass
class SamplingParams:
    max_tokens: int = _opt(512, help="most new tokens per answer", kind=int, ge=1)
    temperature: float = _opt(0.7, help="0 for greedy", kind=float, ge=0, le=2, off=0.0)
    top_p: float = _opt(1.0, help="keep the smallest set of tokens whose probability reaches this", kind=float,
                        gt=0, le=1, off=1.0)
    top_k: int = _opt(0, help="keep the k most likely tokens (0 or -1: off)", kind=int, ge=-1, off=0)
    min_p: float = _opt(0.0, help="drop tokens less likely than this fraction of the best one", kind=float,
                        ge=0, le=1, off=0.0)
    repetition_penalty: float = _opt(1.0, help="divide the logits of tokens already seen (1: off)", kind=float,
                                     gt=0, le=10, off=1.0)
    presence_penalty: float = _opt(0.0, help="subtract from tokens already generated", kind=float, ge=-2, le=2,
                                   off=0.0)
    frequency_penalty: float = _opt(0.0, help="subtract per occurrence in the generated text", kind=float,
                                    ge=-2, le=2, off=0.0)
    seed: int | None = _opt(None, help="same seed, same output", kind=int, ge=INT64[0], le=INT64[1])
    stop: list[str] = field(default_factory=list, metadata={"option": Option(
        help=f"a stop string (at most {MAX_STOPS})", kind=str)})
    ignore_eos: bool = _opt(False, help="keep generating after the end-of-sequence token", kind=bool)
    # set by the caller, not user options of their own
    stop_token_ids: set[int] = field(default_factory=set)
    logprobs: int | None = None  # number of top alternatives to report per step

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0 or self.top_k == 1

    def replace(self, **kw: Any) -> SamplingParams:
        return replace(self, **kw)


OPTIONS: dict[str, Option] = {f.name: f.metadata["option"] for f in dataclasses.fields(SamplingParams)
                              if "option" in f.metadata}


def check_option(name: str, value: Any) -> Any:
    """The one validation of a sampling value (CLI, server, Python API). Returns the value (stop: as a list);
    raises QianwenError naming the rule. None means "use the default" and always passes."""
    opt = OPTIONS.get(name)
    if opt is None:
        raise QianwenError(f"unknown sampling option {name!r}; known: {', '.join(OPTIONS)}")
    if value is None:
        return None
    if opt.kind is str:  # stop strings
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, (list, tuple)) or any(not isinstance(s, str) or not s for s in stops):
            raise QianwenError(f"{name} must be a non-empty string or a list of non-empty strings")
        if len(stops) > MAX_STOPS:
            raise QianwenError(f"{name}: at most {MAX_STOPS} stop strings are allowed, got {len(stops)}")
        return list(stops)
    if opt.kind is bool:
        if not isinstance(value, bool):
            raise QianwenError(f"{name} must be true or false, got {value!r}")
        return value
    numeric = (int,) if opt.kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, numeric):
        raise QianwenError(f"{name} must be {'an integer' if opt.kind is int else 'a number'}, got {value!r}")
    ok = (isinstance(value, int) or math.isfinite(value)) and not (  # math.isfinite overflows on huge ints
        (opt.ge is not None and value < opt.ge) or (opt.gt is not None and value <= opt.gt)
        or (opt.le is not None and value > opt.le))
    if not ok:
        raise QianwenError(f"{name} must be {opt.describe_range()}, got {value!r}")
    return value


def plain_options() -> dict[str, Any]:
    """Every option that can be switched off, switched off: plain greedy decoding (evaluation's setting)."""
    return {name: opt.off for name, opt in OPTIONS.items() if opt.off is not None}


def defaults_from_generation_config(gen: dict[str, Any]) -> dict[str, Any]:
    """Sampling defaults from a checkpoint's generation_config.json, docs/conventions.md's where absent."""
    out = dict(DEFAULTS)
    if not gen:
        return out
    if gen.get("do_sample") is False:
        out["temperature"] = 0.0
    for key in ("temperature", "top_p", "top_k", "repetition_penalty"):
        if gen.get(key) is not None and not (key == "temperature" and gen.get("do_sample") is False):
            out[key] = gen[key]
    if gen.get("max_new_tokens"):
        out["max_tokens"] = int(gen["max_new_tokens"])
    return out


def make_params(defaults: dict[str, Any], stop_token_ids: set[int], **overrides: Any) -> SamplingParams:
    """SamplingParams from defaults plus the caller's non-None overrides (checked by `check_option`);
    `stop` may be a str; `stop_token_ids` and `logprobs` are added as given."""
    kw = dict(defaults)
    extra_ids = set(overrides.pop("stop_token_ids", None) or ())
    logprobs = overrides.pop("logprobs", None)
    kw.update({k: check_option(k, v) for k, v in overrides.items() if v is not None})
    stop = kw.pop("stop", None) or []
    return SamplingParams(stop=[stop] if isinstance(stop, str) else list(stop),
                          stop_token_ids=set(stop_token_ids) | extra_ids, logprobs=logprobs, **kw)
