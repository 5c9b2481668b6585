"""Shared fixtures: tiny random checkpoints saved by transformers in the real on-disk formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello world! 你好，世界。",
    "def add(a, b):\n    return a + b\n",
    "Qwen is a large language model. 通义千问是一个大语言模型。 1234567890",
] * 20


def make_tokenizer(folder: Path, vocab_size: int = 384, chat_template: str | None = CHATML_TEMPLATE) -> int:
    """A small byte-level BPE with ChatML specials, saved as tokenizer.json + tokenizer_config.json.
    Returns the number of tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    cfg = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
           "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512}
    if chat_template:
        cfg["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return tok.get_vocab_size()


def is_utf8(b: bytes) -> bool:
    """Whether a token's bytes are whole UTF-8 on their own."""
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# each architecture's tiny-config keys beyond the shared ones: adding an architecture adds one line
TINY = {
    "llama": {},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "qwen3_moe": {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "norm_topk_prob": True, "mlp_only_layers": [1]},
}


def tiny_hf_config(model_type: str, vocab_size: int, **overrides):
    import transformers

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=None, eos_token_id=2, pad_token_id=0)
    return transformers.AutoConfig.for_model(model_type, **{**common, **TINY[model_type], **overrides})


def save_tiny(folder: Path, model_type: str = "qwen2", seed: int = 0, dtype=torch.float32, **overrides) -> Path:
    """A tiny random transformers checkpoint (config.json + model.safetensors + tokenizer) in `folder`."""
    import transformers

    n = make_tokenizer(folder)
    cfg = tiny_hf_config(model_type, n, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(dtype)
    with torch.no_grad():  # random init has zero biases and unit norms: make every parameter matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def greedy(prompt, max_tokens: int = 12) -> dict:
    """An engine request: greedy, `max_tokens` tokens whatever the model says, with top-3 logprobs."""
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "logprobs": 3}


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def tiny_qwen2_model(request, tiny_qwen2_dir):
    """The tiny Qwen2 checkpoint loaded in float32 and in bfloat16 (one module-scoped model each)."""
    import qianwen

    return qianwen.load(str(tiny_qwen2_dir), dtype=request.param)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2 chat checkpoint with a ChatML template (for server, engine, eval and train tests)."""
    return save_tiny(tmp_path_factory.mktemp("tiny_qwen2"), "qwen2")


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    from qianwen.artifacts import DEFAULT_GGUF, fetch

    return fetch(DEFAULT_GGUF)


@pytest.fixture(scope="session")
def qwen_tiktoken() -> Path:
    from qianwen.artifacts import QWEN_TIKTOKEN, fetch

    return fetch(QWEN_TIKTOKEN)


def kernel_body(tmp_path_factory, name: str, arch_flags: list[str]):
    """kernels.c built with `arch_flags` (one of a test module's instruction-set bodies) and opened, with the
    flags it was built with as `.flags`."""
    from qianwen import native

    assert native.lib() is not None, native.failure
    flags = [*arch_flags, "-O3", "-fno-math-errno", "-fopenmp"]
    so = native.open_library(native.build(native._compiler(), tmp_path_factory.mktemp("k") / f"{name}.so", (flags,)))
    so.flags = flags
    return so
