"""Load a GGUF file (read by `gguf_reader.GGUFFile`): hyperparameters, tokenizer and chat template from
its metadata, tensors dequantized into the model (F32, F16, BF16, Q4_0, Q4_1, Q8_0 and what else `gguf` can
dequantize) or, for the block formats quant/gguf.py repacks, kept quantized."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..config import ROPE_TYPES, ModelConfig, as_float, as_int, head_dim_of
from ..errors import ModelLoadError
from ..gguf_reader import GGUFFile
from ..models import Architecture, Transformer, architecture, gguf_architecture
from ..quant.gguf import quantized_linear_from_gguf, supports
from ..quant.linear import Int4Linear, Int8Linear
from .weights import check_shapes, materialize


def hf_name(gguf_name: str, arch: Architecture) -> str | None:
    """Our name for a GGUF tensor of `arch` (its `gguf_names`), or None."""
    for pat, rep in arch.gguf_names:
        if re.fullmatch(pat, gguf_name):
            return re.sub(pat, rep, gguf_name)
    return None


def open_reader(path: Path) -> GGUFFile:
    """The file's metadata (a mapping, which `tokenizer_from_gguf` also takes) and memory-mapped tensors."""
    return GGUFFile(path)


_BIG_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")


def metadata(reader: Mapping[str, Any]) -> dict[str, Any]:
    """Config-level metadata of a `GGUFFile`, without the vocabulary arrays."""
    out = {k: v for k, v in reader.items() if k not in _BIG_ARRAYS}
    if (tokens := reader.get("tokenizer.ggml.tokens")) is not None:
        out["_n_tokens"] = len(tokens)
    return out


def config_from_metadata(meta: dict[str, Any], tensor_names: set[str]) -> ModelConfig:
    """The hyperparameters in a GGUF file's metadata, each checked for its type and range (then `ModelConfig.check`)."""
    spec = gguf_architecture(meta.get("general.architecture"))
    arch = spec.gguf_arch

    def get(key: str, default: Any = ...) -> Any:
        v = meta.get(f"{arch}.{key}")
        if v is None:
            if default is ...:
                raise ModelLoadError(f"GGUF metadata is missing '{arch}.{key}'")
            return default
        return v

    def num(key: str, default: Any = ..., lo: int = 1) -> int:
        return as_int(get(key, default), f"GGUF '{arch}.{key}'", lo)

    def real(key: str, default: float, **limits: Any) -> float:
        return as_float(get(key, default), f"GGUF '{arch}.{key}'", **limits)

    heads = num("attention.head_count")
    hidden = num("embedding_length")
    head_dim = num("attention.key_length") if get("attention.key_length", None) is not None \
        else head_dim_of(hidden, heads, "GGUF")
    if get("rope.dimension_count", None) is not None and num("rope.dimension_count") != head_dim:
        raise ModelLoadError(f"GGUF '{arch}.rope.dimension_count' is {get('rope.dimension_count')}, not the head "
                             f"dimension {head_dim}: partial rotary embeddings are not supported")
    vocab = num("vocab_size") if get("vocab_size", None) is not None else meta.get("_n_tokens", 0)
    if not vocab:
        raise ModelLoadError("GGUF metadata has neither a vocab_size nor a token list")
    scaling = None
    stype = get("rope.scaling.type", None)
    if stype is not None and not isinstance(stype, str):
        raise ModelLoadError(f"GGUF '{arch}.rope.scaling.type' is {stype!r:.40}; expected a string")
    if stype and stype != "none":
        if stype not in ROPE_TYPES:
            raise ModelLoadError(f"unsupported GGUF rope scaling type '{stype:.40}' ({', '.join(ROPE_TYPES)} are)")
        scaling = {"rope_type": stype, "factor": get("rope.scaling.factor", 1.0)}  # llama.cpp's default
        if (orig := get("rope.scaling.original_context_length", None)) is not None:
            scaling["original_max_position_embeddings"] = orig

    def token_id(key: str) -> int | None:
        v = meta.get(f"tokenizer.ggml.{key}")
        return None if v is None else as_int(v, f"GGUF 'tokenizer.ggml.{key}'", 0)

    eos = token_id("eos_token_id")
    return spec.config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=num("feed_forward_length"),
        num_hidden_layers=num("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=num("attention.head_count_kv", heads),
        head_dim=head_dim,
        rms_norm_eps=real("attention.layer_norm_rms_epsilon", 1e-6, hi=1.0),
        rope_theta=real("rope.freq_base", 10000.0, lo_open=True),
        rope_scaling=scaling,
        max_position_embeddings=num("context_length", 4096),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        bos_token_id=token_id("bos_token_id"),
        eos_token_id=[eos] if eos is not None else [],
        pad_token_id=token_id("padding_token_id"),
    ).check("GGUF")


