"""The C decode kernels (qianwen/native/kernels.c) against the torch path they replace: the int4 matmul
against the dequantized weight, and the whole fused decode step against the model's own forward, for
each architecture, both cache kinds, padding rows, and Qwen-7B's NTK/LogN."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys

import pytest
import torch

import qianwen
from qianwen import native
from qianwen.convert import quantize_folder
from qianwen.engine import LLM
from qianwen.engine.cache_manager import BatchCache, CacheManager
from qianwen.fast import StaticKVCache, optimize
from qianwen.fast.dense import DenseLinear
from qianwen.loading.hf import load_hf_weights
from qianwen.quant.linear import Int4Linear, Int8Linear

from .conftest import save_tiny
from .test_engine import PROMPTS, greedy


def test_kernels_build_and_share_torchs_thread_pool():
    assert native.lib() is not None, native.failure  # the suite needs a C compiler (dev.sh installs one)
    # in a fresh process (other packages vendor their own renamed libgomp): one OpenMP runtime, torch's
    code = ("import torch, qianwen.native as n; assert n.lib() is not None\n"
            "print(sorted({l.split()[-1] for l in open('/proc/self/maps') if 'libgomp' in l}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    gomp = eval(out)
    assert len(gomp) == 1 and "torch" in gomp[0], gomp


def _int4(n: int, k: int, g: int, bias: bool) -> Int4Linear:
    torch.manual_seed(n + k + g)
    return Int4Linear.from_float(torch.nn.Linear(k, n, bias=bias), g)


@pytest.mark.parametrize("n,k,g,bias", [(100, 256, 32, True), (128, 192, 64, False), (64, 512, 128, True),
                                        (320, 256, 256, False)])
def test_q4_gemm_matches_the_dequantized_weight(n, k, g, bias):
    lin = _int4(n, k, g, bias)
    x = torch.randn(5, k)
    want = x @ lin.dequantize().T + (lin.bias.float() if bias else 0)
    out = torch.empty(5, n)
    assert lin.native_matmul(x, out)
    assert (out - want).abs().max().item() <= 1e-4 * want.abs().max().item()
    base = torch.randn(5, n)
    acc = base.clone()
    assert lin.native_matmul(x, acc, accumulate=True)
    assert torch.allclose(acc, base + out, atol=1e-5)
    assert torch.allclose(lin(x), out, atol=1e-5)  # the module's forward takes the same kernel


@pytest.mark.parametrize("n,k,g,bias", [(101, 256, 16, True), (64, 96, 32, False), (30, 128, 128, True)])
def test_q8_gemm_matches_the_dequantized_weight(n, k, g, bias):
    """int8 with block scales: GGUF Q6_K (16), Q8_0 (32), per channel (K); rows not a multiple of 4."""
    torch.manual_seed(n)
    lin = Int8Linear(torch.randint(-128, 128, (n, k), dtype=torch.int8), torch.rand(n, k // g) * 0.01,
                     torch.randn(n) if bias else None)
    x = torch.randn(5, k)
    want = x @ lin.dequantize().T + (lin.bias if bias else 0)
    out = torch.empty(5, n)
    assert lin.native_matmul(x, out)
    assert (out - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    for i in range(5):  # each row as it would be alone
        alone = torch.empty(1, n)
        lin.native_matmul(x[i:i + 1].clone(), alone)
        assert torch.equal(alone[0], out[i])


def test_q4_gemm_rows_do_not_depend_on_the_batch():
    lin = _int4(192, 256, 32, True)
    x = torch.randn(7, 256)
    batch = torch.empty(7, 192)
    lin.native_matmul(x, batch)
    for i in range(7):
        alone = torch.empty(1, 192)
        lin.native_matmul(x[i:i + 1].clone(), alone)
        assert torch.equal(alone[0], batch[i])


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def quantized(request, tmp_path_factory):
    src = save_tiny(tmp_path_factory.mktemp("src"), request.param)
    return quantize_folder(src, tmp_path_factory.mktemp("q4"), bits=4, group_size=32)


def _decode(net, ids: list[int], steps: list[int], cache) -> torch.Tensor:
    """The logits of decode `steps` after the prompt `ids`, which runs on torch's layers whatever the steps
    run on (so two runs compare their steps from the same cache bytes)."""
    fd, net.fast_decode = net.fast_decode, None
    try:
        with torch.inference_mode():
            net.hidden_states(torch.tensor([ids]), cache=cache)
    finally:
        net.fast_decode = fd
    with torch.inference_mode():
        return torch.stack([net(torch.tensor([[t]]), cache=cache)[0, -1].float() for t in steps])


@pytest.mark.parametrize("quant", [None, 4])
def test_a_prompt_as_rows_matches_the_model_forward(tmp_path, quant):
    """A prompt through the fused step (its tokens as rows at consecutive positions, attending causally)
    gives the logits of torch's forward at every position, and leaves the cache ready for decoding."""
    src = save_tiny(tmp_path / "src", "qwen2")
    net = qianwen.load(str(quantize_folder(src, tmp_path / "q", bits=4, group_size=32) if quant else src),
                       dtype=torch.float32).net
    # unquantized: more than one attention chunk (256); int4: under quant/linear.py PREFILL_TOKENS, where
    # torch's forward runs the same int4 kernels (longer, it rounds activations to bf16 for a bf16 matmul)
    ids = [(i * 7) % 300 + 3 for i in range(60 if quant else 300)]
    with torch.inference_mode():
        cache = StaticKVCache.for_model(net, 1, 320)
        fast = net(torch.tensor([ids]), cache=cache)[0]
        assert cache.length == len(ids)
        step = net(torch.tensor([[5]]), cache=cache)[0, -1]
        fd, net.fast_decode = net.fast_decode, None
        try:
            want = net(torch.tensor([ids + [5]]))[0]
        finally:
            net.fast_decode = fd
    tol = 1e-4 if quant else 1e-5
    assert (fast - want[:-1]).abs().max().item() <= tol * want.abs().max().item()
    assert (step - want[-1]).abs().max().item() <= tol * want.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_decode_step_matches_the_model_forward(quantized, dtype):
    model = qianwen.load(str(quantized), dtype=dtype)
    net = model.net
    assert net.fast_decode is not None  # installed by optimize at load
    ids, steps = list(range(3, 40)), [5, 17, 9, 33, 2, 11]
    make = lambda: StaticKVCache.for_model(net, 1, 64)  # noqa: E731
    fast = _decode(net, ids, steps, make())
    fd, net.fast_decode = net.fast_decode, None
    try:
        want = _decode(net, ids, steps, make())
    finally:
        net.fast_decode = fd
    err = (fast - want).abs().max().item()
    if dtype == torch.float32:
        assert err <= 1e-4 * want.abs().max().item()
    else:  # the torch path keeps bf16 activations between ops, the kernels fp32
        assert err <= 0.05 * want.abs().max().item()
        assert (fast.argmax(-1) == want.argmax(-1)).float().mean().item() >= 0.8


