"""Sliding-window perplexity against transformers' loss; text files and token shards give the same ids."""

from __future__ import annotations

import math

import pytest
import torch

from qianwen.errors import QianwenError
from qianwen.eval.perplexity import load_ids, perplexity

TEXT = ("The quick brown fox jumps over the lazy dog. Qwen is a large language model. "
        "def add(a, b):\n    return a + b\n") * 6


@pytest.fixture(scope="module")
def tiny(tiny_qwen2_dir):
    import qianwen

    return qianwen.load(str(tiny_qwen2_dir), dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def hf_model(tiny_qwen2_dir):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(tiny_qwen2_dir), dtype=torch.float32).eval()


def _hf_strided(model, ids: list[int], window: int, stride: int) -> tuple[float, int]:
    """The recipe of the transformers perplexity guide (labels -100 for context-only tokens)."""
    x = torch.tensor([ids])
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        trg_len = end - prev_end
        inp = x[:, begin:end]
        labels = inp.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(inp, labels=labels).loss
        n = int((labels[:, 1:] != -100).sum())
        nll_sum += float(loss) * n
        n_tokens += n
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll_sum / n_tokens), n_tokens


@pytest.mark.parametrize("window,stride", [(4096, None), (64, 32), (50, 17), (40, 40)])
def test_matches_transformers(tiny, hf_model, tmp_path, window, stride):
    f = tmp_path / "t.txt"
    f.write_text(TEXT, encoding="utf-8")
    ids = load_ids(f, tiny.tokenizer)
    assert len(ids) > 150
    res = perplexity(tiny.net, ids, "cpu", window=window, stride=stride)
    ref, n = _hf_strided(hf_model, ids, min(window, len(ids)), stride or window // 2)
    assert res["tokens"] == n
    if (stride or window // 2) < window:
        assert n == len(ids) - 1
    assert res["perplexity"] == pytest.approx(ref, rel=1e-4)


def test_shards_give_same_ids(tiny, tmp_path):
    from qianwen.train.shards import ShardWriter, tokenizer_info

    ids = tiny.tokenizer.encode(TEXT)
    with ShardWriter(tmp_path / "s" / "part", tokenizer_info(tiny.tokenizer)) as w:
        w.add(ids[:100])
        w.add(ids[100:])
    assert load_ids(tmp_path / "s", tiny.tokenizer) == ids


def test_errors(tiny, tmp_path):
    with pytest.raises(QianwenError, match="no such file"):
        load_ids(tmp_path / "missing.txt", tiny.tokenizer)
    with pytest.raises(QianwenError, match="at least 2"):
        perplexity(tiny.net, [1], "cpu")
    with pytest.raises(QianwenError, match="stride"):
        perplexity(tiny.net, [1, 2, 3], "cpu", window=4, stride=8)
