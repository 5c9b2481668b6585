"""`qianwen tokenizer train`: a small byte-level BPE vocabulary for small models.

Built like Qwen2's tokenizer.json: NFC normalization, Qwen's pre-tokenizer regex (digits one by
one), byte-level alphabet (every byte string is encodable, nothing is ever unknown), and the ChatML
control tokens. The result is a folder with tokenizer.json + tokenizer_config.json (chat template,
eos/pad) that `HFTokenizer.from_folder` and transformers both read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from ..errors import QianwenError
from .prepare import ReadStats, expand_inputs, iter_documents

QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2's template: ChatML without a default system prompt when none is given.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(inputs: list[str], out: str | os.PathLike, vocab_size: int = 8192, min_frequency: int = 2,
                    text_field: str | None = None, text_unit: str = "paragraph",
                    max_documents: int | None = None, progress: bool = True) -> Path:
    """Train on the documents in `inputs` and write the tokenizer folder `out`; returns `out`."""
    from tokenizers import AddedToken, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(SPECIAL_TOKENS) + 1:
        raise QianwenError(f"--vocab-size must be at least {len(alphabet) + len(SPECIAL_TOKENS) + 1} "
                           "(256 bytes + special tokens + one merge)")
    paths = expand_inputs(inputs)
    stats = ReadStats()

    def docs() -> Iterator[str]:
        for i, d in enumerate(iter_documents(paths, text_field, text_unit, stats)):
            if max_documents is not None and i >= max_documents:
                return
            yield d

    tok = build_tokenizer()
    # Special tokens are added after training so that regular tokens keep ids 0.. like Qwen's.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), min_frequency=min_frequency,
                                  initial_alphabet=alphabet, show_progress=progress, special_tokens=[])
    tok.train_from_iterator(docs(), trainer=trainer)
    if stats.documents == 0:
        raise QianwenError("no documents to train on")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 32768,
        "bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "add_bos_token": False, "clean_up_tokenization_spaces": False, "split_special_tokens": False,
        "errors": "replace", "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                      "single_word": False, "special": True} for t in SPECIAL_TOKENS},
    }
    _write(out / "tokenizer.json", tok.to_str(pretty=True))
    _write(out / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return out


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