def test_fused_decode_over_engine_caches_with_padding_rows(quantized):
    """BatchCache rows of different capacities and a padding row, against each sequence alone."""
    net = qianwen.load(str(quantized), dtype=torch.float32).net
    c = net.config
    cm = CacheManager(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, torch.float32, torch.device("cpu"),
                      4096, 16)
    prompts = [list(range(3, 12)), list(range(20, 60))]
    kvs = [cm.allocate(len(p) + 4) for p in prompts]
    assert kvs[0].capacity != kvs[1].capacity
    with torch.inference_mode():
        for p, kv in zip(prompts, kvs, strict=True):
            net.hidden_states(torch.tensor([p]), cache=BatchCache([kv], [0]))
        ids, pos = torch.tensor([[7], [8], [0]]), torch.tensor([[9], [40], [0]])
        batch = net(ids, pos, BatchCache([*kvs, None], [9, 40, 0]))
        for i, p in enumerate(prompts):
            alone = StaticKVCache.for_model(net, 1, 64)
            fd, net.fast_decode = net.fast_decode, None
            net.hidden_states(torch.tensor([p]), cache=alone)
            want = net(ids[i:i + 1], pos[i:i + 1], alone)
            net.fast_decode = fd
            assert (batch[i] - want[0]).abs().max().item() <= 1e-4 * want.abs().max().item()


