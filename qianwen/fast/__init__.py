"""Low-overhead inference: projections fused at load time, leaner per-layer ops, a static KV cache,
thread settings. Inference-time transforms only: the stored checkpoint keeps its Hugging Face names."""

from ..native import set_threads
from .cache import StaticKVCache
from .optimize import optimize

__all__ = ["StaticKVCache", "optimize", "set_threads"]
