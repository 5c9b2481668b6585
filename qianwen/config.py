"""ModelConfig: the fields every architecture shares, and the readers of config.json's shared keys.

Each architecture (qianwen/models/<model_type>.py) subclasses ModelConfig with its own fields and
defaults, reads its config.json (`from_hf`) and writes its export (`to_hf_dict`); `qianwen.models.read_config`
picks the architecture by `model_type`."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import ModelLoadError

ROPE_TYPES = ("linear", "dynamic", "yarn", "llama3")
MAX_SIZE = 2**31 - 1  # no real size or count comes near it; larger ones are corrupt values


def shown(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def as_int(v: Any, what: str, lo: int = 1, hi: int = MAX_SIZE) -> int:
    """`v` as an int in [lo, hi] (an integral float counts), else one ModelLoadError naming `what`."""
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ModelLoadError(f"{what} is {shown(v)}; expected an integer from {lo} to {hi}")
    return v


def as_float(v: Any, what: str, lo: float = 0.0, hi: float = math.inf, lo_open: bool = False) -> float:
    """`v` as a finite float in [lo, hi] (or (lo, hi] with `lo_open`), else one ModelLoadError."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or not (lo < v if lo_open else lo <= v) or v > hi:
        low = f"{'>' if lo_open else '>='} {lo:g}"
        raise ModelLoadError(f"{what} is {shown(v)}; expected a finite number {low}"
                             + (f" and <= {hi:g}" if hi < math.inf else ""))
    return float(v)


def head_dim_of(hidden: int, heads: int, source: str) -> int:
    """The head dimension a config without an explicit one implies: hidden size / attention heads."""
    if hidden % heads:
        raise ModelLoadError(f"{source}: hidden size {hidden} is not a multiple of the {heads} attention heads")
    return hidden // heads


def as_bool(v: Any, what: str) -> bool:
    if not isinstance(v, bool):
        raise ModelLoadError(f"{what} is {shown(v)}; expected true or false")
    return v


