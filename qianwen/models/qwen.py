"""The original Qwen-7B (`QWenLMHeadModel`): a Qwen2-style decoder with full multi-head attention,
checkpoint names mapped at load, and two inference-only context extensions (docs/qwen-facts.md):

- dynamic NTK: the rotary base grows with the prompt length, chosen once at prefill;
- LogN: queries past `seq_length` are scaled by log(p + 1) / log(seq_length).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from ..chat.template import QWEN_DEFAULT_SYSTEM
from ..config import ModelConfig, get_key, head_dim_of, read_bool, read_eos, read_float, read_int
from .cache import Cache
from .layers import Transformer
from .registry import Architecture, register
from .rope import base_inv_freq


@dataclass
class Config(ModelConfig):
    """The original config.json, in either its v1.1 or v1.0 key names. Exported as qwen2: the same
    math once the names are mapped (the context extensions are inference-time only)."""

    model_type = "qwen"
    HF_CLASS = "Qwen2ForCausalLM"
    attention_bias: bool = True  # c_attn always has a bias, whatever no_bias says
    seq_length: int | None = None  # the training context: NTK and LogN act beyond it
    use_dynamic_ntk: bool = False
    use_logn_attn: bool = False

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> Config:
        hidden = read_int(d, "hidden_size", "n_embd")
        heads = read_int(d, "num_attention_heads", "n_head")
        seq_length = read_int(d, "seq_length", default=get_key(d, "max_position_embeddings", "n_positions",
                                                                default=2048))
        return cls(
            vocab_size=read_int(d, "vocab_size", "padded_vocab_size"),
            hidden_size=hidden,
            intermediate_size=read_int(d, "intermediate_size", "ffn_hidden_size", lo=2) // 2,  # w1 + w2 together
            num_hidden_layers=read_int(d, "num_hidden_layers", "n_layer"),
            num_attention_heads=heads,
            num_key_value_heads=heads,
            head_dim=read_int(d, "kv_channels") if d.get("kv_channels") is not None
            else head_dim_of(hidden, heads, "config.json"),
            rms_norm_eps=read_float(d, "layer_norm_epsilon", 1e-6, hi=1.0),
            rope_theta=read_float(d, "rotary_emb_base", 10000.0, lo_open=True),
            max_position_embeddings=read_int(d, "max_position_embeddings", "n_positions", default=seq_length),
            tie_word_embeddings=read_bool(d, "tie_word_embeddings"),
            seq_length=seq_length,
            use_dynamic_ntk=read_bool(d, "use_dynamic_ntk"),
            use_logn_attn=read_bool(d, "use_logn_attn"),
            eos_token_id=read_eos(d.get("eos_token_id", 151643)),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        return {**super().to_hf_dict(), "model_type": "qwen2"}


def ntk_alpha(true_seq_len: int, seq_length: int) -> float:
    context_value = math.log(true_seq_len / seq_length, 2) + 1
    return max(2 ** math.ceil(context_value) - 1, 1)


class Model(Transformer):
    config: Config

    def rotary(self, positions: torch.Tensor, cache: Cache, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        if not c.use_dynamic_ntk or self.training:
            return self.model.rotary_emb(positions, dtype)
        alpha = cache.extra.get("ntk_alpha")
        if alpha is None:  # prefill: chosen from the prompt length, reused for every decode step
            alpha = ntk_alpha(int(positions.max()) + 1, c.seq_length or c.max_position_embeddings)
            cache.extra["ntk_alpha"] = alpha
        d = c.head_dim
        inv = base_inv_freq(d, c.rope_theta * alpha ** (d / (d - 2)), positions.device)
        freqs = positions[..., None].float() * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]

    def q_scale(self, positions: torch.Tensor) -> torch.Tensor | None:
        c = self.config
        if not c.use_logn_attn or self.training:
            return None
        seq_length = c.seq_length or c.max_position_embeddings
        p1 = positions.double() + 1
        if bool((p1 <= seq_length).all()):
            return None
        scale = torch.where(p1 > seq_length, torch.log(p1) / math.log(seq_length), torch.ones_like(p1))
        return scale.float()[:, None, :, None]

    @classmethod
    def sanitize(cls, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, w in weights.items():
            if name.endswith(("rotary_emb.inv_freq", "masked_bias")) or name.endswith(".attn.bias"):
                continue
            if m := re.fullmatch(r"transformer\.h\.(\d+)\.attn\.c_attn\.(weight|bias)", name):
                q, k, v = w.chunk(3, dim=0)
                pre = f"model.layers.{m[1]}.self_attn"
                out[f"{pre}.q_proj.{m[2]}"], out[f"{pre}.k_proj.{m[2]}"], out[f"{pre}.v_proj.{m[2]}"] = q, k, v
                continue
            out[_rename(name)] = w
        return out


_RENAMES = [
    (r"transformer\.wte\.", "model.embed_tokens."),
    (r"transformer\.ln_f\.", "model.norm."),
    (r"transformer\.h\.(\d+)\.ln_1\.", r"model.layers.\1.input_layernorm."),
    (r"transformer\.h\.(\d+)\.ln_2\.", r"model.layers.\1.post_attention_layernorm."),
    (r"transformer\.h\.(\d+)\.attn\.c_proj\.", r"model.layers.\1.self_attn.o_proj."),
    (r"transformer\.h\.(\d+)\.mlp\.w2\.", r"model.layers.\1.mlp.gate_proj."),  # w2 is the gate
    (r"transformer\.h\.(\d+)\.mlp\.w1\.", r"model.layers.\1.mlp.up_proj."),
    (r"transformer\.h\.(\d+)\.mlp\.c_proj\.", r"model.layers.\1.mlp.down_proj."),
]


def _rename(name: str) -> str:
    for pat, rep in _RENAMES:
        new, n = re.subn("^" + pat, rep, name)
        if n:
            return new
    return name


ARCH = register(Architecture(Config, Model, default_system=QWEN_DEFAULT_SYSTEM, tool_format="react"))
