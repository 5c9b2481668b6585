"""Quantized linear layers and GGUF block repacking (qianwen.quant)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from qianwen.quant.gguf import _DECODERS, _INT8, SUPPORTED_TYPES, plane_from_gguf, quantized_linear_from_gguf
from qianwen.quant.int4 import pack_int4, pick_group_size, unpack_int4_rows
from qianwen.quant.linear import Int4Linear, Int8Linear, QuantEmbedding, fuse_linears


def _linear(n: int, k: int, seed: int = 0, bias: bool = False) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05)
        if bias:
            lin.bias.normal_(0, 0.1)
    return lin


def test_pack_matches_torch_converter_and_unpacks():
    q = torch.randint(0, 16, (192, 96), dtype=torch.int32)
    ours = pack_int4(q)
    assert torch.equal(ours, torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
    rows = torch.tensor([0, 31, 32, 63, 64, 191, 100])
    assert torch.equal(unpack_int4_rows(ours, rows, 96), q[rows].to(torch.uint8))


def test_group_size_choice():
    assert pick_group_size(576, 128) == 64  # SmolLM2: 128 does not divide 576
    assert pick_group_size(576, 32) == 32
    assert pick_group_size(896) == 128
    with pytest.raises(ValueError):
        pick_group_size(576, 48)
    with pytest.raises(ValueError):
        pick_group_size(100)


@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_int4_linear_matches_its_dequantized_weight(group):
    lin = _linear(320, 512, bias=True)  # 320 rows: padded to 384 inside
    q = Int4Linear.from_float(lin, group)
    w = q.dequantize()
    step = (lin.weight.abs().max() * 2 / 15).item()
    assert (w - lin.weight).abs().max().item() <= step * 0.75  # rounding to the nearest of 16 levels
    x = torch.randn(5, 512)
    ref = x.bfloat16().float() @ w.T + lin.bias
    got = q(x)
    assert got.dtype == torch.float32 and got.shape == (5, 320)
    assert (got - ref).abs().max().item() <= 2e-2 * ref.abs().max().item()


def test_int8_linear_matches_its_dequantized_weight():
    lin = _linear(200, 256, bias=True)
    q = Int8Linear.from_float(lin)
    w = q.dequantize()
    assert (w - lin.weight).abs().max().item() <= lin.weight.abs().max().item() / 127
    x = torch.randn(3, 256)
    ref = x.bfloat16().float() @ w.T + lin.bias
    assert (q(x) - ref).abs().max().item() <= 2e-2 * ref.abs().max().item()


def _blocks(name: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    """Random GGUF blocks with sane fp16 scale fields."""
    block, nbytes = _INT8[name] if name in _INT8 else _DECODERS[name][1:]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (n, k // block, nbytes), dtype=np.uint8)
    n_scales = 2 if name in ("Q4_1", "Q4_K") else 1
    at = nbytes - 2 if name == "Q6_K" else 0  # Q6_K keeps its d last
    for i in range(n_scales):
        d = (rng.random((n, k // block)) * 0.01 + 0.001).astype(np.float16)
        raw[..., at + 2 * i:at + 2 * i + 2] = d.view(np.uint8).reshape(n, k // block, 2)
    return raw.reshape(n, -1)


class FakeTensor:
    """The part of a gguf.ReaderTensor the repacker reads."""

    def __init__(self, name: str, raw: np.ndarray, k: int):
        from gguf import GGMLQuantizationType

        self.tensor_type = GGMLQuantizationType[name]
        self.data = raw
        self.shape = np.array([k, raw.shape[0]])


@pytest.mark.parametrize("name", SUPPORTED_TYPES)
def test_gguf_repack_is_exact(name):
    from gguf.quants import dequantize

    n, k = 128, 512
    t = FakeTensor(name, _blocks(name, n, k), k)
    ref = torch.from_numpy(dequantize(t.data, t.tensor_type).reshape(n, k))
    lin = quantized_linear_from_gguf(t)
    if isinstance(lin, Int8Linear):  # Q8_0, Q6_K: int8 with fp32 block scales, exact
        assert torch.equal(lin.dequantize(), ref)
    else:  # 4-bit: the decoded blocks before the kernel layout's bf16 scales
        q, s, z = plane_from_gguf(t)
        exact = (q.float() - 8) * s.repeat_interleave(32, 1) + z.repeat_interleave(32, 1)
        assert torch.equal(exact, ref)  # the repacking itself loses nothing
    # int4 held with bf16 scales (torch's kernel dtype): close to gguf's own dequantization
    w = lin.dequantize()
    assert (w - ref).abs().max().item() <= 1e-2 * ref.abs().max().item()
    x = torch.randn(4, k)
    assert (lin(x) - x.bfloat16().float() @ w.T).abs().max().item() <= 2e-2 * (x @ ref.T).abs().max().item()


def test_gguf_row_order_permutes_rows():
    n, k = 128, 64
    t = FakeTensor("Q4_1", _blocks("Q4_1", n, k), k)
    order = np.random.default_rng(1).permutation(n)
    assert torch.equal(quantized_linear_from_gguf(t, order).dequantize(), quantized_linear_from_gguf(t).dequantize()[order])


@pytest.mark.parametrize("kind", ["int4", "q8_0", "int8"])
def test_rows_do_not_depend_on_batch(kind):
    q = _quantized(kind, 256, 576)
    x = torch.randn(16, 576, dtype=torch.bfloat16)
    batch = q(x)
    for i in (0, 7, 15):
        assert torch.equal(q(x[i:i + 1]), batch[i:i + 1])


def test_quant_embedding_reads_rows_and_fusion_is_exact():
    lin = Int4Linear.from_float(_linear(384, 128), 32)
    emb = QuantEmbedding(lin, torch.float32)
    ids = torch.tensor([[3, 200, 383], [0, 1, 2]])
    assert torch.equal(emb(ids), lin.dequantize()[ids])
    a, b = Int4Linear.from_float(_linear(128, 128, 1), 32), Int4Linear.from_float(_linear(64, 128, 2), 32)
    fused = fuse_linears([a, b])
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    assert torch.equal(fused(x), torch.cat([a(x), b(x)], -1))
    assert fuse_linears([a, Int4Linear.from_float(_linear(64, 128, 2), 64)]) is None  # group sizes differ


def _quantized(kind: str, n: int = 320, k: int = 576):
    if kind == "int8":
        return Int8Linear.from_float(_linear(n, k, bias=True))
    if kind == "q8_0":  # int8 blocks of 32
        return quantized_linear_from_gguf(FakeTensor("Q8_0", _blocks("Q8_0", n, k), k))
    return Int4Linear.from_float(_linear(n, k, bias=True), 64)


@pytest.mark.parametrize("kind", ["int4", "q8_0", "int8"])
def test_prefill_dequantizes_on_the_fly_and_matches_the_kernel(kind):
    from qianwen.quant.linear import PREFILL_TOKENS

    q = _quantized(kind)
    x = torch.randn(3, PREFILL_TOKENS + 5, q.in_features, dtype=torch.bfloat16)
    kernel = q(x.reshape(-1, q.in_features)).view(3, -1, q.out_features)  # 2-D rows: the kernel path
    ref = (x.float() @ q.dequantize().T + (0 if q.bias is None else q.bias)).to(torch.bfloat16)
    got = q(x)
    scale = ref.abs().max().item()
    assert (got.float() - ref.float()).abs().max().item() <= 2e-2 * scale
    assert (got.float() - kernel.float()).abs().max().item() <= 2e-2 * scale
    assert torch.equal(q(x[1:2]), got[1:2])  # a sequence's prefill does not depend on its batch
    # decode rows (one token per sequence) still go through the kernel, bit for bit
    assert torch.equal(q(x[:, :1]), q(x[:, 0]).unsqueeze(1))
    assert torch.equal(q(x[:, :1]), kernel[:, :1])


def test_transposed_bf16_dequantization_is_the_kernel_formula():
    q = _quantized("int4", 192, 256)
    want = q.dequantize()
    got = q.dequantize_t().float().T
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 2 ** -7 * want.abs().max().item()  # bf16 rounding only


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1"])
def test_direct_q4_packing_equals_repacking_the_decoded_values(name):
    n, k = 200, 256  # 200 rows: padded to 256 inside
    t = FakeTensor(name, _blocks(name, n, k, seed=3), k)
    direct = quantized_linear_from_gguf(t)
    via_values = Int4Linear.from_q(*plane_from_gguf(t), 32)
    assert torch.equal(direct.packed, via_values.packed)
    assert torch.equal(direct.scales_zeros, via_values.scales_zeros)
    order = np.random.default_rng(2).permutation(n)
    assert torch.equal(quantized_linear_from_gguf(t, order).dequantize(), direct.dequantize()[order])