def test_engine_batches_are_invariant_on_the_fused_step(quantized):
    model = qianwen.load(str(quantized), dtype=torch.bfloat16)
    assert model.net.fast_decode is not None
    llm = LLM(model)
    alone = [llm.generate([greedy(p, 10)])[0] for p in PROMPTS]
    together = llm.generate([greedy(p, 10) for p in PROMPTS])
    assert [a.token_ids for a in alone] == [b.token_ids for b in together]
    assert [a.top_logprobs for a in alone] == [b.top_logprobs for b in together]


def test_fused_decode_with_qwen7b_ntk_and_logn(tmp_path):
    """Qwen-7B beyond its seq_length: rotary from the NTK alpha chosen at prefill, LogN-scaled queries."""
    from .test_qwen_v1 import qwen_v1_config, to_qwen_names

    src = save_tiny(tmp_path / "q2", "qwen2", num_attention_heads=4, num_key_value_heads=4, rope_theta=10000.0)
    import safetensors.torch as st

    (tmp_path / "v1").mkdir()
    cfg = qwen_v1_config("v1.1", json.loads((src / "config.json").read_text())["vocab_size"], 16, True, True)
    (tmp_path / "v1" / "config.json").write_text(json.dumps(cfg))
    st.save_file(to_qwen_names(st.load_file(str(src / "model.safetensors"))), str(tmp_path / "v1" / "model.safetensors"))
    from qianwen.loading.hf import read_json
    from qianwen.models import read_config

    config = read_config(read_json(tmp_path / "v1" / "config.json"))
    plain = load_hf_weights(tmp_path / "v1", config, torch.float32, torch.device("cpu"))
    fast = optimize(copy.deepcopy(plain))
    assert fast.fast_decode is not None
    ids, steps = list(range(3, 27)), [5, 17, 9, 33]  # 24 + 4 tokens, past seq_length 16
    want = _decode(plain, ids, steps, StaticKVCache.for_model(plain, 1, 32))
    got = _decode(fast, ids, steps, StaticKVCache.for_model(fast, 1, 32))
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()


def test_without_the_kernels_torch_runs_the_same_layers(monkeypatch, quantized):
    lin = _int4(128, 256, 32, True)
    x = torch.randn(3, 256)
    want = lin(x)
    monkeypatch.setattr(native, "lib", lambda: None)
    got = lin(x)  # torch's int4 kernel, bf16 activations
    assert (got - want).abs().max().item() <= 0.02 * want.abs().max().item()
    model = qianwen.load(str(quantized), dtype=torch.float32)
    assert model.net.fast_decode is None
    assert len(model.generate("hello", max_tokens=4, temperature=0, ignore_eos=True)) > 0


def test_a_copied_model_decodes_on_its_own_weights(quantized):
    import gc

    net = qianwen.load(str(quantized), dtype=torch.float32).net
    ids, steps = list(range(3, 20)), [4, 8, 15]
    want = _decode(net, ids, steps, StaticKVCache.for_model(net, 1, 32))
    other = copy.deepcopy(net)
    del net
    gc.collect()  # the kernels' cached addresses must follow the copy, not the freed original
    got = _decode(other, ids, steps, StaticKVCache.for_model(other, 1, 32))
    assert torch.equal(got, want)


def test_fused_decode_over_a_long_cache_merges_its_chunks(tmp_path):
    """Over 256 cached positions attention runs in chunks on separate threads, merged by softmax sums."""
    src = save_tiny(tmp_path / "src", "llama", max_position_embeddings=1024)
    net = qianwen.load(str(quantize_folder(src, tmp_path / "q4", bits=4, group_size=32)), dtype=torch.float32).net
    ids, steps = [(i * 7) % 300 + 3 for i in range(600)], [5, 17, 9]
    fast = _decode(net, ids, steps, StaticKVCache.for_model(net, 1, 640))
    fd, net.fast_decode = net.fast_decode, None
    want = _decode(net, ids, steps, StaticKVCache.for_model(net, 1, 640))
    net.fast_decode = fd
    # 3e-4, not 1e-4: with AVX-512 VNNI q4_gemm holds x as int16 per group (a step of 2^-16 of the
    # group's largest |x|), so the two paths' last-bit attention differences can round an activation
    # one step apart (1.2e-4 here; 5e-7 with fp32 activations throughout)
    assert (fast - want).abs().max().item() <= 3e-4 * want.abs().max().item()


