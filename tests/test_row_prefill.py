"""A prompt prefilled as rows of the decode step (qianwen/native/kernels.c `decode_layers`, each row one
token of the same sequence: the same K/V buffer, positions p .. p + M - 1) computes what decoding its
tokens one at a time computes, bit for bit: the K/V it writes and every row's output. `attend` shares
the conversion of a cache's keys and values among the rows reading it; these tests hold every body of
the C file (this CPU's -march=native, the same without AVX512-BF16, and the plain C one) to a row's result
alone, and to a float64 softmax attention."""

from __future__ import annotations

import ctypes
import subprocess

import pytest
import torch

import qianwen
from qianwen import native
from qianwen.convert import quantize_folder
from qianwen.engine.cache_manager import BatchCache, CacheManager
from qianwen.fast.cache import quantize_kv

from .conftest import kernel_body, save_tiny

BODIES = {"native": ["-march=native"], "native-no-bf16-dot": ["-march=native", "-mno-avx512bf16"],
          "portable": ["-mno-avx512f"]}
KV = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}
U = 2.0 ** -8  # bf16's unit roundoff: 8 significant bits, rounded to nearest


def bf16_dot_built(flags: list[str]) -> bool:
    """Whether kernels.c built with `flags` has attend's bf16 dot products (it takes them where the
    compiler defines __AVX512BF16__)."""
    cmd = [native._compiler(), *flags, "-dM", "-E", "-x", "c", "/dev/null"]
    return "__AVX512BF16__" in subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module", params=list(BODIES))
def lib(request, tmp_path_factory):
    so = kernel_body(tmp_path_factory, request.param, BODIES[request.param])
    so.bf16_dot = bf16_dot_built(so.flags)
    return so


def pairs(lib, kind: str, d: int) -> bool:
    """Whether attend takes bf16 dot products here: a bf16 cache, heads a multiple of 64 wide, a build
    with them."""
    return lib.bf16_dot and kind == "bf16" and d % 64 == 0


