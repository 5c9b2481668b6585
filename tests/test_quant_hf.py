"""`qianwen quantize` on a tiny Hugging Face checkpoint: files, config, and logits near the float model."""

from __future__ import annotations

import json

import pytest

import qianwen
from qianwen.cli.main import main
from qianwen.quant.linear import Int4Linear, Int8Linear

TEXT = "Qwen is a large language model. 通义千问是一个大语言模型。"


@pytest.mark.parametrize("bits,group,tol", [(8, None, 0.03), (4, 32, 0.25), (4, 128, 0.25)])
def test_quantize_then_load_is_close_to_float(tiny_qwen2_dir, tmp_path, capsys, bits, group, tol):
    out = tmp_path / "q"
    argv = ["quantize", "-m", str(tiny_qwen2_dir), "--bits", str(bits), "--out", str(out)]
    assert main(argv + (["--group-size", str(group)] if group else [])) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "qianwen" and cfg["quantization_config"]["bits"] == bits
    if group == 128:  # hidden size 64: 128 does not fit, the largest that does is used and reported
        assert "64" in capsys.readouterr().err
    ref = qianwen.load(tiny_qwen2_dir, dtype="float32")
    q = qianwen.load(out, dtype="bfloat16")
    layer = q.net.model.layers[0]
    kinds = [type(mod) for mod in layer.modules()]
    assert (Int8Linear if bits == 8 else Int4Linear) in kinds
    ids = ref.tokenizer.encode(TEXT)
    want, got = ref.logits(ids), q.logits(ids)
    assert (got - want).abs().max().item() <= tol * want.abs().max().item()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() >= 0.8
    # generation runs through the quantized, fused model
    assert isinstance(q.generate(TEXT, max_tokens=4, temperature=0), str)


def test_quantize_rejects_bad_options(tiny_qwen2_dir, tmp_path, capsys):
    assert main(["quantize", "-m", str(tiny_qwen2_dir), "--bits", "8", "--group-size", "32",
                 "--out", str(tmp_path / "q")]) == 1
    assert "group" in capsys.readouterr().err


def test_info_counts_quantized_weights(tiny_qwen2_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", "-m", str(tiny_qwen2_dir), "--bits", "4", "--group-size", "32", "--out", str(out)]) == 0
    capsys.readouterr()
    rows = {}
    for folder in (tiny_qwen2_dir, out):
        assert main(["info", "-m", str(folder), "--dtype", "bfloat16"]) == 0
        lines = capsys.readouterr().out.splitlines()
        rows[folder] = dict((ln[:16].strip(), ln[16:].strip()) for ln in lines if len(ln) > 16)
    assert rows[out]["parameters"] == rows[tiny_qwen2_dir]["parameters"]
    assert rows[out]["weights"].startswith("quantized:") and "int4 g32" in rows[out]["weights"]
    assert rows[tiny_qwen2_dir]["weights"].startswith("not quantized")
