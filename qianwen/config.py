"""One ModelConfig for every supported architecture, read from config.json or GGUF metadata."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import ModelLoadError

SUPPORTED_MODEL_TYPES = ("llama", "qwen", "qwen2", "qwen3")
# checkpoints that are one of ours under another name
MODEL_TYPE_ALIASES = {"mistral": "llama", "smollm": "llama"}


@dataclass
class ModelConfig:
    model_type: str
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
    qk_norm: bool = False  # Qwen3
    # Qwen-7B inference-time context extension
    seq_length: int | None = None
    use_dynamic_ntk: bool = False
    use_logn_attn: bool = False
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        model_type = d.get("model_type")
        if model_type is None:
            raise ModelLoadError("config.json has no 'model_type'")
        model_type = MODEL_TYPE_ALIASES.get(model_type, model_type)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelLoadError(f"unknown model_type '{model_type}'; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        return _qwen_v1(d) if model_type == "qwen" else _hf(d, model_type)

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json in the Hugging Face layout (Qwen-7B is exported as qwen2: same math once mapped)."""
        model_type = "qwen2" if self.model_type == "qwen" else self.model_type
        archs = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
        d: dict[str, Any] = {
            "architectures": [archs[model_type]], "model_type": model_type, "vocab_size": self.vocab_size,
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
        if model_type in ("llama", "qwen3"):
            d["attention_bias"] = self.attention_bias
        if model_type == "llama":
            d["mlp_bias"] = self.mlp_bias
        return d

    def replace(self, **kw: Any) -> ModelConfig:
        return dataclasses.replace(self, **kw)


def _get(d: dict[str, Any], *keys: str, default: Any = ...) -> Any:
    for k in keys:
        if d.get(k) is not None:
            return d[k]
    if default is ...:
        raise ModelLoadError(f"config.json is missing '{keys[0]}'")
    return default


def _eos_list(v: Any) -> list[int]:
    if v is None:
        return []
    return [int(x) for x in v] if isinstance(v, (list, tuple)) else [int(v)]


def _rope(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """Read rope settings from the hub keys (rope_theta, rope_scaling) or transformers 5's rope_parameters."""
    params = d.get("rope_parameters") or {}
    theta = float(params.get("rope_theta") or d.get("rope_theta") or 10000.0)
    scaling = d.get("rope_scaling") or {k: v for k, v in params.items() if k != "rope_theta"} or None
    if scaling:
        scaling = dict(scaling)
        rtype = scaling.pop("type", None) or scaling.get("rope_type") or "default"
        scaling["rope_type"] = rtype
        if rtype == "default":
            scaling = None
        elif rtype not in ("linear", "dynamic", "yarn", "llama3"):
            raise ModelLoadError(f"unsupported rope scaling type '{rtype}' (linear, dynamic, yarn, llama3 are)")
    return theta, scaling


def _hf(d: dict[str, Any], model_type: str) -> ModelConfig:
    hidden = int(_get(d, "hidden_size"))
    heads = int(_get(d, "num_attention_heads"))
    theta, scaling = _rope(d)
    return ModelConfig(
        model_type=model_type,
        vocab_size=int(_get(d, "vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(_get(d, "intermediate_size")),
        num_hidden_layers=int(_get(d, "num_hidden_layers")),
        num_attention_heads=heads,
        num_key_value_heads=int(_get(d, "num_key_value_heads", default=heads)),
        head_dim=int(_get(d, "head_dim", default=hidden // heads)),
        rms_norm_eps=float(_get(d, "rms_norm_eps", default=1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(_get(d, "max_position_embeddings", default=4096)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=True if model_type == "qwen2" else bool(d.get("attention_bias", False)),
        o_bias=bool(d.get("attention_bias", False)) if model_type in ("llama", "qwen3") else False,
        mlp_bias=bool(d.get("mlp_bias", False)) if model_type == "llama" else False,
        qk_norm=model_type == "qwen3",
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=_eos_list(d.get("eos_token_id")),
        pad_token_id=d.get("pad_token_id"),
    )


def _qwen_v1(d: dict[str, Any]) -> ModelConfig:
    """The original Qwen-7B config, in either its v1.1 or v1.0 key names."""
    hidden = int(_get(d, "hidden_size", "n_embd"))
    heads = int(_get(d, "num_attention_heads", "n_head"))
    seq_length = int(_get(d, "seq_length", default=_get(d, "max_position_embeddings", "n_positions", default=2048)))
    return ModelConfig(
        model_type="qwen",
        vocab_size=int(_get(d, "vocab_size", "padded_vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(_get(d, "intermediate_size", "ffn_hidden_size")) // 2,
        num_hidden_layers=int(_get(d, "num_hidden_layers", "n_layer")),
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=int(_get(d, "kv_channels", default=hidden // heads)),
        rms_norm_eps=float(_get(d, "layer_norm_epsilon", default=1e-6)),
        rope_theta=float(_get(d, "rotary_emb_base", default=10000.0)),
        max_position_embeddings=int(_get(d, "max_position_embeddings", "n_positions", default=seq_length)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=True,  # c_attn always has a bias, whatever no_bias says
        seq_length=seq_length,
        use_dynamic_ntk=bool(d.get("use_dynamic_ntk", False)),
        use_logn_attn=bool(d.get("use_logn_attn", False)),
        eos_token_id=_eos_list(d.get("eos_token_id", 151643)),
    )