_INT_TYPES = ("I8", "I16", "I32", "I64")


def check_tensors(reader, config: ModelConfig) -> None:
    """The file's tensors against `config` from their infos alone, before any is read: names, float or
    quantized types, the layer count and every shape (`weights.check_shapes`)."""
    shapes = {}
    for t, name in named_tensors(reader, config, progress=False):
        if t.tensor_type.name in _INT_TYPES:
            raise ModelLoadError(f"GGUF tensor '{t.name}' holds integers ({t.tensor_type.name}), not weights")
        shapes[name] = tuple(int(d) for d in reversed(t.shape))
    check_shapes(config, shapes)


def permuted(config: ModelConfig, name: str) -> bool:
    """Whether our tensor `name` of a GGUF `config` model holds q/k rows llama.cpp permuted."""
    return architecture(config.model_type).gguf_permute_qk and name.endswith(("q_proj.weight", "k_proj.weight"))


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary permutation of q/k rows (`Architecture.gguf_permute_qk`: its Llama
    converter interleaves the halves)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def dequantize(t) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gg_dequantize

    if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        return np.asarray(t.data)
    return gg_dequantize(t.data, t.tensor_type)


def named_tensors(reader, config: ModelConfig, progress: bool = True) -> Iterator[tuple[Any, str]]:
    """Each GGUF tensor with our parameter name, under a progress bar; a tensor with no place is an error."""
    arch = architecture(config.model_type)
    for t in tqdm(reader.tensors, desc="Loading GGUF", unit="tensor", disable=None if progress else True, leave=False):
        name = hf_name(t.name, arch)
        if name is None:
            if t.name.startswith("rope_freqs"):  # llama3 frequency factors: derived from the config
                continue
            raise ModelLoadError(f"GGUF tensor '{t.name}' has no place in a {config.model_type} model")
        yield t, name


def _is_linear_weight(name: str) -> bool:
    return name.endswith("_proj.weight") or name in ("lm_head.weight", "model.embed_tokens.weight")


def load_gguf_weights(reader, config: ModelConfig, dtype: torch.dtype, device: torch.device,
                      quantized: bool = False) -> Transformer:
    """The model of a GGUF file, its tensors dequantized to `dtype`. `quantized`: projections, lm_head and the
    embedding in a block format quant/gguf.py repacks stay quantized (`Int4Linear`/`Int8Linear`, the embedding
    a `QuantEmbedding`), run by the CPU kernels."""
    if quantized and device.type != "cpu":
        raise ModelLoadError("quantized GGUF weights run on the CPU kernels only; load with quantized=False")
    weights: dict[str, torch.Tensor] = {}
    kept: dict[str, Int4Linear | Int8Linear] = {}
    release = getattr(reader, "release", lambda t: None)  # a GGUFFile drops copied pages
    for t, name in named_tensors(reader, config):
        shape = [int(d) for d in reversed(t.shape)]
        permute = permuted(config, name)
        heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
        if quantized and _is_linear_weight(name) and supports(t):
            kept[name] = quantized_linear_from_gguf(t, unpermute(np.arange(shape[0]), heads) if permute else None)
            release(t)
            continue
        try:
            w = dequantize(t)
        except Exception as e:
            raise ModelLoadError(f"cannot read GGUF tensor '{t.name}' ({t.tensor_type.name}): {e}") from None
        w = w.reshape(shape) if w.ndim != len(shape) else w
        if permute:
            w = unpermute(w, heads)
        w = np.ascontiguousarray(w, dtype=np.float32)
        weights[name] = torch.from_numpy(w if w.flags.writeable else w.copy()).to(dtype)
        release(t)
    return materialize(config, weights, dtype, device, kept)
