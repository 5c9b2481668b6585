"""SFT: which tokens carry loss in each input format; bad input; LoRA train -> adapter -> merge."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qianwen.errors import QianwenError
from qianwen.train.loop import IGNORE
from qianwen.train.sft import encode_conversation, example_row, make_source, to_messages
from tests.test_train_fixtures import make_base

SYSTEM, Q1, A1, Q2, A2 = "Be brief.", "Hi there", "Hello! 你好。", "用中文回答？", "好的，没问题。"
FORMATS = {
    "qwen": {"id": "x1", "conversations": [{"from": "system", "value": SYSTEM}, {"from": "user", "value": Q1},
                                           {"from": "assistant", "value": A1}, {"from": "user", "value": Q2},
                                           {"from": "assistant", "value": A2}]},
    "openai": {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": Q1},
                            {"role": "assistant", "content": A1}, {"role": "user", "content": Q2},
                            {"role": "assistant", "content": A2}]},
    "alpaca": {"system": SYSTEM, "history": [[Q1, A1]], "instruction": Q2, "input": "", "output": A2},
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("sft"))


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_loss_only_on_assistant_tokens(base, fmt):
    from transformers import AutoTokenizer

    import qianwen

    m = qianwen.load(str(base), dtype="float32", device="cpu")
    msgs = to_messages(FORMATS[fmt])
    assert [x["role"] for x in msgs] == ["system", "user", "assistant", "user", "assistant"]
    ids, mask = encode_conversation(msgs, m.tokenizer, m.chat_template)
    # the token sequence is exactly what transformers renders and tokenizes for this conversation
    hf = AutoTokenizer.from_pretrained(str(base))
    assert ids == hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=False, return_dict=False)
    x, y = example_row(type("E", (), {"ids": np.array(ids), "mask": np.array(mask)})())
    target = np.nonzero(y != IGNORE)[0]
    # runs of consecutive target positions, each decoding to one assistant answer plus <|im_end|>
    runs = np.split(target, np.nonzero(np.diff(target) != 1)[0] + 1)
    assert [m.tokenizer.decode(y[r]) for r in runs] == [A1 + "<|im_end|>", A2 + "<|im_end|>"]
    head = hf.encode("<|im_start|>assistant\n")
    for r in runs:  # each answer's first label is predicted from the last token of "<|im_start|>assistant\n"
        assert list(x[r[0] - len(head) + 1:r[0] + 1]) == head
    assert int((y != IGNORE).sum()) == len(hf.encode(A1)) + len(hf.encode(A2)) + 2


def test_bad_input_is_reported(base, tmp_path):
    import qianwen
    from qianwen.train.sft import read_records

    m = qianwen.load(str(base), dtype="float32", device="cpu")
    empty = tmp_path / "empty.json"
    empty.write_text("")
    with pytest.raises(QianwenError, match="empty"):
        read_records([str(empty)])
    bad = tmp_path / "bad.json"
    bad.write_text("[{\"messages\": ")
    with pytest.raises(QianwenError, match="not valid JSON"):
        read_records([str(bad)])
    no_answer = {"messages": [{"role": "user", "content": "hello?"}]}
    long = {"messages": [{"role": "user", "content": "x " * 400}, {"role": "assistant", "content": "ok"}]}
    with pytest.raises(QianwenError, match="no usable examples.*no assistant turn"):
        make_source([no_answer], m.tokenizer, m.chat_template, 128, 0)
    src, stats = make_source([no_answer, long, FORMATS["openai"], {"foo": 1}], m.tokenizer, m.chat_template, 128, 0)
    assert stats.examples == 1
    assert stats.skipped == {"no assistant turn": 1, "longer than --seq-len 128": 1,
                             "unknown format (expected conversations, messages, or instruction/output)": 1}


def test_packing_keeps_examples_apart(base):
    import qianwen
    from qianwen.train.loop import SegmentCache

    m = qianwen.load(str(base), dtype="float32", device="cpu")
    recs = [FORMATS["qwen"], FORMATS["alpaca"], {"messages": [{"role": "user", "content": "a"},
                                                               {"role": "assistant", "content": "b"}]}]
    src, _ = make_source(recs, m.tokenizer, m.chat_template, 256, 0)
    rows = src.rows(0, 1)
    assert len(rows) == 1 and rows[0].segments.max() == 2  # three examples in one row
    r = rows[0]
    x = torch.tensor(r.input_ids)[None]
    with torch.no_grad():
        packed = m.net(x, torch.tensor(r.positions)[None], SegmentCache(torch.tensor(r.segments)[None]))[0]
        for k in range(3):  # each example alone gives the same logits as inside the pack
            sel = np.nonzero(r.segments == k)[0]
            alone = m.net(x[:, sel])[0]
            torch.testing.assert_close(packed[sel], alone, rtol=1e-4, atol=1e-4)


def test_lora_adapter_merge_and_peft(base, tmp_path):
    from peft import PeftModel
    from transformers import Qwen2ForCausalLM

    import qianwen
    from qianwen.cli.main import main
    from qianwen.train.lora import load_adapter
    from qianwen.train.merge import merge

    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in FORMATS.values()) * 4)
    out = tmp_path / "run"
    rc = main(["train", "sft", "-m", str(base), "-d", str(data), "-o", str(out), "--lora", "--lora-r", "8",
               "--max-steps", "24", "--save-every", "24", "--global-batch", "2", "--micro-batch", "2",
               "--seq-len", "128", "--lr", "1e-2", "--dtype", "float32", "--no-progress"])
    assert rc == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 24 and log[-1]["loss"] < log[0]["loss"]
    adapter = out / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and cfg["lora_dropout"] == 0.05
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}

    m = qianwen.load(str(base), dtype="float32", device="cpu", fast=False)  # LoRA goes into the stored modules
    ids = m.tokenizer.encode("The cat sat on the mat. 床前明月光")
    x = torch.tensor([ids])
    with torch.no_grad():
        base_logits = m.net(x)[0]
        tuned = load_adapter(m.net, adapter).eval()
        adapted = tuned(x)[0]
    assert (adapted - base_logits).abs().max() > 1e-2

    merged = merge(str(base), adapter, tmp_path / "merged")
    mm = qianwen.load(str(merged), dtype="float32", device="cpu")
    torch.testing.assert_close(mm.logits(ids), adapted, rtol=0, atol=1e-4)
    reply = mm.chat([{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0)
    assert reply is not None

    hf = PeftModel.from_pretrained(Qwen2ForCausalLM.from_pretrained(str(base), torch_dtype=torch.float32), str(adapter))
    with torch.no_grad():
        ref = hf(x).logits[0]
    torch.testing.assert_close(ref, adapted, rtol=0, atol=1e-4)
