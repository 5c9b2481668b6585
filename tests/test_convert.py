"""`qianwen convert`: the default GGUF to a Hugging Face folder, loaded back by us and by transformers."""

from __future__ import annotations

import os

import pytest
import torch

import qianwen
from qianwen.cli.main import main

PROMPT = "<|im_start|>user\nSay hello in Chinese. 你好！<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def converted(default_gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "smollm2"
    assert main(["convert", "-m", str(default_gguf), "--out", str(out)]) == 0
    return out


def test_folder_has_the_hf_files(converted):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert (converted / name).is_file(), name
        # readable like any new file (safetensors and temp files would make them 0600)
        mask = os.umask(0)
        os.umask(mask)
        assert (converted / name).stat().st_mode & 0o777 == 0o666 & ~mask, name


def test_round_trip_logits_equal_loading_the_gguf(converted, default_gguf):
    a = qianwen.load(default_gguf, dtype="float32")
    b = qianwen.load(converted, dtype="float32")
    ids = a.tokenizer.encode(PROMPT, allow_special=True)
    assert b.tokenizer.encode(PROMPT, allow_special=True) == ids
    assert torch.equal(a.logits(ids), b.logits(ids))
    assert b.chat_template.render([{"role": "user", "content": "hi"}]) == \
        a.chat_template.render([{"role": "user", "content": "hi"}])
    assert b.stop_token_ids >= {a.tokenizer.token_to_id("<|im_end|>")}


def test_transformers_loads_the_folder(converted, default_gguf):
    import transformers

    ours = qianwen.load(converted, dtype="float32")
    ref = transformers.AutoModelForCausalLM.from_pretrained(converted, torch_dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(converted)
    ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    assert ids == ours.tokenizer.encode(PROMPT, allow_special=True)
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
    assert (ours.logits(ids) - want).abs().max().item() <= 1e-3


def test_bad_input_is_one_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF not really")
    assert main(["convert", "-m", str(bad), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip()
