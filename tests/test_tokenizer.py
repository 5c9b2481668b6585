"""Tokenizer layer on the real qwen.tiktoken, checked against tiktoken and transformers."""

from __future__ import annotations

import json
import random
import unicodedata

import pytest
import tiktoken
import tiktoken.load
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as RustTokenizer
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from qianwen import artifacts
from qianwen.errors import QianwenError
from qianwen.tokenizer import HFTokenizer, StreamDecoder, TiktokenTokenizer, load_tokenizer

from .conftest import is_utf8

# Written out again here (from docs/qwen-facts.md), so the reference does not share our constant.
QWEN_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")

TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. It's 12:30, isn't it? I'll see y'all.",
    # the rare characters at the end have no token of their own: byte-level pieces split them
    "chinese": "通义千问是阿里云研发的大语言模型。它能够回答问题、创作文字，还能表达观点、撰写代码。龘靐齉爩，鱻羴猋骉。",
    "mixed": "Qwen（通义千问）supports 中英文 mixed text: 第1章 Introduction — naïve café résumé.",
    "emoji": "Family: 👨‍👩‍👧‍👦, flags 🇨🇳🇺🇸, skin 👍🏽, misc 🤖🚀✨ and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𠀀𠀁.",
    "whitespace": "  leading\n\n\n  indented\t\ttabs   \r\n trailing   \n\n \u3000ideographic\u00a0nbsp  ",
    "code": "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n\nif __name__ == '__main__':\n\tf(42)\n",
    "digits": "3.14159265358979 1,000,000 0x7fff 2024-01-01",
    "specials_as_text": 'print("<|endoftext|>") <|im_start|>user\nhi<|im_end|> <|extra_204|> <|extra_205|>',
}


def _random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = list("abcXYZ019 '\n\t\r.,!?-_<|>") + list("中文字符的一是。，") + ["é", "ß", "🤖", "👍🏽", "\u200d", "  "]
    return [unicodedata.normalize("NFC", "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80))))
            for _ in range(n)]


@pytest.fixture(scope="module")
def vocab_path():
    return artifacts.fetch(artifacts.QWEN_TIKTOKEN)


@pytest.fixture(scope="module")
def qwen(vocab_path):
    return TiktokenTokenizer(vocab_path)


@pytest.fixture(scope="module")
def reference(vocab_path):
    """tiktoken's own Encoding, built from the file and the published regex and special ids."""
    ranks = tiktoken.load.load_tiktoken_bpe(str(vocab_path))
    names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]
    specials = {name: 151643 + i for i, name in enumerate(names)}
    return tiktoken.Encoding("qwen-ref", pat_str=QWEN_REGEX, mergeable_ranks=ranks, special_tokens=specials)


@pytest.fixture(scope="module")
def qwen_hf(qwen):
    return qwen.to_hf()


# -- the tiktoken backend ---------------------------------------------------------------------

def test_known_ids(qwen):
    assert qwen.encode('print("<|endoftext|>")') == [1350, 9639, 91, 8691, 723, 427, 91, 82598]
    assert qwen.encode('print("<|endoftext|>")', allow_special=True) == [1350, 445, 151643, 899]
    assert qwen.encode("Observation:") == [37763, 367, 25]
    assert qwen.vocab_size == 151851
    assert (qwen.eos_id, qwen.pad_id, qwen.bos_id) == (151643, 151643, None)
    assert qwen.token_to_id("<|im_start|>") == 151644
    assert qwen.token_to_id("<|im_end|>") == 151645
    assert qwen.token_to_id("<|extra_0|>") == 151646
    assert qwen.token_to_id("<|extra_204|>") == 151850
    assert len(qwen.special_tokens) == 208
    assert qwen.id_to_token_bytes(151645) == b"<|im_end|>"
    assert qwen.id_to_token_bytes(151851) == b""


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_round_trip_is_byte_exact(qwen, name):
    text = TEXTS[name]
    ids = qwen.encode(text)
    assert qwen.decode(ids) == text
    assert b"".join(qwen.id_to_token_bytes(i) for i in ids) == text.encode("utf-8")


def test_matches_tiktoken_reference(qwen, reference):
    texts = list(TEXTS.values()) + _random_texts(300)
    for t in texts:
        assert qwen.encode(t) == reference.encode_ordinary(t), t
        assert qwen.encode(t, allow_special=True) == reference.encode(t, allowed_special="all"), t
    assert qwen.encode_batch(texts) == [reference.encode_ordinary(t) for t in texts]