@dataclass
class ModelConfig:
    """Subclassed by each architecture module, which sets `model_type` and `HF_CLASS` (the
    `architectures` entry of an export) and may add fields, change defaults, and extend `from_hf`,
    `check` and `to_hf_dict`."""

    model_type: ClassVar[str] = ""
    HF_CLASS: ClassVar[str] = ""
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # per-projection MLP width (Qwen-7B's config value is halved at read)
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "linear"|"dynamic"|"yarn"|"llama3", ...}
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q, k, v projections
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm of q and k (Qwen3)
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> ModelConfig:
        """From config.json's contents (its model_type already matched), every value read checked."""
        return cls(**hf_fields(d))

    def check(self, source: str) -> ModelConfig:
        """The facts that tie fields together (head counts dividing, rope scaling complete); `source`
        names the file in the error ('config.json', 'GGUF'). Token ids are only used as stop tokens: one
        outside the vocabulary never matches (llama.cpp ignores such ids too)."""
        c = self
        if c.num_attention_heads % c.num_key_value_heads:
            raise ModelLoadError(f"{source}: {c.num_attention_heads} attention heads are not a multiple of the "
                                 f"{c.num_key_value_heads} key/value heads")
        if c.head_dim % 2:
            raise ModelLoadError(f"{source}: head dimension {c.head_dim} is odd; rotary embeddings need it even")
        if c.rope_scaling is not None:
            s, kind = c.rope_scaling, c.rope_scaling.get("rope_type")
            what = f"{source} rope scaling ({kind})"
            as_float(s.get("factor"), f"{what} 'factor'", lo_open=True)
            if kind == "llama3":
                for key in ("low_freq_factor", "high_freq_factor"):
                    as_float(s.get(key), f"{what} '{key}'", lo_open=True)
            if kind == "llama3" or s.get("original_max_position_embeddings") is not None:
                as_int(s.get("original_max_position_embeddings"), f"{what} 'original_max_position_embeddings'")
            for key in ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
                if s.get(key) is not None:
                    as_float(s[key], f"{what} '{key}'")
        return self

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json in the Hugging Face layout: the shared keys; each architecture adds its own."""
        return {
            "architectures": [self.HF_CLASS], "model_type": self.model_type, "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id[0] if len(self.eos_token_id) == 1 else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }

    def replace(self, **kw: Any) -> ModelConfig:
        return dataclasses.replace(self, **kw)


def get_key(d: dict[str, Any], *keys: str, default: Any = ...) -> Any:
    for k in keys:
        if d.get(k) is not None:
            return d[k]
    if default is ...:
        raise ModelLoadError(f"config.json is missing '{keys[0]}'")
    return default


def read_int(d: dict[str, Any], *keys: str, default: Any = ..., lo: int = 1) -> int:
    """An integer field (the first of `keys` present), checked for its type and range."""
    key = next((k for k in keys if d.get(k) is not None), keys[0])
    return as_int(get_key(d, *keys, default=default), f"config.json '{key}'", lo)


def read_float(d: dict[str, Any], key: str, default: float, **limits: Any) -> float:
    return as_float(get_key(d, key, default=default), f"config.json '{key}'", **limits)


def read_bool(d: dict[str, Any], key: str) -> bool:
    return as_bool(d.get(key, False), f"config.json '{key}'")


def read_token_id(d: dict[str, Any], key: str) -> int | None:
    v = d.get(key)
    if key == "pad_token_id" and v == -1:  # an old convention for "no pad token"
        return None
    return None if v is None else as_int(v, f"config.json '{key}'", 0)


def read_eos(v: Any) -> list[int]:
    if v is None:
        return []
    return [as_int(x, "config.json 'eos_token_id'", 0) for x in (v if isinstance(v, (list, tuple)) else [v])]


def _rope(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """Read rope settings from the hub keys (rope_theta, rope_scaling) or transformers 5's rope_parameters."""
    params = d.get("rope_parameters") or {}
    for key, v in (("rope_parameters", params), ("rope_scaling", d.get("rope_scaling") or {})):
        if not isinstance(v, dict):
            raise ModelLoadError(f"config.json '{key}' is {shown(v)}; expected an object")
    theta = params.get("rope_theta") if params.get("rope_theta") is not None else d.get("rope_theta")
    theta = as_float(theta if theta is not None else 10000.0, "config.json 'rope_theta'", lo_open=True)
    scaling = d.get("rope_scaling") or {k: v for k, v in params.items() if k != "rope_theta"} or None
    if scaling:
        scaling = dict(scaling)
        rtype = scaling.pop("type", None) or scaling.get("rope_type") or "default"
        scaling["rope_type"] = rtype
        if rtype == "default":
            scaling = None
        elif rtype not in ROPE_TYPES:
            raise ModelLoadError(f"unsupported rope scaling type {shown(rtype)} ({', '.join(ROPE_TYPES)} are)")
    return theta, scaling


def hf_fields(d: dict[str, Any]) -> dict[str, Any]:
    """The ModelConfig fields every Hugging Face config.json gives in the same keys (all but model_type
    and the architecture's own), each checked for its type and range."""
    hidden = read_int(d, "hidden_size")
    heads = read_int(d, "num_attention_heads")
    theta, scaling = _rope(d)
    return dict(
        vocab_size=read_int(d, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=read_int(d, "intermediate_size"),
        num_hidden_layers=read_int(d, "num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=read_int(d, "num_key_value_heads", default=heads),
        head_dim=read_int(d, "head_dim") if d.get("head_dim") is not None else head_dim_of(hidden, heads, "config.json"),
        rms_norm_eps=read_float(d, "rms_norm_eps", 1e-6, hi=1.0),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=read_int(d, "max_position_embeddings", default=4096),
        tie_word_embeddings=read_bool(d, "tie_word_embeddings"),
        bos_token_id=read_token_id(d, "bos_token_id"),
        eos_token_id=read_eos(d.get("eos_token_id")),
        pad_token_id=read_token_id(d, "pad_token_id"),
    )
