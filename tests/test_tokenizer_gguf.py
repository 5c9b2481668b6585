"""The tokenizer rebuilt from the default GGUF file against transformers' own GGUF tokenizer."""

from __future__ import annotations

import pytest

from qianwen import artifacts
from qianwen.errors import QianwenError
from qianwen.gguf_reader import GGUFFile
from qianwen.tokenizer import HFTokenizer, StreamDecoder, load_tokenizer, tokenizer_from_gguf
from qianwen.tokenizer.gguf_vocab import tokenizer_metadata

from .conftest import is_utf8

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "What's the capital of France? I'd say it's Paris, isn't it?",
    "通义千问是阿里云研发的大语言模型。你好，世界！",
    "日本語のテキスト、한국어 텍스트, Ελληνικά, русский текст, עברית",
    "Emoji: 👨‍👩‍👧‍👦 🇨🇳 👍🏽 🤖🚀✨ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n\nprint([fib(i) for i in range(10)])\n",
    "    leading spaces\n\n\n\ttabs\t\there   \r\n trailing   \n \u3000\u00a0 ",
    "Numbers 1234567890 3.14159 1,000,000 and 0xDEADBEEF",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n<|endoftext|><repo_name>x<file_sep>",
    "",
    " ",
]


@pytest.fixture(scope="module")
def gguf_path():
    return artifacts.fetch(artifacts.DEFAULT_GGUF)


@pytest.fixture(scope="module")
def reader(gguf_path):
    return GGUFFile(gguf_path)


@pytest.fixture(scope="module")
def ours(reader):
    return tokenizer_from_gguf(reader)


@pytest.fixture(scope="module")
def ref(gguf_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


def test_matches_transformers_encoding(ours, ref):
    for t in TEXTS:
        # matching special tokens (what a rendered chat template needs)
        assert ours.encode(t, allow_special=True) == ref(t, add_special_tokens=False)["input_ids"], t
        # plain text: special strings are cut into ordinary tokens
        assert ours.encode(t) == ref(t, add_special_tokens=False, split_special_tokens=True)["input_ids"], t
    assert ours.encode_batch(TEXTS) == [ref(t, add_special_tokens=False, split_special_tokens=True)["input_ids"]
                                        for t in TEXTS]


def test_special_strings_stay_plain(ours):
    assert len(ours.special_tokens) == 17
    for name, i in ours.special_tokens.items():
        plain = ours.encode(f"a {name} b")
        assert not ours.special_ids & set(plain), name
        assert ours.decode(plain) == f"a {name} b"
        assert ours.encode(name, allow_special=True) == [i]


def test_matches_transformers_decoding_and_metadata(ours, ref):
    for t in TEXTS:
        ids = ref(t, add_special_tokens=False)["input_ids"]
        assert ours.decode(ids) == ref.decode(ids) == t
        assert ours.decode(ids, skip_special=True) == ref.decode(ids, skip_special_tokens=True)
    assert ours.vocab_size == len(ref) == 49152
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    assert ours.add_bos is False
    assert ours.chat_template == ref.chat_template and "<|im_start|>" in ours.chat_template
    for i in (0, 1, 2, 100, 1000, 49151):
        assert ours.token_to_id(ref.convert_ids_to_tokens(i)) == i


def test_stream_decode(ours):
    for t in TEXTS:
        ids = ours.encode(t)
        sd = StreamDecoder(ours)
        pieces = [sd.push(i) for i in ids] + [sd.flush()]
        assert "".join(pieces) == t
        assert all("\ufffd" not in p for p in pieces)
    # this English vocabulary splits CJK and emoji into bytes: the case that matters
    assert any(not is_utf8(ours.id_to_token_bytes(i)) for i in ours.encode(TEXTS[2]))


def test_dict_metadata_and_save(ours, reader, ref, tmp_path):
    from transformers import AutoTokenizer

    meta = tokenizer_metadata(reader)
    assert meta["tokenizer.ggml.model"] == "gpt2"
    again = tokenizer_from_gguf(meta)
    assert again.identity == ours.identity
    ours.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, HFTokenizer)
    back = AutoTokenizer.from_pretrained(tmp_path)
    assert back.chat_template == ref.chat_template
    assert (back.bos_token_id, back.eos_token_id, back.pad_token_id) == (1, 2, 2)
    for t in TEXTS:
        assert loaded.encode(t) == ours.encode(t)
        assert back(t, add_special_tokens=False)["input_ids"] == ref(t, add_special_tokens=False)["input_ids"]
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.chat_template) == (1, 2, 2, ours.chat_template)


def test_unsupported_metadata():
    with pytest.raises(QianwenError, match="not supported"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(QianwenError, match="no tokenizer.ggml.tokens"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "gpt2"})

