"""Pretraining in-process on a tiny qwen2 model: the loss falls, a handful of sequences overfit, the
export loads in qianwen and in transformers with the same logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qianwen.train import distributed as ddist
from qianwen.train.loop import TrainConfig, lr_at, train
from qianwen.train.presets import PRESETS, preset_config
from qianwen.train.pretrain import WindowSource, build_net
from tests.test_train_fixtures import make_shards


@pytest.fixture(autouse=True)
def one_thread():
    # tiny matmuls on a shared 2-core machine: one thread is faster and keeps runs reproducible
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cfg(tmp_path, **kw):
    base = dict(out=str(tmp_path / "run"), max_steps=60, global_batch=4, micro_batch=2, lr=1e-2, warmup=5,
                save_every=10_000, progress=False, dtype="float32")
    base.update(kw)
    return TrainConfig(**base)


def test_loss_falls_and_export_loads(tmp_path):
    import qianwen
    from qianwen.loading.export import export_hf
    from qianwen.tokenizer import load_tokenizer
    from qianwen.train.shards import load_tokens

    tok_dir, shards = make_shards(tmp_path)
    tok = load_tokenizer(tok_dir)
    tokens, _ = load_tokens(str(shards / "train-*.bin"), identity=tok.identity)
    val, _ = load_tokens(str(shards / "val-*.bin"), identity=tok.identity)
    config = preset_config("tiny", tok.vocab_size, eos_token_id=tok.eos_id)
    net = build_net(config, seed=0)
    src = WindowSource(tokens, 32, seed=0, val_tokens=val)
    exported = tmp_path / "model"
    recs = train(net, src, _cfg(tmp_path, eval_every=30), ddist.Dist(),
                 export=lambda sd, step: export_hf(exported, config, sd, tok))
    first, last = np.mean([r["loss"] for r in recs[:5]]), np.mean([r["loss"] for r in recs[-5:]])
    assert last < first - 1.0, (first, last)
    assert recs[-1]["eval_loss"] < recs[0]["loss"]
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000

    m = qianwen.load(str(exported), dtype="float32", device="cpu")
    ids = tok.encode("The cat sat on the mat. 床前明月光")
    ours = m.logits(ids)
    with torch.no_grad():
        direct = net(torch.tensor([ids]))[0]
    torch.testing.assert_close(ours, direct, rtol=0, atol=1e-5)
    from transformers import Qwen2ForCausalLM
    hf = Qwen2ForCausalLM.from_pretrained(str(exported), torch_dtype=torch.float32)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_overfit_a_handful_of_sequences(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 200, size=4 * 32 + 1)
    config = preset_config("tiny", 256)
    net = build_net(config, seed=0)
    src = WindowSource(tokens, 32, seed=0)
    assert src.n_windows == 4
    recs = train(net, src, _cfg(tmp_path, max_steps=100, lr=2e-2, warmup=5, weight_decay=0.0), ddist.Dist(),
                 export=lambda sd, step: None)
    assert recs[0]["loss"] > 4.5  # ~ln(256) at the start
    assert recs[-1]["loss"] < 0.05, recs[-1]["loss"]


def test_schedule_warmup_then_cosine():
    c = TrainConfig(out="x", max_steps=100, lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert lr_at(0, c) == pytest.approx(0.1)
    assert lr_at(9, c) == pytest.approx(1.0)
    assert lr_at(10, c) == pytest.approx(1.0)
    assert lr_at(55, c) == pytest.approx(0.55)
    assert lr_at(100, c) == pytest.approx(0.1)


def test_presets_build_the_7b_shape():
    cfg = preset_config("7b", 151851)
    assert cfg["vocab_size"] == 151936 and cfg["num_key_value_heads"] == 32 and not cfg["tie_word_embeddings"]
    assert set(PRESETS) >= {"tiny", "0.5b", "7b"}
    from qianwen.models import build_model, read_config

    with torch.device("meta"):
        net = build_model(read_config(cfg))
    n = sum(p.numel() for p in net.parameters())
    assert 7.0e9 < n < 8.0e9  # Qwen-7B: 7.7B parameters
