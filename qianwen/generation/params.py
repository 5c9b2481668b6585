"""Sampling parameters shared by the Python API, the CLI, the engine and the server."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

# docs/conventions.md: chat defaults when the checkpoint has no generation_config.json
DEFAULTS: dict[str, Any] = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05, "max_tokens": 512}


@dataclass
class SamplingParams:
    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: set[int] = field(default_factory=set)
    logprobs: int | None = None  # number of top alternatives to report per step
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0 or self.top_k == 1

    def replace(self, **kw: Any) -> SamplingParams:
        return replace(self, **kw)


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
    """SamplingParams from defaults plus the caller's non-None overrides; `stop` may be a str."""
    kw = dict(defaults)
    kw.update({k: v for k, v in overrides.items() if v is not None})
    stop = kw.pop("stop", None) or []
    extra_ids = set(kw.pop("stop_token_ids", None) or ())
    return SamplingParams(stop=[stop] if isinstance(stop, str) else list(stop),
                          stop_token_ids=set(stop_token_ids) | extra_ids, **kw)
