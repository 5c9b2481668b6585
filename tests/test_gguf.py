"""The real default GGUF (SmolLM2-135M-Instruct Q4_1) against transformers' own GGUF loader."""

from __future__ import annotations

import pytest
import torch

import qianwen

PROMPT = "<|im_start|>user\nTranslate to Chinese: good morning. 早上好，今天天气很好。<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def ours(default_gguf):
    return qianwen.load(default_gguf, dtype="float32")


def test_gguf_logits_match_transformers_gguf_loader(ours, default_gguf):
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(
        default_gguf.parent, gguf_file=default_gguf.name, torch_dtype=torch.float32).eval()
    ids = ours.tokenizer.encode(PROMPT, allow_special=True)
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
    got = ours.logits(ids)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-3
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_gguf_metadata_config_and_template(ours):
    c = ours.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.num_key_value_heads) == ("llama", 30, 576, 3)
    assert c.tie_word_embeddings and not ours.chat_template.builtin
    rendered = ours.chat_template.render([{"role": "user", "content": "hi"}])
    assert rendered.endswith("<|im_start|>assistant\n")
    assert ours.tokenizer.token_to_id("<|im_end|>") in ours.stop_token_ids


def test_chat_ends_cleanly_in_english_and_chinese(ours):
    for question in ("Give me three tips for learning Chinese.", "给我三个学习中文的建议。"):
        ids = ours.encode_chat([{"role": "user", "content": question}])
        steps = list(ours.stream_tokens(ids, ours.params(max_tokens=48, seed=0)))
        assert steps[-1].finish_reason in ("stop", "length")
        assert all(s.finish_reason is None for s in steps[:-1])
        text = "".join(s.text for s in steps)
        assert "<|im_end|>" not in text and "\ufffd" not in text