@pytest.fixture
def portable_kernels(tmp_path, monkeypatch):
    """The kernels' plain C bodies (what CPUs without AVX-512, e.g. ARM or AVX2-only x86, run)."""
    cc = native._compiler()
    so = native.open_library(native.build(cc, tmp_path / "portable.so",
                                          (["-O2", "-mno-avx512f", "-fno-math-errno", "-fopenmp"],)))
    if shutil.which("objdump"):  # no 512-bit instruction in it
        dis = subprocess.run(["objdump", "-d", str(tmp_path / "portable.so")], capture_output=True, text=True).stdout
        assert "zmm" not in dis
    monkeypatch.setattr(native, "lib", lambda: so)
    return so


def test_portable_kernels_compute_the_same(portable_kernels, quantized):
    lin = _int4(100, 256, 32, True)
    x = torch.randn(5, 256)
    out = torch.empty(5, 100)
    assert lin.native_matmul(x, out)
    assert (out - (x @ lin.dequantize().T + lin.bias)).abs().max().item() <= 1e-4 * out.abs().max().item()
    q8 = Int8Linear(torch.randint(-128, 128, (30, 64), dtype=torch.int8), torch.rand(30, 4) * 0.01)
    out8 = torch.empty(5, 30)
    assert q8.native_matmul(x[:, :64].contiguous(), out8)
    assert torch.allclose(out8, x[:, :64] @ q8.dequantize().T, atol=1e-4)
    net = qianwen.load(str(quantized), dtype=torch.float32).net  # its decode step on the portable kernels
    ids, steps = list(range(3, 30)), [5, 17, 9]
    fast = _decode(net, ids, steps, StaticKVCache.for_model(net, 1, 40))
    net.fast_decode = None
    want = _decode(net, ids, steps, StaticKVCache.for_model(net, 1, 40))
    assert (fast - want).abs().max().item() <= 1e-4 * want.abs().max().item()


def test_kernels_follow_torchs_thread_count_in_any_thread():
    """A thread torch did not start (the server's engine thread) uses torch.set_num_threads too, even
    when a kernel is the first parallel work it does (OpenMP's count is per thread)."""
    import threading

    lin = _int4(64, 64, 32, False)
    x, out, seen = torch.randn(1, 64), torch.empty(1, 64), []

    def work():
        lin.native_matmul(x, out)
        seen.append(native.lib().get_threads())

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t = threading.Thread(target=work)
        t.start()
        t.join()
    finally:
        torch.set_num_threads(before)
    assert seen == [1]


def test_one_call_layer_stack_equals_the_kernels_called_one_by_one(quantized):
    """kernels.c decode_layers runs the same kernels in the same order as the Python step: bit for bit,
    over engine caches of different capacities with a padding row."""
    net = qianwen.load(str(quantized), dtype=torch.bfloat16).net
    fd = net.fast_decode
    assert fd.one_call
    c = net.config
    results = []
    for one_call in (True, False):
        fd.one_call = one_call
        cm = CacheManager(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, torch.bfloat16,
                          torch.device("cpu"), 4096, 16)
        prompts = [list(range(3, 12)), list(range(20, 60))]
        kvs = [cm.allocate(len(p) + 4) for p in prompts]
        with torch.inference_mode():
            for p, kv in zip(prompts, kvs, strict=True):
                net.hidden_states(torch.tensor([p]), cache=BatchCache([kv], [0]))
            steps = [net(torch.tensor([[7 + i], [8 + i], [0]]), torch.tensor([[9 + i], [40 + i], [0]]),
                         BatchCache([*kvs, None], [9 + i, 40 + i, 0]))[:2] for i in range(3)]
        results.append(torch.stack(steps))
    fd.one_call = True
    assert torch.equal(results[0], results[1])


# ---- dense (bf16 / fp32) weights: kernels.c dense_gemm, DenseLinear, Hugging Face folders on the fast path

def _dense(n: int, k: int, dtype: torch.dtype, bias: bool) -> DenseLinear:
    torch.manual_seed(n * 7 + k)
    lin = torch.nn.Linear(k, n, bias=bias).to(dtype)
    return DenseLinear.from_linear(lin)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n,k,bias", [(37, 83, True), (130, 200, False), (64, 16, True), (5, 7, False)])
