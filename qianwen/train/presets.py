"""Named `qwen2`-layout model shapes, from a test-sized toy to the Qwen-7B shape.

`vocab_size` comes from the tokenizer (padded up to a multiple of 128, as Qwen pads 151,851 to
151,936); everything else is fixed per preset. Qwen-7B is multi-head (no GQA), has a bias on q, k, v
only and untied embeddings: `7b` is that shape in the Qwen2 layout.
"""

from __future__ import annotations

from typing import Any

from ..errors import QianwenError

PRESETS: dict[str, dict[str, Any]] = {
    # name: hidden, layers, heads, kv heads, MLP width, tie embeddings, context
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, tie_word_embeddings=True, max_position_embeddings=1024),
    "mini": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=768, tie_word_embeddings=True, max_position_embeddings=2048),
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                  intermediate_size=1536, tie_word_embeddings=True, max_position_embeddings=4096),
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, tie_word_embeddings=True, max_position_embeddings=32768,
                 rope_theta=1000000.0),
    "1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, tie_word_embeddings=True, max_position_embeddings=32768,
                 rope_theta=1000000.0),
    "7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
               intermediate_size=11008, tie_word_embeddings=False, max_position_embeddings=8192,
               rope_theta=10000.0),
}


def pad_vocab(n: int, multiple: int = 128) -> int:
    return (n + multiple - 1) // multiple * multiple


def preset_config(name: str, vocab_size: int, eos_token_id: int | list[int] | None = None,
                  **overrides: Any) -> dict[str, Any]:
    """config.json (Hugging Face Qwen2 layout) for preset `name` with a vocabulary of `vocab_size`."""
    if name not in PRESETS:
        raise QianwenError(f"unknown preset '{name}'; choose from {', '.join(PRESETS)}")
    shape = dict(PRESETS[name])
    shape.setdefault("rope_theta", 10000.0)
    shape.update({k: v for k, v in overrides.items() if v is not None})
    if shape["hidden_size"] % shape["num_attention_heads"]:
        raise QianwenError("hidden size must be a multiple of the number of heads")
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": pad_vocab(vocab_size),
        "hidden_act": "silu", "rms_norm_eps": 1e-6, "initializer_range": 0.02, "attention_dropout": 0.0,
        "use_sliding_window": False, "torch_dtype": "float32", "bos_token_id": None,
        "eos_token_id": eos_token_id, "use_cache": True, **shape,
    }


def count_parameters(config: dict[str, Any]) -> int:
    h, n, i, v = (config[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size"))
    hd = h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * hd
    attn = h * h + 2 * h * kv + h * h + h + 2 * kv  # q, k, v (with bias), o
    per_layer = attn + 3 * h * i + 2 * h
    emb = v * h * (1 if config.get("tie_word_embeddings") else 2)
    return n * per_layer + emb + h
