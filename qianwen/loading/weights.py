"""Turn a name -> tensor dict into a model, checking every tensor's presence and shape."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..config import ModelConfig
from ..errors import ModelLoadError
from ..models import Transformer, build_model
from ..models.rope import RotaryEmbedding


@contextmanager
def no_init() -> Iterator[None]:
    """Skip random initialisation while building a model whose weights are loaded next: on the meta
    device, init ops go through torch._refs, which imports torch._dynamo (~70 MB of resident memory)."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "zeros_", "ones_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    for n in names:
        setattr(torch.nn.init, n, lambda tensor, *a, **k: tensor)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


def materialize(config: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype,
                device: torch.device) -> Transformer:
    with torch.device("meta"), no_init():
        net = build_model(config)
    expected = {k: v.shape for k, v in net.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        weights.pop("lm_head.weight", None)
    for name, shape in expected.items():
        if name not in weights:
            raise ModelLoadError(f"checkpoint is missing tensor '{name}'")
        if tuple(weights[name].shape) != tuple(shape):
            raise ModelLoadError(f"tensor '{name}' has shape {tuple(weights[name].shape)}, expected {tuple(shape)}")
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        raise ModelLoadError(f"checkpoint has unexpected tensor '{unexpected[0]}' ({len(unexpected)} in all) "
                             f"for model_type '{config.model_type}'")
    state = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in weights.items()}
    net.load_state_dict(state, strict=False, assign=True)
    # buffers we derive (rotary frequencies) were built on the meta device: rebuild them for real
    c = config
    net.model.rotary_emb = RotaryEmbedding(c.head_dim, c.rope_theta, c.rope_scaling, c.max_position_embeddings).to(device)
    if config.tie_word_embeddings:
        net.lm_head.weight = net.model.embed_tokens.weight
    return net.eval().requires_grad_(False)