def test_dense_gemm_matches_a_float32_matmul(dtype, n, k, bias):
    lin = _dense(n, k, dtype, bias)
    w32, b32 = lin.weight.float(), (lin.bias.float() if bias else 0)
    for m in (1, 3, 4, 7, 16, 64):
        x = torch.randn(m, k)
        want = (x.double() @ w32.double().T + (b32.double() if bias else 0)).float()  # products exact in fp32 too
        out = torch.empty(m, n)
        assert lin.native_matmul(x, out)
        assert (out - want).abs().max().item() <= 1e-5 * (x.abs() @ w32.abs().T).max().item(), (m, n, k)
        base = torch.randn(m, n)
        acc = base.clone()
        assert lin.native_matmul(x, acc, accumulate=True)
        assert torch.equal(acc, base + out)
        wide = torch.zeros(m, n + 9)  # rows ldy floats apart
        assert lin.native_matmul(x, wide[:, 3:3 + n])
        assert torch.equal(wide[:, 3:3 + n], out) and not wide[:, :3].any() and not wide[:, 3 + n:].any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dense_gemm_rows_do_not_depend_on_the_batch(dtype):
    lin = _dense(131, 203, dtype, True)
    x = torch.randn(64, 203)
    batch = torch.empty(64, 131)
    lin.native_matmul(x, batch)
    for m in (1, 2, 3, 5, 7, 13, 16):  # every row of x[:m], a tile of 1 to 6 rows at any offset
        part = torch.empty(m, 131)
        lin.native_matmul(x[64 - m:].contiguous(), part)
        assert torch.equal(part, batch[64 - m:])


def test_native_forward_runs_many_rows_in_calls_of_native_rows():
    """A call over more rows than NATIVE_ROWS runs in pieces, with the result of one kernel call."""
    from qianwen.quant.linear import NATIVE_ROWS

    lin = _dense(131, 203, torch.float32, True)
    x = torch.randn(2 * NATIVE_ROWS + 37, 203)
    whole = torch.empty(len(x), 131)
    lin.native_matmul(x, whole)
    calls = []
    run = lin.native_matmul
    lin.native_matmul = lambda a, b: calls.append(len(a)) or run(a, b)
    assert torch.equal(lin.native_forward(x), whole)
    assert calls == [NATIVE_ROWS, NATIVE_ROWS, 37]


