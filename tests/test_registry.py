"""The architecture registry (qianwen/models): every module registers itself and is tested, and a mixture
of experts model (Qwen3-MoE) runs on every path: the engine, the fast path's fallback, the export."""

from __future__ import annotations

import pkgutil

import pytest
import torch

import qianwen
import qianwen.models as models
from qianwen.engine import LLM

from . import test_parity
from .conftest import TINY, save_tiny

# architectures whose parity test is not in test_parity (transformers has no class for them)
PARITY_ELSEWHERE = {"qwen": "tests/test_qwen_v1.py"}


def test_every_module_registers_itself_under_its_name():
    modules = {m.name for m in pkgutil.iter_modules(models.__path__)} - models.SHARED_PARTS
    assert modules == set(models.SUPPORTED_MODEL_TYPES)
    for name in modules:
        arch = models.architecture(name)
        assert arch.model_type == name and arch.config.model_type == name
        assert arch.config.HF_CLASS, name
        if arch.gguf_arch:
            assert models.gguf_architecture(arch.gguf_arch) is arch


def test_every_architecture_has_a_parity_case():
    tested = {model_type for model_type, _ in test_parity.CASES.values()}
    for name in models.SUPPORTED_MODEL_TYPES:
        assert name in tested or name in PARITY_ELSEWHERE, f"{name} has no case in tests/test_parity.py"
        assert name in TINY or name in PARITY_ELSEWHERE, f"{name} has no tiny config in tests/conftest.py"


def test_aliases_and_unknown_types():
    assert models.architecture("mistral") is models.architecture("llama")
    with pytest.raises(qianwen.errors.QianwenError, match="unknown model_type 'gpt2'; supported: llama, qwen"):
        models.architecture("gpt2")
    # Qwen3-MoE is read from safetensors folders only (llama.cpp stacks its experts in one tensor each)
    with pytest.raises(qianwen.errors.QianwenError, match="unsupported GGUF architecture 'qwen3moe'"):
        models.gguf_architecture("qwen3moe")


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny_moe"), "qwen3_moe")


def greedy(prompt: str, max_tokens: int = 12) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "logprobs": 2}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_moe_in_the_engine_matches_the_decode_loop_and_the_batch(moe_dir, dtype):
    """Each sequence alone, in a batch of 8, and through Model.stream_tokens: the same tokens; alone and
    batched also the same log-probabilities (batch invariance, docs/conventions.md)."""
    model = qianwen.load(moe_dir, dtype=dtype)
    prompts = [f"Hello {i}: " + "the quick brown fox " * (i % 4) for i in range(8)]
    llm = LLM(model)
    alone = [llm.generate([greedy(p)])[0] for p in prompts]
    together = llm.generate([greedy(p) for p in prompts])
    for p, a, b in zip(prompts, alone, together, strict=True):
        assert a.token_ids == b.token_ids and a.top_logprobs == b.top_logprobs
        params = model.params(temperature=0, max_tokens=12, ignore_eos=True)
        assert [s.token_id for s in model.stream_tokens(model.tokenizer.encode(p), params)] == a.token_ids


def test_moe_falls_back_from_the_native_decoder(moe_dir):
    """`optimize` fuses what it can (the experts' gate/up) and installs no native decode step, which knows
    dense MLPs only: the model keeps its torch forward, with the same logits."""
    from qianwen.fast import optimize

    model = qianwen.load(moe_dir, dtype="float32")
    ids = model.tokenizer.encode("The quick brown fox")
    want = model.logits(ids)
    optimize(model.net)
    assert model.net.fast_decode is None
    assert (model.logits(ids) - want).abs().max().item() <= 1e-5
    params = model.params(temperature=0, max_tokens=8, ignore_eos=True)
    assert len(list(model.stream_tokens(ids, params))) == 8


def test_moe_export_loads_in_transformers(moe_dir, tmp_path):
    """`qianwen convert` writes the MoE keys and the hub's expert names: transformers reads the same model."""
    import transformers

    from qianwen.cli.main import main

    out = tmp_path / "exported"
    assert main(["convert", "-m", str(moe_dir), "--out", str(out), "--dtype", "float32"]) == 0
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    assert type(ref).__name__ == "Qwen3MoeForCausalLM"
    ours = qianwen.load(moe_dir, dtype="float32")
    ids = ours.tokenizer.encode("Hello world")
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
    assert (ours.logits(ids) - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_rows_do_not_depend_on_the_batch(dtype):
    """A token's output is bitwise the same among 16 tokens (the engine pads float32 batches to 16 rows)
    or among 32 others, though each expert then multiplies another number of rows (float32 kernels
    change path by row count: docs/server.md)."""
    from qianwen.models import read_config
    from qianwen.models.qwen3_moe import SparseMoE

    from .conftest import tiny_hf_config

    config = read_config(tiny_hf_config("qwen3_moe", 384, num_experts=8).to_dict())
    torch.manual_seed(0)
    moe = SparseMoE(config).to(dtype)
    x = torch.randn(32, config.hidden_size, dtype=dtype)
    others = torch.randn(15, config.hidden_size, dtype=dtype)
    with torch.no_grad():
        together = moe(x)
        for i in range(32):
            assert torch.equal(moe(torch.cat([x[i:i + 1], others]))[:1], together[i:i + 1]), i