def test_nfc_normalisation(qwen):
    decomposed = "cafe\u0301 n\u0303"
    assert qwen.encode(decomposed) == qwen.encode(unicodedata.normalize("NFC", decomposed))
    assert qwen.decode(qwen.encode(decomposed)) == "café ñ"


def test_special_strings_are_plain_text(qwen):
    special_ids = set(qwen.special_tokens.values())
    for name, i in qwen.special_tokens.items():
        plain = qwen.encode(f"hi {name} there")
        assert not special_ids & set(plain), name
        assert qwen.decode(plain) == f"hi {name} there"
        assert qwen.encode(name, allow_special=True) == [i]
    ids = qwen.encode("<|im_start|>x<|im_end|>", allow_special=True)
    assert ids[0] == 151644 and ids[-1] == 151645
    assert qwen.decode(ids, skip_special=True) == "x"
    assert qwen.decode(ids) == "<|im_start|>x<|im_end|>"


def test_identity(qwen, vocab_path, tmp_path):
    assert len(qwen.identity) == 16 and int(qwen.identity, 16) >= 0
    other = tmp_path / "other.tiktoken"
    lines = vocab_path.read_bytes().splitlines()
    lines[100], lines[101] = lines[101].split()[0] + b" 100", lines[100].split()[0] + b" 101"
    other.write_bytes(b"\n".join(lines) + b"\n")
    assert TiktokenTokenizer(other).identity != qwen.identity


def test_bad_vocab_file(tmp_path):
    bad = tmp_path / "qwen.tiktoken"
    bad.write_text("not base64 at all\n")
    with pytest.raises(QianwenError, match="tiktoken"):
        load_tokenizer(tmp_path)
    with pytest.raises(QianwenError, match="no tokenizer"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(QianwenError, match="no tokenizer"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\xff" * 60)
    with pytest.raises(QianwenError, match="GGUF"):
        load_tokenizer(tmp_path / "junk.gguf")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(QianwenError, match="cannot read"):
        load_tokenizer(tmp_path)


# -- streaming --------------------------------------------------------------------------------

def _stream(tok, ids, **kw) -> list[str]:
    sd = StreamDecoder(tok, **kw)
    return [sd.push(i) for i in ids] + [sd.flush()]


@pytest.mark.parametrize("name", ["chinese", "emoji"])
def test_stream_decode_never_breaks_characters(qwen, name):
    text = TEXTS[name]
    ids = qwen.encode(text)
    # the test means something only if some tokens carry part of a character
    partial = [i for i in ids if not is_utf8(qwen.id_to_token_bytes(i))]
    assert partial, "no token splits a character"
    pieces = _stream(qwen, ids)
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_stream_skip_special_and_invalid_bytes(qwen):
    ids = qwen.encode("<|im_start|>你好<|im_end|>", allow_special=True)
    assert "".join(_stream(qwen, ids, skip_special=True)) == "你好"
    assert "".join(_stream(qwen, ids)) == "<|im_start|>你好<|im_end|>"
    # bytes that can never complete are replaced exactly as decode() does
    lone = [i for i in range(256) if qwen.id_to_token_bytes(i) == b"\xff"]
    rare = qwen.encode("龘")
    assert len(rare) > 1 and len(lone) == 1
    ids = rare[:1] + lone + rare + qwen.encode("ok")  # a character cut short, a stray byte, a whole one
    assert "".join(_stream(qwen, ids)) == qwen.decode(ids)
    assert qwen.decode(ids).count("\ufffd") >= 2 and qwen.decode(ids).endswith("龘ok")
    sd = StreamDecoder(qwen)
    partial = rare[0]
    assert sd.push(partial) == "" and sd.pending
    assert sd.flush() == "" and not sd.pending  # a character cut short at the end is dropped



# -- the same vocabulary as a Hugging Face tokenizer ------------------------------------------

def test_hf_from_ranks_matches_tiktoken(qwen, qwen_hf):
    assert len(qwen.merges) == 151387  # the merges.txt Qwen2 ships has as many
    texts = list(TEXTS.values()) + _random_texts(300, seed=1)
    for t in texts:
        assert qwen_hf.encode(t) == qwen.encode(t), t
        assert qwen_hf.encode(t, allow_special=True) == qwen.encode(t, allow_special=True), t
    assert qwen_hf.encode_batch(texts) == qwen.encode_batch(texts)
    assert qwen_hf.vocab_size == qwen.vocab_size
    assert qwen_hf.special_tokens == qwen.special_tokens
    assert (qwen_hf.eos_id, qwen_hf.pad_id, qwen_hf.bos_id) == (qwen.eos_id, qwen.pad_id, qwen.bos_id)
    assert qwen_hf.identity == qwen.identity
    ids = qwen.encode(TEXTS["emoji"] + "<|im_end|>", allow_special=True)
    assert qwen_hf.decode(ids) == qwen.decode(ids)
    assert qwen_hf.decode(ids, skip_special=True) == qwen.decode(ids, skip_special=True)
    assert "".join(_stream(qwen_hf, qwen.encode(TEXTS["chinese"]))) == TEXTS["chinese"]
    assert qwen_hf.token_to_id(" hello") == qwen.token_to_id(" hello") == 23811
    assert qwen_hf.token_to_id("Ġhello") == 23811  # the vocabulary's own spelling works too


def test_save_and_reload(qwen, qwen_hf, tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    qwen.save(tmp_path)
    assert (tmp_path / "qwen.tiktoken").read_bytes() == qwen.path.read_bytes()
    again = load_tokenizer(tmp_path)
    assert isinstance(again, HFTokenizer)
    assert isinstance(load_tokenizer(tmp_path / "qwen.tiktoken"), TiktokenTokenizer)
    ref = AutoTokenizer.from_pretrained(tmp_path)
    assert ref.eos_token_id == 151643
    for t in TEXTS.values():
        assert again.encode(t) == qwen.encode(t)
        assert ref(t, add_special_tokens=False)["input_ids"] == qwen.encode(t, allow_special=True)
        assert ref(t, add_special_tokens=False, split_special_tokens=True)["input_ids"] == qwen.encode(t)


# -- a small tokenizer.json with a config, a template and added tokens ------------------------

@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    tok = RustTokenizer(BPE(unk_token=None))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    corpus = [TEXTS[k] for k in ("english", "chinese", "code", "mixed")] * 20
    tok.train_from_iterator(corpus, BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                               special_tokens=["<s>", "</s>", "<pad>"], show_progress=False))
    tok.add_tokens([AddedToken("<think>", special=False, normalized=False)])
    d = tmp_path_factory.mktemp("small")
    tok.save(str(d / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": {"content": "</s>", "special": True}, "pad_token": "<pad>",
              "add_bos_token": True, "chat_template": [{"name": "default", "template": "{{ messages }}"}]}
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


def test_small_hf_folder(small_folder, tmp_path):
    tok = load_tokenizer(small_folder)
    assert isinstance(tok, HFTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.add_bos and tok.chat_template == "{{ messages }}"
    assert tok.special_tokens == {"<s>": 0, "</s>": 1, "<pad>": 2}
    text = "hello </s> world <s> 你好 <think> 🤖"
    plain = tok.encode(text)
    assert not {0, 1, 2} & set(plain)
    assert tok.decode(plain) == text
    assert tok.token_to_id("<think>") in plain  # a non-special added token is ordinary vocabulary
    allowed = tok.encode(text, allow_special=True)
    assert 1 in allowed and 0 in allowed
    assert tok.decode(allowed, skip_special=True) == tok.decode([i for i in allowed if i > 2])
    pieces = _stream(tok, plain)
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)
    assert tok.encode("") == []

    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.encode(text) == plain and again.encode(text, allow_special=True) == allowed
    assert (again.bos_id, again.eos_id, again.pad_id, again.add_bos) == (0, 1, 2, True)
    assert again.chat_template == "{{ messages }}" and again.identity == tok.identity


def test_sentencepiece_style_stream(tmp_path):
    """Metaspace + byte fallback (Llama 2 style): token bytes and the stripped leading space."""
    pieces = ["<unk>"] + [f"<0x{b:02X}>" for b in range(256)] + ["\u2581", "h", "e", "l", "o", "\u2581h", "\u2581he",
                                                                 "\u2581hel", "\u2581hell", "\u2581hello"]
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = [("\u2581", "h"), ("\u2581h", "e"), ("\u2581he", "l"), ("\u2581hel", "l"), ("\u2581hell", "o")]
    tok = RustTokenizer(BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken("<unk>", special=True)])
    tok.save(str(tmp_path / "tokenizer.json"))
    hf = load_tokenizer(tmp_path)
    assert hf.strip_leading_space
    text = "hello héllo 你好 🤖"
    ids = hf.encode(text)
    assert hf.decode(ids) == text
    out = _stream(hf, ids)
    assert "".join(out) == text and all("\ufffd" not in p for p in out)