def _decode_logits(net, ids: list[int], steps: list[int]) -> torch.Tensor:
    cache = StaticKVCache.for_model(net, 1, len(ids) + len(steps) + 4)
    with torch.inference_mode():
        net.hidden_states(torch.tensor([ids]), cache=cache)
        return torch.stack([net(torch.tensor([[t]]), cache=cache)[0, -1] for t in steps])


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def bf16_folder(request, tmp_path_factory):
    """A tiny checkpoint whose weights are bf16 (as `qianwen convert --dtype bfloat16` writes them)."""
    return save_tiny(tmp_path_factory.mktemp("bf16"), request.param, dtype=torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_hugging_face_folder_decodes_in_one_native_call(bf16_folder, dtype):
    net = qianwen.load(str(bf16_folder), dtype=dtype).net
    assert net.fast_decode is not None and net.fast_decode.one_call
    assert isinstance(net.lm_head, DenseLinear) and net.lm_head.weight.dtype == dtype
    ids, steps = list(range(3, 40)), [5, 17, 9, 33, 2, 11]
    got = _decode_logits(net, ids, steps)
    assert got.dtype == torch.float32 and net._head_f32 is None  # no float32 copy of a bf16 head
    # the reference: the plain model (no optimize) in float32 on the same, exactly widened, weights
    plain = qianwen.load(str(bf16_folder), dtype=torch.float32, fast=False).net
    assert plain.fast_decode is None and hasattr(plain.model.layers[0].self_attn, "q_proj")
    want = _decode_logits(plain, ids, steps)
    err = (got - want).abs().max().item()
    if dtype == torch.float32:
        assert err <= 1e-4 * want.abs().max().item()
    else:  # only the cache is bf16 (activations stay fp32 in the kernels)
        assert err <= 0.02 * want.abs().max().item()
        assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_a_bf16_head_gives_exact_float32_logits_on_the_kernel(bf16_folder):
    net = qianwen.load(str(bf16_folder), dtype=torch.bfloat16).net
    h = torch.randn(3, 1, net.config.hidden_size)
    with torch.inference_mode():
        got = net.compute_logits(h)
    want = (h.double() @ net.lm_head.weight.double().T).float()
    assert got.dtype == torch.float32 and net._head_f32 is None
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    for i in range(3):  # and a row's logits do not depend on the batch
        with torch.inference_mode():
            assert torch.equal(net.compute_logits(h[i:i + 1]), got[i:i + 1])


def test_optimize_builds_new_modules_sharing_the_weights(bf16_folder):
    from qianwen.fast.optimize import FastRMSNorm, FusedAttention, FusedMLP

    plain = qianwen.load(str(bf16_folder), dtype=torch.bfloat16, fast=False).net
    layer = plain.model.layers[0]
    att, mlp, o, norm = layer.self_attn, layer.mlp, layer.self_attn.o_proj.weight, layer.input_layernorm
    net = optimize(plain)
    new = net.model.layers[0]
    assert type(new.self_attn) is FusedAttention and type(new.mlp) is FusedMLP
    assert type(att).__name__ == "Attention" and type(mlp).__name__ == "MLP"  # the old objects are untouched
    assert type(new.input_layernorm) is FastRMSNorm and new.input_layernorm.weight is norm.weight
    assert new.self_attn.o_proj.weight is o and isinstance(new.self_attn.qkv_proj, DenseLinear)
    assert optimize(net) is net and new.self_attn is net.model.layers[0].self_attn  # idempotent


def test_the_library_is_refused_when_its_structs_differ_from_the_mirror(monkeypatch):
    import ctypes

    path = native.build(native._compiler())
    assert native.open_library(path).struct_layout  # the real mirror matches
    fields = [f for f in native.Proj._fields_ if f[0] != "Npad"]  # as if kernels.c had changed alone
    monkeypatch.setattr(native, "Proj", type("Proj", (ctypes.Structure,), {"_fields_": fields}))
    with pytest.raises(RuntimeError, match="layout"):
        native.open_library(path)
    native.lib.cache_clear()
    try:
        assert native.lib() is None and "layout" in native.failure
    finally:
        monkeypatch.undo()
        native.lib.cache_clear()
        native.failure = None
    assert native.lib() is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_portable_dense_kernel_computes_the_same(portable_kernels, bf16_folder, dtype):
    lin = _dense(37, 83, dtype, True)  # K not a multiple of 16
    x = torch.randn(7, 83)
    out = torch.empty(7, 37)
    assert lin.native_matmul(x, out)
    want = x.double() @ lin.weight.double().T + lin.bias.double()
    assert (out - want).abs().max().item() <= 1e-5 * (x.abs() @ lin.weight.float().abs().T).max().item()
    for i in range(7):
        alone = torch.empty(1, 37)
        lin.native_matmul(x[i:i + 1].clone(), alone)
        assert torch.equal(alone[0], out[i])
    net = qianwen.load(str(bf16_folder), dtype=dtype).net  # a whole decode step in one call, portable
    assert net.fast_decode.one_call
    ids, steps = list(range(3, 30)), [5, 17, 9]
    got = _decode_logits(net, ids, steps)
    want = _decode_logits(qianwen.load(str(bf16_folder), dtype=torch.float32, fast=False).net, ids, steps)
    assert (got - want).abs().max().item() <= (1e-4 if dtype == torch.float32 else 0.02) * want.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dense_one_call_equals_the_kernels_called_one_by_one(bf16_folder, dtype):
    """decode_layers' Proj kinds 16 and 32 run dense_gemm exactly as the Python step calls it."""
    net = qianwen.load(str(bf16_folder), dtype=dtype).net
    fd, ids, steps = net.fast_decode, list(range(3, 30)), [5, 17, 9]
    one = _decode_logits(net, ids, steps)
    fd.one_call = False
    try:
        by_one = _decode_logits(net, ids, steps)
    finally:
        fd.one_call = True
    assert torch.equal(one, by_one)
