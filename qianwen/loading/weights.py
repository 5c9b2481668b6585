"""Turn a name -> tensor dict into a model, checking every tensor's presence and shape."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..config import ModelConfig
from ..errors import ModelLoadError
from ..models import Transformer, build_model
from ..models.rope import RotaryEmbedding
from ..quant.install import install
from ..quant.linear import Int4Linear, Int8Linear


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


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The parameter names and shapes `config` builds (on the meta device: nothing is allocated)."""
    with torch.device("meta"), no_init():
        net = build_model(config)
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def _compare(expected: dict[str, tuple[int, ...]], shapes: dict[str, tuple[int, ...]]) -> None:
    for name, shape in expected.items():
        if name not in shapes:
            raise ModelLoadError(f"checkpoint is missing tensor '{name}'")
        if tuple(shapes[name]) != shape:
            raise ModelLoadError(f"tensor '{name}' has shape {tuple(shapes[name])}, expected {shape}")


def check_shapes(config: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> None:
    """A checkpoint's tensors (our names -> shapes) against `config`: the layer count first, so a lying
    count never builds a model, then every tensor's presence and shape (so the vocabulary size agrees
    with the embedding rows). `lm_head.weight` of a tied model is ignored."""
    layers = sorted({int(m[1]) for n in shapes if (m := re.match(r"model\.layers\.(\d+)\.", n))})
    if len(layers) != config.num_hidden_layers or layers[-1] != len(layers) - 1:  # unique: so 0..n-1
        found = f"layers {layers[0]} to {layers[-1]}" if layers else "no layers"
        raise ModelLoadError(f"the config gives {config.num_hidden_layers} layers but the checkpoint has "
                             f"{len(layers)} ({found})")
    c = config  # the sizes building allocates by (rotary frequencies: head_dim / 2) first, then the rest
    _compare({"model.embed_tokens.weight": (c.vocab_size, c.hidden_size),
              "model.layers.0.self_attn.q_proj.weight": (c.num_attention_heads * c.head_dim, c.hidden_size)}, shapes)
    expected = expected_shapes(config)
    _compare(expected, shapes)
    unexpected = sorted(set(shapes) - set(expected) - ({"lm_head.weight"} if config.tie_word_embeddings else set()))
    if unexpected:
        raise ModelLoadError(f"checkpoint has unexpected tensor '{unexpected[0]}' ({len(unexpected)} in all) "
                             f"for model_type '{config.model_type}'")


def materialize(config: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device,
                quantized: dict[str, Int4Linear | Int8Linear] | None = None) -> Transformer:
    """`config`'s model from `weights` (our names) and `quantized` (`NAME.weight` -> the quantized layer, quant/,
    that holds that weight): every tensor's presence, shape (a quantized layer's logical one) and dtype checked
    first; then the network built on the meta device, its quantized layers put in, the rest filled."""
    quantized = quantized or {}
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    check_shapes(config, shapes | {k: (lin.out_features, lin.in_features) for k, lin in quantized.items()})
    for name, w in weights.items():
        if not w.is_floating_point():
            raise ModelLoadError(f"tensor '{name}' holds {str(w.dtype).removeprefix('torch.')}, not floating-point "
                                 "weights")
    with torch.device("meta"), no_init():
        net = build_model(config)
    install(net, quantized, config, dtype)
    state = {k: v.to(device=device, dtype=dtype) for k, v in weights.items()}
    net.load_state_dict(state, strict=False, assign=True)
    # buffers we derive (rotary frequencies) were built on the meta device: rebuild them for real
    c = config
    net.model.rotary_emb = RotaryEmbedding(c.head_dim, c.rope_theta, c.rope_scaling, c.max_position_embeddings).to(device)
    if config.tie_word_embeddings and "model.embed_tokens.weight" not in quantized:
        net.lm_head.weight = net.model.embed_tokens.weight
    return net.eval().requires_grad_(False)