class Cache:
    """One sequence's K/V for one layer, [Hkv, cap, D] each, as the kernels read it (int8: with scales)."""

    def __init__(self, kind: str, hkv: int, cap: int, d: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        k, v = (torch.randn(hkv, cap, d, generator=g) for _ in range(2))
        k[:, ::23] *= 8  # a few large keys: softmax maxima differ between chunks
        if kind == "int8":
            (self.k, self.ks), (self.v, self.vs) = quantize_kv(k), quantize_kv(v)
            self.kf, self.vf = self.k.float() * self.ks[..., None], self.v.float() * self.vs[..., None]
        else:
            self.k, self.v = k.to(KV[kind]), v.to(KV[kind])
            self.kf, self.vf, self.ks, self.vs = self.k.float(), self.v.float(), None, None
        self.code, self.cap, self.d = list(KV).index(kind), cap, d

    def ptrs(self) -> tuple[int, int, int | None, int | None]:
        return (self.k.data_ptr(), self.v.data_ptr(), self.ks is not None and self.ks.data_ptr() or None,
                self.vs is not None and self.vs.data_ptr() or None)


def logn(n: int) -> float:
    """A per-row factor on the scores that grows with the row's length (as Qwen-7B's LogN does)."""
    return 1 + n / 1000


def attend(lib, q: torch.Tensor, rows: list[tuple[Cache | None, int]], hq: int, hkv: int) -> torch.Tensor:
    """attend for rows (cache, length) with queries q [M, hq * D]; a None cache is a padding row."""
    m, d = q.shape[0], q.shape[1] // hq
    arr = lambda t, vals: (t * m)(*vals)  # noqa: E731
    kb, vb, ks, vs = (arr(ctypes.c_void_p, [c.ptrs()[i] if c else None for c, _ in rows]) for i in range(4))
    lens = arr(ctypes.c_int, [n for _, n in rows])
    strides = arr(ctypes.c_long, [c.cap * d if c else 0 for c, _ in rows])
    code = next((c.code for c, _ in rows if c), 0)
    scale, out = torch.tensor([d ** -0.5 * logn(n) for _, n in rows]), torch.full((m, hq * d), float("nan"))
    native.kernel_threads()
    lib.attend(q.data_ptr(), m, hq, hkv, d, hq * d, kb, vb, ks, vs, lens, strides, code, scale.data_ptr(),
               out.data_ptr())
    return out


def reference(q: torch.Tensor, cache: Cache, n: int, hq: int, hkv: int,
              bf16_dot: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of one query [hq * D] over the first n positions, in float64, and how far the
    kernel may be from it, per output: fp32 rounding (1e-5 of the largest output), and with bf16 dot
    products (`bf16_dot`) the rounding of q and of the softmax numerators to bf16, bounded so:
    a score's error is |sum_d (q~_d - q_d) k_td| * scale <= a_t = U * scale * sum_d |q_d k_td| (each
    |q~_d - q_d| <= U |q_d|); the kernel's numerator of position t is then w_t Z e^(d_t) (1 + r_t) with
    w_t the true softmax, |d_t| <= a_t, |r_t| <= U (e rounded), while its denominator (the fp32 sum of
    the unrounded numerators) is Z sum_u w_u e^(d_u), which lies in [Z e^(-sum_u w_u a_u), Z sum_u w_u
    e^(a_u)]. So its output is sum_t w_t f_t v_t with |f_t - 1| <= the larger of e^(a_t + sum w a)
    (1 + U) - 1 and 1 - e^(-a_t) (1 - U) / sum w e^a, and it is off by at most sum_t w_t |f_t - 1| |v_t|."""
    d, scale = cache.d, cache.d ** -0.5 * logn(n)
    qh = q.view(hq, d).double()
    k, v = (t[:, :n].double().repeat_interleave(hq // hkv, 0) for t in (cache.kf, cache.vf))
    w = torch.softmax((qh[:, None] @ k.transpose(1, 2))[:, 0] * scale, -1)  # [hq, n]
    want = (w[:, None] @ v)[:, 0]
    tol = torch.full_like(want, 1e-5 * want.abs().max().item() + 1e-6)
    if bf16_dot:
        a = U * scale * (qh.abs()[:, None] @ k.abs().transpose(1, 2))[:, 0]
        wa, z = (w * a).sum(-1, keepdim=True), (w * a.exp()).sum(-1, keepdim=True)
        f = torch.maximum((a + wa).exp() * (1 + U) - 1, 1 - (-a).exp() * (1 - U) / z)
        tol += ((w * f)[:, None] @ v.abs())[:, 0]
    return want.reshape(-1).float(), tol.reshape(-1).float()


# (hq, hkv, d): SmolLM2's 9/3 x 64, 7 query heads per kv head, 128-wide heads, one and 8 query heads per
# kv head (the kernels take 6 queries of a task at a time, rows x query heads, whatever their rows), a D
# whose bf16 and int8 keys the vector body converts element by element rather than as 32-bit words (and
# whose values it does not read from the cache directly), and a D the vector bodies do not take (the
# plain loops then run in every build)
SHAPES = [(9, 3, 64), (7, 1, 64), (4, 2, 128), (4, 4, 64), (16, 2, 64), (4, 2, 48), (2, 2, 40)]


@pytest.mark.parametrize("kind", list(KV))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_rows_of_one_sequence_equal_each_row_alone(lib, kind, shape):
    """Rows p .. p + 39 of one cache (crossing a 256-position chunk; more rows than one task takes) give
    each row's result alone, bit for bit, and softmax attention."""
    hq, hkv, d = shape
    cache = Cache(kind, hkv, 600, d, seed=hq + d)
    torch.manual_seed(d)
    for p in (0, 230, 540):
        lens = list(range(p + 1, p + 41))
        q = torch.randn(len(lens), hq * d)
        together = attend(lib, q, [(cache, n) for n in lens], hq, hkv)
        for i, n in enumerate(lens):
            alone = attend(lib, q[i:i + 1].contiguous(), [(cache, n)], hq, hkv)
            assert torch.equal(together[i], alone[0]), (p, i)
            want, tol = reference(q[i], cache, n, hq, hkv, pairs(lib, kind, d))
            assert ((together[i] - want).abs() <= tol).all(), (p, i)


def test_rows_of_several_caches_and_padding_rows(lib):
    """Rows of two sequences interleaved with padding rows (no cache): each row as alone."""
    hq, hkv, d = 9, 3, 64
    a, b = Cache("bf16", hkv, 300, d, seed=1), Cache("bf16", hkv, 300, d, seed=2)
    rows = [(a, 257), (a, 258), (b, 5), (None, 0), (b, 6), (b, 7), (a, 259), (None, 0)] + [(a, n) for n in range(1, 21)]
    q = torch.randn(len(rows), hq * d)
    together = attend(lib, q, rows, hq, hkv)
    for i, (c, n) in enumerate(rows):
        if c is not None:
            assert torch.equal(together[i], attend(lib, q[i:i + 1].contiguous(), [(c, n)], hq, hkv)[0]), i


@pytest.mark.parametrize("kind", list(KV))
def test_rows_of_one_cache_at_scattered_lengths(lib, kind, monkeypatch):
    """Rows of one cache in any order and at very different lengths (a row ending in a block where others
    go on, rows with no position in a chunk's later blocks, more rows than one task takes), on 1 to 3
    threads (which cut the rows into tasks differently): each row as alone, and softmax attention."""
    hq, hkv, d = 9, 3, 64
    cache = Cache(kind, hkv, 700, d, seed=5)
    lens = [600, 3, 250, 17, 256, 257, 1, 64, 65, 128, 700, 16, 33, 511, 512, 513, 90, 2, 300, 47, 48, 49,
            640, 129, 383, 384, 385, 5, 6, 7, 8, 9, 10, 11, 699, 200, 201]
    torch.manual_seed(3)
    q = torch.randn(len(lens), hq * d)
    # and prompts as rows: 19 tokens after 620 cached (a short last chunk, cut in two on several threads)
    # and 21 tokens at 10-30 (one chunk: the rows cut in two groups on several threads)
    rows, prompts = [(cache, n) for n in lens], [list(range(621, 640)), list(range(10, 31))]
    together = attend(lib, q, rows, hq, hkv)
    prompt_out = [attend(lib, q[:len(p)], [(cache, n) for n in p], hq, hkv) for p in prompts]
    for threads in (1, 2, 3):
        monkeypatch.setattr(native, "kernel_threads", lambda n=threads: lib.set_threads(n))
        assert torch.equal(attend(lib, q, rows, hq, hkv), together), threads
        for p, want in zip(prompts, prompt_out, strict=True):
            assert torch.equal(attend(lib, q[:len(p)], [(cache, n) for n in p], hq, hkv), want), (threads, p[0])
    monkeypatch.undo()
    for p, got in zip(prompts, prompt_out, strict=True):
        for i, n in enumerate(p):
            assert torch.equal(got[i], attend(lib, q[i:i + 1].contiguous(), [(cache, n)], hq, hkv)[0]), n
    for i, n in enumerate(lens):
        assert torch.equal(together[i], attend(lib, q[i:i + 1].contiguous(), [(cache, n)], hq, hkv)[0]), (i, n)
        want, tol = reference(q[i], cache, n, hq, hkv, pairs(lib, kind, d))
        assert ((together[i] - want).abs() <= tol).all(), (i, n)


def chunked_reference(q: torch.Tensor, cache: Cache, n: int, hq: int, hkv: int,
                      bf16_dot: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """attend's arithmetic in float64: per chunk of 256 positions (kernels.c ATT_CHUNK) the numerators
    e_t = exp(score_t - the chunk's max), their sum and the sum of e_t v_t, the chunks merged by their
    maxima; with bf16 dot products q and each e_t (not their sum) rounded to bf16. And how far the kernel
    may be from it, per output: fp32 rounding (1e-5 of the largest output), and where the kernel's fp32
    e_t (its score off by fp32 rounding: ~1e-4 of e_t here) may round to the bf16 on the other side of
    a rounding boundary, one bf16 step of e_t (at most 2 U e_t) either way."""
    d, scale = cache.d, cache.d ** -0.5 * logn(n)
    rnd = (lambda x: x.float().bfloat16().double()) if bf16_dot else (lambda x: x)  # noqa: E731
    qh = rnd(q.view(hq, d).double())
    k, v = (t[:, :n].double().repeat_interleave(hq // hkv, 0) for t in (cache.kf, cache.vf))
    s = (qh[:, None] @ k.transpose(1, 2))[:, 0] * scale  # [hq, n]
    top = s.max(-1, keepdim=True).values
    num, slack, den = torch.zeros(hq, d, dtype=torch.float64), torch.zeros(hq, d, dtype=torch.float64), 0
    for c0 in range(0, n, 256):
        sc, vc = s[:, c0:c0 + 256], v[:, c0:c0 + 256]
        mx = sc.max(-1, keepdim=True).values
        e, w = torch.exp(sc - mx), torch.exp(mx - top)
        near = rnd(e * (1 - 1e-4)) != rnd(e * (1 + 1e-4)) if bf16_dot else torch.zeros_like(e, dtype=torch.bool)
        num += w * (rnd(e)[:, None] @ vc)[:, 0]
        slack += w * ((near * 2 * U * e)[:, None] @ vc.abs())[:, 0]
        den = den + w * e.sum(-1, keepdim=True)
    want = num / den
    return want.reshape(-1).float(), (1e-5 * want.abs().max() + 1e-6 + slack / den).reshape(-1).float()


@pytest.mark.parametrize("shape", [(9, 3, 64), (7, 1, 64), (4, 2, 128), (4, 2, 48)],
                         ids=lambda s: "x".join(map(str, s)))
def test_bf16_cache_arithmetic(lib, shape):
    """A bf16 cache's rows (one and many per call, odd and even lengths, one to three chunks): what
    chunked_reference computes, q and the numerators rounded to bf16 where attend takes bf16 dot products
    (this CPU's AVX512-BF16 build, heads a multiple of 64 wide), in fp32 elsewhere."""
    hq, hkv, d = shape
    cache = Cache("bf16", hkv, 700, d, seed=11)
    lens = [1, 2, 3, 64, 65, 255, 256, 257, 300, 511, 621, 622, 623, 624, 700]
    torch.manual_seed(7)
    q = torch.randn(len(lens), hq * d)
    for out in (attend(lib, q, [(cache, n) for n in lens], hq, hkv),
                torch.cat([attend(lib, q[i:i + 1].contiguous(), [(cache, n)], hq, hkv) for i, n in enumerate(lens)])):
        for i, n in enumerate(lens):
            want, tol = chunked_reference(q[i], cache, n, hq, hkv, pairs(lib, "bf16", d))
            assert ((out[i] - want).abs() <= tol).all(), (n, (out[i] - want).abs().max().item())


@pytest.fixture(scope="module", params=["q4", "bf16"])
def model(request, tmp_path_factory):
    src = save_tiny(tmp_path_factory.mktemp("src"), "qwen2", dtype=torch.bfloat16,
                    hidden_size=192, num_attention_heads=6, num_key_value_heads=2)  # 3 query heads a kv head
    if request.param == "q4":
        src = quantize_folder(src, tmp_path_factory.mktemp("q4"), bits=4, group_size=32)
    return qianwen.load(str(src), dtype=torch.bfloat16)


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.int8])
def test_prefill_as_rows_writes_what_decoding_token_by_token_writes(model, kv_dtype):
    """A 100-token prompt through fast_decode as rows of 64 and 36 (one sequence's K/V buffer repeated,
    as the engine's prefill calls it) = the same tokens decoded one per step: K/V and outputs bit for bit."""
    net, c = model.net, model.config
    assert net.fast_decode is not None and net.fast_decode.one_call
    cm = CacheManager(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, kv_dtype, torch.device("cpu"), 4096)
    ids = [(i * 37) % 200 + 3 for i in range(100)]

    def run(chunks: list[int]):
        kv, outs, s = cm.allocate(128), [], 0
        with torch.inference_mode():
            for n in chunks:
                cache = BatchCache([kv] * n, list(range(s, s + n)))
                outs.append(net.fast_decode(torch.tensor(ids[s:s + n])[:, None], torch.arange(s, s + n)[:, None],
                                            cache))
                s += n
        return kv, torch.cat(outs)

    rows_kv, rows_out = run([64, 36])
    one_kv, one_out = run([1] * 100)
    assert torch.equal(rows_out, one_out)
    assert torch.equal(rows_kv.buf[..., :100, :], one_kv.buf[..., :100, :])
    if kv_dtype == torch.int8:
        assert torch.equal(rows_kv.scales[..., :100], one_kv.scales[..., :100])
