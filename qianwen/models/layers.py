"""The decoder shared by every supported architecture (pre-norm, RMSNorm, rotary, GQA, SwiGLU).

Module and parameter names follow Hugging Face Qwen2/Llama so checkpoints, LoRA targets and exports
interoperate. Each architecture module configures or extends `Transformer`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .cache import Cache, NoCache
from .rope import RotaryEmbedding, apply_rotary

# A float32 matmul gives a row the same bits for any count from 16 to about 40 rows, but another result
# for 1 row (engine/model_runner.py): the float32 head of a bf16/fp16 model pads smaller counts to 16 rows,
# so a sequence's logits do not depend on the batch it decodes in.
HEAD_ROWS = 16


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version  # bumped by in-place changes (e.g. a LoRA merge into the weight)
    except RuntimeError:  # inference tensors keep no version counter
        return None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, c: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.n_heads * self.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, c.hidden_size, bias=c.o_bias)
        if c.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, c.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: Cache,
                q_scale: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if q_scale is not None:  # Transformer.q_scale, [B, 1, T, 1]
            q = q * q_scale.to(q.dtype)
        out = cache.attend(self.layer_idx, q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU, `width` wide (default: the config's intermediate_size; an MoE expert has its own)."""

    def __init__(self, c: ModelConfig, width: int | None = None) -> None:
        super().__init__()
        width = width or c.intermediate_size
        self.gate_proj = nn.Linear(c.hidden_size, width, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, width, bias=c.mlp_bias)
        self.down_proj = nn.Linear(width, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c: ModelConfig, layer_idx: int, mlp: nn.Module) -> None:
        super().__init__()
        self.self_attn = Attention(c, layer_idx)
        self.mlp = mlp
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: Cache,
                q_scale: torch.Tensor | None = None) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, q_scale)
        return h + self.mlp(self.post_attention_layernorm(h))


class Decoder(nn.Module):
    def __init__(self, c: ModelConfig, mlp: Callable[[ModelConfig, int], nn.Module] = lambda c, i: MLP(c)) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c, i, mlp(c, i)) for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(c.head_dim, c.rope_theta, c.rope_scaling, c.max_position_embeddings)


class Transformer(nn.Module):
    """`forward(input_ids[B, T], positions[B, T] | None, cache) -> logits[B, T, vocab]`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Decoder(config, self.mlp)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.fast_decode = None  # the layer stack over token rows on fused kernels, installed by qianwen.fast.optimize
        self._head_f32: tuple | None = None  # (key, float32 copy) of a bf16/fp16 lm_head weight

    # What an architecture may override (the engine and the fast paths use only these, never the type):

    @classmethod
    def mlp(cls, config: ModelConfig, layer_idx: int) -> nn.Module:
        """The feed-forward block of layer `layer_idx`: SwiGLU, unless the architecture says otherwise."""
        return MLP(config)

    def rotary(self, positions: torch.Tensor, cache: Cache, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, 1, T, head_dim] for `positions`; state kept across steps goes in `cache.extra`."""
        return self.model.rotary_emb(positions, dtype)

    def q_scale(self, positions: torch.Tensor) -> torch.Tensor | None:
        """A factor [B, 1, T, 1] on the queries after rotary, or None."""
        return None

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                      cache: Cache | None = None) -> torch.Tensor:
        cache = cache if cache is not None else NoCache()
        if positions is None:
            t = input_ids.shape[1]
            positions = torch.arange(cache.length, cache.length + t, device=input_ids.device).expand(input_ids.shape[0], t)
        fast = self.fast_decode
        if fast is not None and not torch.is_grad_enabled() and fast.accepts(cache):  # decode and prompts alike
            return fast(input_ids, positions, cache)
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, cache, x.dtype)
        q_scale = self.q_scale(positions)
        for layer in self.model.layers:
            x = layer(x, cos, sin, cache, q_scale)
        return self.model.norm(x)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: Cache | None = None) -> torch.Tensor:
        return self.compute_logits(self.hidden_states(input_ids, positions, cache))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The logits [..., vocab] of final hidden states [..., hidden], in float32 whatever the model's
        dtype: the head takes float32 input and gives float32 output (fp32 accumulation, no rounding
        to bf16, which would tie near-equal logits and flip greedy choices). Heads with a float32 kernel
        (`forward_f32`: qianwen.fast's DenseLinear on the CPU, which reads a bf16 weight as it is, and the
        quantized layers) run it; elsewhere (a GPU, fp16) a bf16/fp16 weight runs as a float32 copy of
        itself, made once. With gradients on (training) the head runs as it is, under any autocast."""
        head = self.lm_head
        if torch.is_grad_enabled():
            return head(hidden)
        if hasattr(head, "forward_f32"):  # DenseLinear, Int4Linear, Int8Linear
            return head.forward_f32(hidden.float())
        x = hidden.reshape(-1, hidden.shape[-1]).float()
        if isinstance(head, nn.Linear) and head.weight.dtype != torch.float32:
            w, b = self._float_head(head)
            pad = HEAD_ROWS - x.shape[0]
            y = F.linear(F.pad(x, (0, 0, 0, pad)) if pad > 0 else x, w, b)[: x.shape[0]]
        else:
            y = head(x).float()
        return y.view(*hidden.shape[:-1], y.shape[-1])

    def _float_head(self, head: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The float32 weight and bias of a bf16/fp16 head, kept until the weight changes."""
        w = head.weight
        key = (w.data_ptr(), w.dtype, w.device, tuple(w.shape), _version(w))
        if self._head_f32 is None or self._head_f32[0] != key:
            self._head_f32 = None  # the stale copy goes first
            bias = None if head.bias is None else head.bias.detach().float()
            self._head_f32 = (key, (w.detach().float(), bias))
        return self._head_f32[1]

    @classmethod
    def sanitize(cls, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map checkpoint names to ours and drop what we derive ourselves."""
        return {k: v for k, v in weights.items() if not k.endswith("rotary_emb.inv_freq")}
