"""Quantized weight formats that stay quantized in memory and feed torch's CPU weight-only kernels."""

from .linear import Int4Linear, Int8Linear, QuantEmbedding

__all__ = ["Int4Linear", "Int8Linear", "QuantEmbedding"]
