"""Rotary embeddings with the scaling types transformers supports for these models."""

from __future__ import annotations

import math
from typing import Any

import torch


def base_inv_freq(dim: int, base: float, device: torch.device | str | None = None) -> torch.Tensor:
    # computed on the CPU unless asked: a model built on the meta device still gets real frequencies
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device or "cpu").float() / dim))


def _yarn(dim: int, base: float, s: dict[str, Any], max_pos: int) -> tuple[torch.Tensor, float]:
    factor = float(s["factor"])
    orig = int(s.get("original_max_position_embeddings") or max_pos)
    attn = s.get("attention_factor")
    mscale, mscale_all = s.get("mscale"), s.get("mscale_all_dim")

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attn is None:
        attn = get_mscale(factor, mscale) / get_mscale(factor, mscale_all) if mscale and mscale_all else get_mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def corr_dim(rot: float) -> float:
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, device="cpu").float() / dim)
    extrap = 1 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrap) + (1.0 / pos_freqs) * extrap
    return inv, float(attn)


def _llama3(dim: int, base: float, s: dict[str, Any]) -> torch.Tensor:
    inv = base_inv_freq(dim, base)
    factor, lo, hi = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    out = torch.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
    return torch.where(medium, smoothed, out)


class RotaryEmbedding(torch.nn.Module):
    """cos/sin for given positions; `dynamic` scaling recomputes the base from the sequence length."""

    def __init__(self, dim: int, base: float, scaling: dict[str, Any] | None, max_pos: int) -> None:
        super().__init__()
        self.dim, self.base, self.scaling, self.max_pos = dim, base, scaling or {}, max_pos
        self.rope_type = self.scaling.get("rope_type", "default")
        self.attention_factor = 1.0
        if self.rope_type == "linear":
            inv = base_inv_freq(dim, base) / float(self.scaling["factor"])
        elif self.rope_type == "yarn":
            inv, self.attention_factor = _yarn(dim, base, self.scaling, max_pos)
        elif self.rope_type == "llama3":
            inv = _llama3(dim, base, self.scaling)
        else:
            inv = base_inv_freq(dim, base)
        self.register_buffer("inv_freq", inv, persistent=False)

    def inv_freq_for(self, positions: torch.Tensor) -> torch.Tensor:
        if self.rope_type == "dynamic":
            seq_len = int(positions.max()) + 1
            if seq_len > self.max_pos:
                factor = float(self.scaling["factor"])
                base = self.base * ((factor * seq_len / self.max_pos) - (factor - 1)) ** (self.dim / (self.dim - 2))
                return base_inv_freq(self.dim, base, positions.device)
        return self.inv_freq

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, sin [B, 1, T, dim]."""
        inv = self.inv_freq_for(positions).to(positions.device)
        freqs = positions[..., None].float() * (inv if inv.dim() == 1 else inv[:, None, :])
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.attention_factor, emb.sin() * self.attention_factor
        return cos.to(dtype)[:, None], sin.to(dtype)[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin
