"""`Tokenizer.encode_prompt` (tokenizer/base.py `PromptIds`): a rendered prompt that starts as a recent one did
gets the ids a whole `encode(text, allow_special=True)` gives, while encoding only what follows the last split
token the two share; on the real Qwen vocabulary (tiktoken and its tokenizers.json twin), the default model's
GGUF vocabulary and a SentencePiece-style one, over growing and branching chats."""

from __future__ import annotations

import random

import pytest
from tokenizers import AddedToken, normalizers
from tokenizers import Tokenizer as RustTokenizer
from tokenizers.models import BPE

from qianwen import artifacts
from qianwen.gguf_reader import GGUFFile
from qianwen.tokenizer import TiktokenTokenizer, load_tokenizer
from qianwen.tokenizer.gguf_vocab import tokenizer_from_gguf

from .test_tokenizer import TEXTS, _random_texts


def sentencepiece_like(folder):
    """Llama-2 style: the normalizer prepends "▁" to every piece between added tokens, byte fallback."""
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + [
        "\u2581", "h", "e", "l", "o", "\u2581h", "\u2581he", "\u2581hel", "\u2581hell", "\u2581hello"]
    merges = [("\u2581", "h"), ("\u2581h", "e"), ("\u2581he", "l"), ("\u2581hel", "l"), ("\u2581hell", "o")]
    tok = RustTokenizer(BPE({p: i for i, p in enumerate(pieces)}, merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>", "<|im_start|>",
                                                                   "<|im_end|>")])
    tok.save(str(folder / "tokenizer.json"))
    return load_tokenizer(folder)


@pytest.fixture(scope="module", params=["qwen-tiktoken", "qwen-tokenizers", "gguf", "sentencepiece"])
def tok(request, tmp_path_factory):
    if request.param.startswith("qwen"):
        t = TiktokenTokenizer(artifacts.fetch(artifacts.QWEN_TIKTOKEN))
        return t if request.param == "qwen-tiktoken" else t.to_hf()
    if request.param == "gguf":
        return tokenizer_from_gguf(GGUFFile(artifacts.fetch(artifacts.DEFAULT_GGUF)))
    return sentencepiece_like(tmp_path_factory.mktemp("sp"))


def chatml(messages: list[tuple[str, str]]) -> str:
    return "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in messages) + \
        "<|im_start|>assistant\n"


def contents(seed: int) -> list[str]:
    """Message texts with awkward edges: spaces and newlines at either end, '<' and '|' next to where a
    special token follows, words a token could continue."""
    return list(TEXTS.values()) + _random_texts(30, seed) + ["Hello", "Hellooo", "  ", "<|im", "a\n\n", "x<"]


def encoded_lengths(tok, monkeypatch) -> list[int]:
    """The length of every text `tok.encode` is given from now on."""
    lengths: list[int] = []
    encode = type(tok).encode

    def spy(self, text, allow_special=False):
        lengths.append(len(text))
        return encode(self, text, allow_special)

    monkeypatch.setattr(type(tok), "encode", spy)
    return lengths


def test_growing_and_branching_chats_give_the_whole_texts_ids(tok, monkeypatch):
    assert tok.split_tokens, "every vocabulary here splits at its added tokens"
    rng = random.Random(1)
    texts = contents(1)
    chats = [[("system", "You are a helpful assistant.")] for _ in range(3)]
    lengths = encoded_lengths(tok, monkeypatch)
    for _turn in range(12):
        for chat in chats:
            chat.append(("user", rng.choice(texts)))
            text = chatml(chat)
            lengths.clear()
            got = tok.encode_prompt(text)
            assert lengths and lengths[0] <= len(text)
            monkeypatch.undo()
            assert got == tok.encode(text, allow_special=True), text
            lengths = encoded_lengths(tok, monkeypatch)
            # the answer, then a branch: the same history with another question
            chat.append(("assistant", rng.choice(texts) + rng.choice(["", " ", "\n", "Hello"])))
        chats.append([*chats[0][:-rng.randint(1, 4)]])
    monkeypatch.undo()


def test_a_next_turn_encodes_only_its_new_part(tok, monkeypatch):
    history = [("system", "You are a helpful assistant."), ("user", TEXTS["chinese"]),
               ("assistant", TEXTS["english"])]
    tok.encode_prompt(chatml(history))
    lengths = encoded_lengths(tok, monkeypatch)
    text = chatml([*history, ("assistant", TEXTS["mixed"]), ("user", "Hellooo")])
    got = tok.encode_prompt(text)
    assert max(lengths) == len(text) - len(chatml(history)) + len("<|im_start|>assistant\n")
    monkeypatch.undo()
    assert got == tok.encode(text, allow_special=True)


def test_a_word_continued_after_the_shared_text_is_encoded_whole(tok, monkeypatch):
    """'Hello' then 'Hellooo': the texts part inside a word, before the old prompt's split token; the cut
    goes back to the last split token both texts have at the same place."""
    tok.encode_prompt("<|im_start|>user\nHello<|im_end|>\n")
    text = "<|im_start|>user\nHellooo there<|im_end|>\n"
    lengths = encoded_lengths(tok, monkeypatch)
    got = tok.encode_prompt(text)
    monkeypatch.undo()
    assert lengths == [len(text) - len("<|im_start|>user\n")] or lengths == [len(text)]
    assert got == tok.encode(text, allow_special=True)


def test_tokens_that_eat_whitespace_turn_reuse_off(tmp_path):
    """An added token with lstrip/rstrip changes the text beside it: no split-token promise, every prompt
    is encoded whole."""
    rust = RustTokenizer(BPE({"<unk>": 0, "a": 1, " ": 2}, [], unk_token="<unk>"))
    rust.add_special_tokens([AddedToken("<|im_end|>", special=True, rstrip=True)])
    rust.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    assert tok.split_tokens is None
    assert tok.encode_prompt("a<|im_end|>  a") == tok.encode("a<|im_end|>  a", allow_special=True)


def test_common_start_of_texts_and_token_lists():
    import os

    from qianwen.tokenizer.base import common_start

    rng = random.Random(0)
    for _ in range(2000):
        a = "".join(rng.choice("ab") for _ in range(rng.randint(0, 40)))
        b = a[:rng.randint(0, len(a))] + "".join(rng.choice("ab") for _ in range(rng.randint(0, 40)))
        for x, y in ((a, b), (b, a)):
            want = len(os.path.commonprefix([x, y]))
            for step in (1, 3, 4096):
                assert common_start(x, y, step=step) == want  # texts
                assert common_start(list(x), list(y), step=step) == want  # token lists
                assert common_start(x, y, 5, step) == min(want, 5)


def test_messages_with_special_token_text_are_encoded_once_per_chat(tok, monkeypatch):
    """A message that holds a special token's text (a user pasting `<|im_end|>`, an answer that ran past its
    end token) sends the prompt down the piece by piece path (chat/template.py `encode_rendered`), where
    each message is plain text. Its next turn encodes only the pieces it has not seen: the same ids as
    encoding every piece afresh, with the earlier messages remembered (`Tokenizer.encode_piece`)."""
    from qianwen.chat.template import encode_rendered

    messages = [("system", "You are a helpful assistant."), ("user", TEXTS["chinese"]),
                ("assistant", TEXTS["english"] + "<|im_end|>"), ("user", TEXTS["mixed"])]

    def fresh(text: str, parts: list[str]) -> list[int]:  # the path's own pieces, each encoded now
        ids, pos = [], 0
        for c in parts:
            i = text.index(c, pos)
            ids += (tok.encode(text[pos:i], allow_special=True) if i > pos else []) + tok.encode(c)
            pos = i + len(c)
        return ids + tok.encode(text[pos:], allow_special=True)

    encode_rendered(tok, chatml(messages), [c for _, c in messages])
    for answer, question in (("Hello", "Hellooo"), (TEXTS["mixed"], "a\n\n")):
        messages += [("assistant", answer), ("user", question)]
        text, parts = chatml(messages), [c for _, c in messages]
        lengths = encoded_lengths(tok, monkeypatch)
        got = encode_rendered(tok, text, parts)
        monkeypatch.undo()
        assert got == fresh(text, parts)
        # only the new messages and the template text around them: never an earlier message again
        assert max(lengths) <= max(len(answer), len(question)) + len("<|im_end|>\n<|im_start|>assistant\n"), lengths
        assert sum(lengths) < len(text) // 2


def test_remembered_pieces_stay_within_their_characters(tok):
    from qianwen.tokenizer.base import RecentPieces

    pieces = RecentPieces(tok, chars=40)
    texts = ["Hello there, " * k for k in (1, 2, 3)] + ["x" * 41]
    for t in texts:
        assert pieces.encode(t, False) == tok.encode(t)
    assert pieces.held == sum(map(len, (k for k, _ in pieces.recent))) <= 40
    assert [k for k, _ in pieces.recent] == [texts[2]]  # the oldest went first; one over the limit is never kept
    got = pieces.encode(texts[2], False)
    got.append(-1)  # a caller's list is its own
    assert pieces.encode(texts[2], False) == tok.encode(texts[2])
