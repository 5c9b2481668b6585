"""Logit parity with transformers on tiny random checkpoints saved in the real format (fp32)."""

from __future__ import annotations

import pytest
import torch

from qianwen.loading.hf import load_hf_weights, read_json
from qianwen.models import read_config
from qianwen.models.cache import KVCache

from .conftest import save_tiny

CASES = {
    "qwen2-untied": ("qwen2", {}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),
    "qwen3": ("qwen3", {}),
    "llama": ("llama", {}),
    "llama-bias": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "qwen2-linear": ("qwen2", {"rope_scaling": {"type": "linear", "factor": 2.0}}),
    "qwen2-dynamic": ("qwen2", {"rope_scaling": {"type": "dynamic", "factor": 2.0}, "max_position_embeddings": 32}),
    "qwen2-yarn": ("qwen2", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                              "original_max_position_embeddings": 64}}),
    "llama-llama3": ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    "qwen3-theta": ("qwen3", {"rope_theta": 1e6}),
    "qwen3_moe": ("qwen3_moe", {}),
    "qwen3_moe-step": ("qwen3_moe", {"decoder_sparse_step": 2, "mlp_only_layers": [], "norm_topk_prob": False,
                                     "num_hidden_layers": 4}),
}


def load_pair(folder, model_type):
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    config = read_config(read_json(folder / "config.json"))
    ours = load_hf_weights(folder, config, torch.float32, torch.device("cpu"))
    return ref, ours


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, tmp_path):
    model_type, overrides = CASES[case]
    folder = save_tiny(tmp_path, model_type, **overrides)
    ref, ours = load_pair(folder, model_type)
    ids = torch.randint(0, ref.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
        got = ours(ids)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-4


# dynamic rope is left out on purpose: its frequencies change with length, so cached keys differ by design
@pytest.mark.parametrize("case", ["qwen2-untied", "qwen3", "llama", "qwen2-yarn", "llama-bias", "qwen3_moe"])
def test_cached_decode_matches_full_forward(case, tmp_path):
    model_type, overrides = CASES[case]
    folder = save_tiny(tmp_path, model_type, **overrides)
    _, ours = load_pair(folder, model_type)
    ids = torch.randint(0, ours.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = ours(ids)
        cache = KVCache(ours.config.num_hidden_layers, capacity=8)  # small: exercises buffer growth
        steps = [ours(ids[:, :16], cache=cache)]
        steps.append(ours(ids[:, 16:20], cache=cache))  # a chunk after a prefix (masked path)
        steps += [ours(ids[:, i:i + 1], cache=cache) for i in range(20, 40)]
    inc = torch.cat(steps, dim=1)
    assert (inc - full).abs().max().item() <= 1e-4


def test_greedy_generation_matches_transformers(tmp_path):
    import transformers

    import qianwen

    folder = save_tiny(tmp_path, "qwen2")
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    model = qianwen.load(folder, dtype="float32")
    prompt = model.tokenizer.encode("The quick brown fox")
    want = ref.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                        pad_token_id=0, min_new_tokens=24)[0, len(prompt):].tolist()
    params = model.params(temperature=0, max_tokens=24, repetition_penalty=1.0, ignore_eos=True)
    got = [s.token_id for s in model.stream_tokens(prompt, params)]
    assert got == want
