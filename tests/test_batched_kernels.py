"""q4_gemm and q8_gemm (qianwen/native/kernels.c) over many rows of x at once, as the engine's batched
decode step calls them: against a float32 matmul on the dequantized weight, and bit for bit the same for
a row whatever the number of rows and wherever the row falls. Each check runs on every body the C file
has: the one this CPU builds (-march=native: AVX-512 VNNI here), AVX-512 without VNNI, and the plain C
one (CPUs without AVX-512)."""

from __future__ import annotations

import pytest
import torch

from qianwen import native
from qianwen.quant.linear import Int4Linear, Int8Linear

from .conftest import kernel_body

ROWS = [1, 2, 3, 4, 5, 8, 15, 16, 17, 33, 64]
BODIES = {"native": ["-march=native"], "avx512-no-vnni": ["-march=native", "-mno-avx512vnni"],
          "portable": ["-mno-avx512f"]}


VNNI = "avx512_vnni" in native._cpu_signature().split() and "avx512bw" in native._cpu_signature().split()


@pytest.fixture(scope="module", params=list(BODIES))
def lib(request, tmp_path_factory):
    so = kernel_body(tmp_path_factory, request.param, BODIES[request.param])
    so.int16 = VNNI and request.param == "native"  # q4_gemm holds x as int16 per group
    return so


def tolerance(lib, mod, x: torch.Tensor, w: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """fp32 rounding, plus, where q4_gemm holds x as int16 (x rounded to a step of max|x| / 32767 over
    each group of g inputs), the most that rounding can move each output: sum_k |w[n, k]| step(k) / 2."""
    tol = 1e-5 * want.abs().max()
    if getattr(lib, "int16", False) and isinstance(mod, Int4Linear):
        g = mod.group_size
        amax = x.abs().view(x.shape[0], -1, g).amax(-1).repeat_interleave(g, -1)  # [M, K]
        tol = tol + (amax / 32767 / 2) @ w.abs().T
    return tol


def run(lib, mod, x: torch.Tensor, out: torch.Tensor, accumulate: bool = False) -> None:
    """out (+)= mod(x) through `lib`'s kernel; out may be a column slice of a wider buffer (ldy > N)."""
    native.kernel_threads()
    getattr(lib, mod.KERNEL)(x.data_ptr(), x.shape[0], mod.in_features, *mod.kernel_args(), out.data_ptr(),
                             out.stride(0), int(accumulate))


def int4(n: int, k: int, g: int, bias: bool) -> Int4Linear:
    torch.manual_seed(n * 7 + k + g)
    return Int4Linear.from_float(torch.nn.Linear(k, n, bias=bias), g)


def int8(n: int, k: int, g: int, bias: bool) -> Int8Linear:
    torch.manual_seed(n * 5 + k + g)
    return Int8Linear(torch.randint(-128, 128, (n, k), dtype=torch.int8), torch.rand(n, k // g) * 0.01,
                      torch.randn(n) if bias else None)


def acts(m: int, k: int) -> torch.Tensor:
    """Activations with a few large entries, as hidden states have (a group's scale follows its largest)."""
    x = torch.randn(m, k)
    x[:, ::37] *= 20
    return x


LAYERS = {"q4 100x256 g32 bias": lambda: int4(100, 256, 32, True),  # N < Npad = 128
          "q4 130x192 g64": lambda: int4(130, 192, 64, False),  # Npad = 192, 3 blocks
          "q4 64x512 g128 bias": lambda: int4(64, 512, 128, True),
          "q8 101x256 g16 bias": lambda: int8(101, 256, 16, True),  # Q6_K blocks, N not a multiple of 4
          "q8 30x96 g32": lambda: int8(30, 96, 32, False),  # Q8_0 blocks
          "q8 7x128 per-channel bias": lambda: int8(7, 128, 128, True),
          "q8 9x40 g8": lambda: int8(9, 40, 8, False)}  # K, g not multiples of 16: the plain C body


@pytest.mark.parametrize("name", list(LAYERS))
def test_kernels_match_the_dequantized_weight_at_every_batch_size(lib, name):
    mod = LAYERS[name]()
    n = mod.out_features
    w = mod.dequantize()
    bias = mod.bias.float() if mod.bias is not None else 0
    for m in ROWS:
        x = acts(m, mod.in_features)
        want = x @ w.T + bias
        wide = torch.full((m, n + 13), 7.0)  # ldy > N; the columns past N stay untouched
        out = wide[:, 3:3 + n]
        run(lib, mod, x, out)
        assert ((out - want).abs() <= tolerance(lib, mod, x, w, want)).all(), (name, m)
        assert (wide[:, :3] == 7).all() and (wide[:, 3 + n:] == 7).all()
        base = out.clone()
        run(lib, mod, x, out, accumulate=True)
        assert torch.allclose(out, 2 * base, rtol=1e-6, atol=0), (name, m)


@pytest.mark.parametrize("name", list(LAYERS))
def test_a_rows_bits_do_not_depend_on_the_batch(lib, name):
    """Each row alone, in every batch size and at every place in it, gives the same bits."""
    mod = LAYERS[name]()
    n = mod.out_features
    x = acts(64, mod.in_features)
    alone = torch.empty(64, n)
    for i in range(64):
        run(lib, mod, x[i:i + 1].clone(), alone[i:i + 1])
    for m in ROWS:
        for start in sorted({0, 1, 5, 64 - m}):
            if start + m > 64:
                continue
            out = torch.empty(m, n)
            run(lib, mod, x[start:start + m].clone(), out)
            assert torch.equal(out, alone[start:start + m]), (name, m, start)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    out = torch.empty(64, n)
    run(lib, mod, x[perm].contiguous(), out)
    assert torch.equal(out, alone[perm])


def test_thread_count_does_not_change_the_bits(lib):
    mod, x = int4(320, 256, 32, True), acts(17, 256)
    outs = []
    for threads in (1, 2):
        lib.set_threads(threads)
        out = torch.empty(17, 320)
        getattr(lib, mod.KERNEL)(x.data_ptr(), 17, 256, *mod.kernel_args(), out.data_ptr(), 320, 0)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])


def test_zero_rows_of_x_give_the_bias(lib):
    """An all-zero row (a padding row; its group scale is 0) is exactly the bias."""
    for mod in (int4(100, 256, 32, True), int8(30, 96, 32, False)):
        out = torch.full((3, mod.out_features), 5.0)
        run(lib, mod, torch.zeros(3, mod.in_features), out)
        assert torch.equal(out, (mod.bias.float() if mod.bias is not None else torch.zeros(1)).expand_as(out))


def test_a_nan_in_x_reaches_its_rows_outputs_only(lib):
    """A NaN activation makes its own row's outputs NaN (the sampler reports it), never another row's."""
    for mod in (int4(100, 256, 32, True), int8(30, 96, 32, False)):
        x = acts(9, mod.in_features)
        x[4, 7] = float("nan")
        out = torch.empty(9, mod.out_features)
        run(lib, mod, x, out)
        assert out[4].isnan().all()
        assert torch.isfinite(out[torch.arange(9) != 4]).all()
