/* CPU decode kernels for qianwen.fast (compiled on first use by native.py, called through ctypes).

   Activations are fp32. Every output row is computed by the same sequence of operations whatever the
   number of rows or threads, so a sequence's result never depends on its batch (docs/conventions.md).
   Threads come from OpenMP; the library links the libgomp that torch already loaded, so both share
   one thread pool and torch.set_num_threads applies to both. native.py sets the calling thread's count
   before each call (fewer threads while other processes keep cores busy); no result depends on it.

   Each kernel has an AVX-512 body and a plain C body for other CPUs (auto-vectorised by -O3). */

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

/* OpenMP's thread count is per calling thread: a thread torch did not start (the server's engine
   thread) would otherwise use every core whatever torch.set_num_threads said. */
void set_threads(int n) {
#ifdef _OPENMP
    omp_set_num_threads(n);
#endif
}

int get_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

/* The number of threads a parallel region opened by the calling thread really gets (for tests). */
int team_size(void) {
    int n = 1;
#ifdef _OPENMP
#pragma omp parallel
#pragma omp single
    n = omp_get_num_threads();
#endif
    return n;
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 64); /* NaN stays NaN */
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

/* ---- int4 GEMM on torch's `_weight_int4pack_mm_for_cpu` layout ----------------------------------
   packed [Npad/64, K, 32] bytes: byte (blk, k, j) holds row 64 blk + j in its low nibble and row
   64 blk + 32 + j in its high nibble. sz [K/g, Npad, 2] bf16 (scale, zero): w = (q - 8) scale + zero.
   y[m, n] (+)= sum_k x[m, k] w[n, k] + bias[n], rows of y `ldy` floats apart.

   Threads take 64-output blocks; in a block, up to Q_ROWS rows of x share each unpacked weight vector
   (Q_ROWS x 4 accumulators in registers). Every output of every row gets the same operations whatever
   M or the row's place (batch invariance), per group of g inputs:
   - with AVX-512 VNNI: x is held per row and group as 16-bit integers xq = round(x / sx), sx = max|x|
     / 32767 over the group (rounding 2^-16 of the group's largest |x|, far below the bf16 scale's
     own), so the group's sum of q xq is an exact integer (vpdpwssd: 32 products of 16-bit pairs per
     instruction, twice an fp32 FMA's 16 at the same rate); then out = fma(isum sx, scale, out).
   - otherwise, in fp32: acc = fma(q[k], x[k], acc) over the group's k in order from 0; out = fma(acc,
     scale, out).
   then out = fma(zero - 8 scale, sum of x over the group, out), and the bias last. */
#define Q_ROWS 6 /* rows of x sharing each weight vector (more spills registers) */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define Q4_VNNI 1
#endif
#ifdef __AVX512F__
/* out[r] (64 floats, rows 64 apart) += t[r] scale + (zero - 8 scale) xsum[r], for one group;
   t = acc (fp32 path) or acc sx[r] (int16 path: acc holds integer sums). */
static inline __attribute__((always_inline)) void q4_finish(const uint16_t *s, __m512 (*acc)[4], const float *sx,
                                                            const float *xsum, float *out, const int R) {
    for (int i = 0; i < 4; i++) {
        __m512i v = _mm512_loadu_si512(s + i * 32); /* 16 (scale, zero) bf16 pairs */
        __m512 sc = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
        __m512 zr = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xffff0000)));
        __m512 z8 = _mm512_fnmadd_ps(_mm512_set1_ps(8.f), sc, zr); /* zero - 8 scale */
        for (int r = 0; r < R; r++) {
            __m512 t = acc[r][i];
#ifdef Q4_VNNI
            t = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_castps_si512(t)), _mm512_set1_ps(sx[r]));
#endif
            __m512 o = _mm512_fmadd_ps(t, sc, _mm512_loadu_ps(out + r * 64 + i * 16));
            _mm512_storeu_ps(out + r * 64 + i * 16, _mm512_fmadd_ps(z8, _mm512_set1_ps(xsum[r]), o));
        }
    }
    (void)sx;
}
#endif

#ifdef Q4_VNNI
/* x[0 .. K) as int16 per group of g (xq) and the groups' scales (sx). */
static void q4_quantize_x(const float *x, int K, int g, int16_t *xq, float *sx) {
    for (int k0 = 0; k0 < K; k0 += g) {
        __m512 amax = _mm512_setzero_ps();
        for (int k = k0; k < k0 + g; k += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
        float a = _mm512_reduce_max_ps(amax), inv = a > 0 ? 32767.f / a : 0.f;
        sx[k0 / g] = a / 32767.f; /* a NaN or inf in x still reaches its outputs, by the sum of x */
        for (int k = k0; k < k0 + g; k += 16) {
            __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + k), _mm512_set1_ps(inv)));
            _mm256_storeu_si256((__m256i *)(xq + k), _mm512_cvtsepi32_epi16(v));
        }
    }
}

/* acc + the sums of the two 16-bit products in each 32-bit lane. In asm: with the intrinsic, GCC copies
   the accumulators between registers around every instruction of these loops. */
static inline __attribute__((always_inline)) __m512i dpwssd(__m512i acc, __m512i w, __m512i x) {
    __asm__("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(w), "v"(x));
    return acc;
}

/* The nibbles of k and k + 1 of a 64-output block as 16-bit pairs (q[k] low, q[k + 1] high). */
static inline __attribute__((always_inline)) void q4_pairs(const uint8_t *wk, __m512i w[4]) {
    const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                        37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    __m512i a = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)wk));
    __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(wk + 32)));
    __m512i v0 = _mm512_permutex2var_epi16(a, lo, b), v1 = _mm512_permutex2var_epi16(a, hi, b);
    w[0] = _mm512_and_si512(v0, _mm512_set1_epi16(15));
    w[1] = _mm512_and_si512(v1, _mm512_set1_epi16(15));
    w[2] = _mm512_srli_epi16(v0, 4);
    w[3] = _mm512_srli_epi16(v1, 4);
}

/* One group (k0 .. k0 + g - 1) of one block for R rows; xp[r]: row r's x as int16 pairs from k0. */
static inline __attribute__((always_inline)) void q4_rows(const uint8_t *wb, const uint16_t *s, int k0, int g,
                                                          const int32_t **xp, const float *sx, const float *xsum,
                                                          float *out, const int R) {
    __m512i acc[Q_ROWS][4]; /* fixed size, not [R]: R is a constant at each call, so this stays in registers */
    for (int r = 0; r < R; r++)
        for (int i = 0; i < 4; i++) acc[r][i] = _mm512_setzero_si512();
    for (int p = 0; p < g / 2; p++) {
        _mm_prefetch((const char *)(wb + (k0 + 2 * p) * 32 + 2048), _MM_HINT_T0); /* 64 k ahead */
        __m512i w[4];
        q4_pairs(wb + (k0 + 2 * p) * 32, w);
        for (int r = 0; r < R; r++) {
            __m512i xv = _mm512_set1_epi32(xp[r][p]);
            for (int i = 0; i < 4; i++) acc[r][i] = dpwssd(acc[r][i], w[i], xv);
        }
    }
    __m512 f[Q_ROWS][4];
    for (int r = 0; r < R; r++)
        for (int i = 0; i < 4; i++) f[r][i] = _mm512_castsi512_ps(acc[r][i]);
    q4_finish(s, f, sx, xsum, out, R);
}
#elif defined(__AVX512F__)
/* The nibbles of one k of a 64-output block as floats 0..15 (a 16-entry table lookup: vpermps reads
   the low 4 bits of each index). */
static inline __attribute__((always_inline)) void q4_unpack(const uint8_t *wk, __m512 w[4]) {
    const __m512 tbl = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512i a = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)wk));
    __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(wk + 16)));
    w[0] = _mm512_permutexvar_ps(a, tbl);
    w[1] = _mm512_permutexvar_ps(b, tbl);
    w[2] = _mm512_permutexvar_ps(_mm512_srli_epi32(a, 4), tbl);
    w[3] = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), tbl);
}

/* One group of one block for R rows (xr[r]: row r of x), in fp32. */
static inline __attribute__((always_inline)) void q4_rows(const uint8_t *wb, const uint16_t *s, int k0, int g,
                                                          const float **xr, const float *xsum, float *out,
                                                          const int R) {
    __m512 acc[Q_ROWS][4];
    for (int r = 0; r < R; r++)
        for (int i = 0; i < 4; i++) acc[r][i] = _mm512_setzero_ps();
    for (int k = k0; k < k0 + g; k++) {
        _mm_prefetch((const char *)(wb + k * 32 + 2048), _MM_HINT_T0); /* 64 k ahead */
        __m512 w[4];
        q4_unpack(wb + k * 32, w);
        for (int r = 0; r < R; r++) {
            __m512 xk = _mm512_set1_ps(xr[r][k]);
            for (int i = 0; i < 4; i++) acc[r][i] = _mm512_fmadd_ps(w[i], xk, acc[r][i]);
        }
    }
    q4_finish(s, acc, NULL, xsum, out, R);
}
#endif

/* Row m's sums of x per group (xs) and, with VNNI, its int16 form (xq, sx: the row's own). */
static void q4_prep(const float *x, int m, int K, int g, float *xs, int16_t *xq, float *sx) {
    int G = K / g;
    for (int gi = 0; gi < G; gi++) {
        float s = 0;
        for (int k = gi * g; k < (gi + 1) * g; k++) s += x[(size_t)m * K + k];
        xs[m * G + gi] = s;
    }
#ifdef Q4_VNNI
    q4_quantize_x(x + (size_t)m * K, K, g, xq, sx + (size_t)m * G);
#else
    (void)xq, (void)sx;
#endif
}

void q4_gemm(const float *x, int M, int K, const uint8_t *packed, const uint16_t *sz, int g, int N, int Npad,
             const float *bias, float *y, long ldy, int accumulate) {
    int G = K / g, nblk = Npad / 64;
    if (M <= 0) return;
    float *xs = malloc(sizeof(float) * (size_t)M * G); /* per row and group: sums of x, for the zero term */
#ifdef Q4_VNNI
    float *sxs = malloc(sizeof(float) * (size_t)M * G);  /* per row and group: x's scale */
    int32_t *xq = malloc(sizeof(int16_t) * (size_t)M * K); /* x as int16 pairs */
#define Q4_PREP(m) q4_prep(x, m, K, g, xs, (int16_t *)(xq + (size_t)(m) * K / 2), sxs)
#else
#define Q4_PREP(m) q4_prep(x, m, K, g, xs, NULL, NULL)
#endif
    int split = M >= 8; /* the rows' sums (and int16 x) on the threads too */
    for (int m = 0; m < M && !split; m++) Q4_PREP(m);
#pragma omp parallel
    {
        if (split) {
#pragma omp for schedule(static)
            for (int m = 0; m < M; m++) Q4_PREP(m);
        }
#undef Q4_PREP
#ifndef __AVX512F__
        float *buf = malloc(sizeof(float) * 64 * g); /* a group's nibbles as floats, for all the rows */
#endif
#pragma omp for schedule(static)
        for (int blk = 0; blk < nblk; blk++) {
            const uint8_t *wb = packed + (size_t)blk * K * 32;
            for (int m0 = 0; m0 < M; m0 += Q_ROWS) {
                int R = M - m0 < Q_ROWS ? M - m0 : Q_ROWS;
                float out[Q_ROWS * 64] = {0}, xsum[Q_ROWS];
                const float *xr[Q_ROWS];
                for (int r = 0; r < R; r++) xr[r] = x + (size_t)(m0 + r) * K;
                (void)xr;
                for (int gi = 0; gi < G; gi++) {
                    const uint16_t *s = sz + ((size_t)gi * Npad + blk * 64) * 2;
                    int k0 = gi * g;
                    for (int r = 0; r < R; r++) xsum[r] = xs[(m0 + r) * G + gi];
#if defined(Q4_VNNI)
                    const int32_t *xp[Q_ROWS];
                    float sx[Q_ROWS];
                    for (int r = 0; r < R; r++) {
                        xp[r] = xq + ((size_t)(m0 + r) * K + k0) / 2;
                        sx[r] = sxs[(m0 + r) * G + gi];
                    }
#define Q4_CALL(R) q4_rows(wb, s, k0, g, xp, sx, xsum, out, R)
#elif defined(__AVX512F__)
#define Q4_CALL(R) q4_rows(wb, s, k0, g, xr, xsum, out, R)
#endif
#ifdef __AVX512F__
                    switch (R) {
                    case 1: Q4_CALL(1); break;
                    case 2: Q4_CALL(2); break;
                    case 3: Q4_CALL(3); break;
                    case 4: Q4_CALL(4); break;
                    case 5: Q4_CALL(5); break;
                    default: Q4_CALL(6);
                    }
#undef Q4_CALL
#else
                    for (int k = 0; k < g; k++) { /* the nibbles as floats, once for the R rows */
                        const uint8_t *wk = wb + (k0 + k) * 32;
                        for (int j = 0; j < 32; j++) {
                            buf[k * 64 + j] = (float)(wk[j] & 15);
                            buf[k * 64 + j + 32] = (float)(wk[j] >> 4);
                        }
                    }
                    for (int r = 0; r < R; r++) {
                        float acc[64] = {0};
                        for (int k = 0; k < g; k++) {
                            float xk = xr[r][k0 + k];
                            for (int j = 0; j < 64; j++) acc[j] += buf[k * 64 + j] * xk;
                        }
                        for (int j = 0; j < 64; j++) {
                            float sc = bf16_to_f32(s[2 * j]), zr = bf16_to_f32(s[2 * j + 1]);
                            out[r * 64 + j] += acc[j] * sc + (zr - 8.f * sc) * xsum[r];
                        }
                    }
#endif
                }
                for (int r = 0; r < R; r++) {
                    float *ym = y + (size_t)(m0 + r) * ldy;
                    for (int j = 0; j < 64 && blk * 64 + j < N; j++) {
                        int n = blk * 64 + j;
                        float v = out[r * 64 + j] + (bias ? bias[n] : 0.f);
                        ym[n] = accumulate ? ym[n] + v : v;
                    }
                }
            }
        }
#ifndef __AVX512F__
        free(buf);
#endif
    }
    free(xs);
#ifdef Q4_VNNI
    free(sxs);
    free(xq);
#endif
}

/* ---- int8 GEMM, row-major: q [N, K] int8, scales [N, K/g] fp32: w[n, k] = q[n, k] scale[n, k/g] ----
   (GGUF Q8_0 blocks have g = 32, Q6_K 16; per-channel int8 has g = K.)
   Every output, for every row of x, gets the same operations whatever M or the row's place: the weight
   w = q scale (rounded to fp32, as the dequantized reference), 16 lane sums acc[l] = fma(w[k], x[k],
   acc[l]) over k = l, l + 16, ... in order, then the lanes added in one fixed tree; the bias last.
   Threads take tiles of 4 outputs. Up to Q_ROWS rows convert the tile's weights in registers; more rows
   convert them once into a buffer of floats [4][K] and run over it Q_ROWS rows at a time. The plain C
   body (also taken when K or g is not a multiple of 16) does the same with a sequential lane sum. */
#ifdef __AVX512F__
static inline __attribute__((always_inline)) __m512 q8_load(const int8_t *q, float s) {
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q))),
                         _mm512_set1_ps(s));
}

/* out[i] = the sum of v[i]'s 16 lanes, the four at once (one fixed order of additions). */
static inline __attribute__((always_inline)) void q8_sum4(const __m512 v[4], float out[4]) {
    __m512 a = _mm512_add_ps(_mm512_shuffle_f32x4(v[0], v[1], 0x44), _mm512_shuffle_f32x4(v[0], v[1], 0xee));
    __m512 b = _mm512_add_ps(_mm512_shuffle_f32x4(v[2], v[3], 0x44), _mm512_shuffle_f32x4(v[2], v[3], 0xee));
    __m512 c = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xdd)); /* v[i]: 128-bit lane i */
    c = _mm512_add_ps(c, _mm512_permute_ps(c, 0x4e));
    c = _mm512_add_ps(c, _mm512_permute_ps(c, 0xb1));
    /* lanes 0, 4, 8, 12 -> out[0 .. 3] */
    _mm_storeu_ps(out, _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0,
                                                                                     0, 0, 0, 0, 0, 0), c)));
}

/* R rows of x against the 4 outputs of a tile, the weights converted in registers (WEIGHTS: from qr, sr)
   or read from buf [4][K] converted once for all rows. */
#define Q8_ROWS(name, WEIGHTS)                                                                                    \
    static inline __attribute__((always_inline)) void name(const int8_t **qr, const float **sr, const float *buf, \
                                                           int K, int g, const float **xr, float (*out)[4],       \
                                                           const int R) {                                         \
        __m512 acc[Q_ROWS][4];                                                                                    \
        for (int r = 0; r < R; r++)                                                                               \
            for (int i = 0; i < 4; i++) acc[r][i] = _mm512_setzero_ps();                                          \
        for (int k = 0; k < K; k += 16) {                                                                         \
            __m512 w[4];                                                                                          \
            for (int i = 0; i < 4; i++) WEIGHTS;                                                                  \
            for (int r = 0; r < R; r++) {                                                                         \
                __m512 xv = _mm512_loadu_ps(xr[r] + k);                                                           \
                for (int i = 0; i < 4; i++) acc[r][i] = _mm512_fmadd_ps(w[i], xv, acc[r][i]);                     \
            }                                                                                                     \
        }                                                                                                         \
        for (int r = 0; r < R; r++) q8_sum4(acc[r], out[r]);                                                      \
        (void)qr, (void)sr, (void)buf, (void)g;                                                                   \
    }
Q8_ROWS(q8_direct, (_mm_prefetch((const char *)(qr[i] + k + 16 * K), _MM_HINT_T0), /* 4 tiles ahead */
                    w[i] = q8_load(qr[i] + k, sr[i][k / g])))
Q8_ROWS(q8_buffered, w[i] = _mm512_load_ps(buf + (size_t)i * K + k))
#undef Q8_ROWS
#endif

void q8_gemm(const float *x, int M, int K, const int8_t *q, const float *scales, int g, int N,
             const float *bias, float *y, long ldy, int accumulate) {
    int G = K / g;
#ifdef __AVX512F__
    int vec = K % 16 == 0 && g % 16 == 0;
#else
    int vec = 0;
#endif
    if (M <= 0) return;
#pragma omp parallel
    {
        float *buf = aligned_alloc(64, sizeof(float) * 4 * ((K + 15) / 16 * 16));
#pragma omp for schedule(static)
        for (int n0 = 0; n0 < N; n0 += 4) {
            const int8_t *qr[4];
            const float *sr[4];
            for (int i = 0; i < 4; i++) { /* outputs past N repeat the last one and are not stored */
                int n = n0 + i < N ? n0 + i : N - 1;
                qr[i] = q + (size_t)n * K;
                sr[i] = scales + (size_t)n * G;
            }
            int direct = vec && M <= Q_ROWS;
            if (!direct) /* the tile's weights as floats, once for all rows */
                for (int i = 0; i < 4; i++) {
#ifdef __AVX512F__
                    if (vec) {
                        for (int k = 0; k < K; k += 16) {
                            if (k % 64 == 0) /* the next tile, while this one's rows run */
                                _mm_prefetch((const char *)(qr[i] + k + 4 * K), _MM_HINT_T0);
                            _mm512_store_ps(buf + (size_t)i * K + k, q8_load(qr[i] + k, sr[i][k / g]));
                        }
                        continue;
                    }
#endif
                    for (int k = 0; k < K; k++) buf[(size_t)i * K + k] = (float)qr[i][k] * sr[i][k / g];
                }
            for (int m0 = 0; m0 < M; m0 += Q_ROWS) {
                int R = M - m0 < Q_ROWS ? M - m0 : Q_ROWS;
                const float *xr[Q_ROWS];
                float out[Q_ROWS][4];
                for (int r = 0; r < R; r++) xr[r] = x + (size_t)(m0 + r) * K;
#ifdef __AVX512F__
                if (vec) {
#define Q8_CALL(R) direct ? q8_direct(qr, sr, buf, K, g, xr, out, R) : q8_buffered(qr, sr, buf, K, g, xr, out, R)
                    switch (R) {
                    case 1: Q8_CALL(1); break;
                    case 2: Q8_CALL(2); break;
                    case 3: Q8_CALL(3); break;
                    case 4: Q8_CALL(4); break;
                    case 5: Q8_CALL(5); break;
                    default: Q8_CALL(6);
                    }
#undef Q8_CALL
                } else
#endif
                {
                    for (int r = 0; r < R; r++)
                        for (int i = 0; i < 4; i++) {
                            const float *w = buf + (size_t)i * K;
                            float lane[16] = {0}, sum = 0;
                            for (int k0 = 0; k0 < K; k0 += 16)
                                for (int l = 0; l < 16 && k0 + l < K; l++) lane[l] += w[k0 + l] * xr[r][k0 + l];
                            for (int l = 0; l < 16; l++) sum += lane[l];
                            out[r][i] = sum;
                        }
                }
                for (int r = 0; r < R; r++)
                    for (int i = 0; i < 4 && n0 + i < N; i++) {
                        float v = out[r][i] + (bias ? bias[n0 + i] : 0.f);
                        float *dst = y + (size_t)(m0 + r) * ldy + n0 + i;
                        *dst = accumulate ? *dst + v : v;
                    }
            }
        }
        free(buf);
    }
}

/* ---- dense GEMM on nn.Linear's own weight: w [N, K] row-major, bf16 (bf16 = 1) or fp32 ----------
   y[m, n] (+)= sum_k x[m, k] w[n, k] + bias[n], rows of y `ldy` floats apart. bf16 -> fp32 is exact
   (a 16-bit shift) and an fp32 FMA of it with fp32 x rounds only the sum: the products are exact.
   Tiles of 4 weight rows (contiguous in w) by up to DENSE_ROWS rows of x (24 accumulators): each tile
   comes from memory once for all M rows. A row's dot product is the same sequence of
   operations wherever it falls (16 lanes each summing k = lane mod 16 in order, the tail of K masked
   into the same lanes, then the lanes reduced in one fixed tree, four outputs at once), so it does not
   depend on M or on its tile. */
#define DENSE_ROWS 6
#ifdef __AVX512F__
static inline __attribute__((always_inline)) __m512 dense_w(const void *w, size_t off, const int bf16) {
    if (bf16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)w + off))), 16));
    return _mm512_loadu_ps((const float *)w + off);
}

/* out[r][i] = row r of x . weight row i, for R rows; pf: prefetch the weights 8 rows ahead (the tile's
   first rows of x: the tile then comes from L1 for the others, where prefetches only take load slots). */
static inline __attribute__((always_inline)) void dense_tile(const void *const *wr, int K, const float *const *xr,
                                                             float (*out)[4], const int bf16, const int R,
                                                             const int pf) {
    __m512 acc[DENSE_ROWS][4]; /* fixed size, not [R]: R is a constant at each call, so this stays in registers */
    for (int r = 0; r < R; r++)
        for (int i = 0; i < 4; i++) acc[r][i] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512 wv[4];
        for (int i = 0; i < 4; i++) {
            if (pf) _mm_prefetch((const char *)wr[i] + ((size_t)k + 8 * (size_t)K) * (bf16 ? 2 : 4), _MM_HINT_T0);
            wv[i] = dense_w(wr[i], k, bf16);
        }
        for (int r = 0; r < R; r++) {
            __m512 xv = _mm512_loadu_ps(xr[r] + k);
            for (int i = 0; i < 4; i++) acc[r][i] = _mm512_fmadd_ps(wv[i], xv, acc[r][i]);
        }
    }
    if (k < K) { /* the last K % 16: zeros in the lanes past K */
        int t = K - k;
        __mmask16 mask = (__mmask16)((1u << t) - 1);
        __m512 wv[4];
        for (int i = 0; i < 4; i++) {
            if (bf16) {
                uint16_t tmp[16] = {0};
                memcpy(tmp, (const uint16_t *)wr[i] + k, sizeof(uint16_t) * t);
                wv[i] = dense_w(tmp, 0, 1);
            } else {
                wv[i] = _mm512_maskz_loadu_ps(mask, (const float *)wr[i] + k);
            }
        }
        for (int r = 0; r < R; r++) {
            __m512 xv = _mm512_maskz_loadu_ps(mask, xr[r] + k);
            for (int i = 0; i < 4; i++) acc[r][i] = _mm512_fmadd_ps(wv[i], xv, acc[r][i]);
        }
    }
    for (int r = 0; r < R; r++) q8_sum4(acc[r], out[r]); /* the tree of _mm512_reduce_add_ps, 4 at once */
}

/* R rows against one tile. */
static void dense_rows(const void *const *wr, int K, const float *const *xr, float (*out)[4], int bf16, int pf,
                       int R) {
#define DENSE_R(B, P)                                                                                             \
    switch (R) {                                                                                                  \
    case 1: dense_tile(wr, K, xr, out, B, 1, P); break;                                                           \
    case 2: dense_tile(wr, K, xr, out, B, 2, P); break;                                                           \
    case 3: dense_tile(wr, K, xr, out, B, 3, P); break;                                                           \
    case 4: dense_tile(wr, K, xr, out, B, 4, P); break;                                                           \
    case 5: dense_tile(wr, K, xr, out, B, 5, P); break;                                                           \
    default: dense_tile(wr, K, xr, out, B, 6, P);                                                                 \
    }
    if (bf16 && pf) {
        DENSE_R(1, 1)
    } else if (bf16) {
        DENSE_R(1, 0)
    } else if (pf) {
        DENSE_R(0, 1)
    } else {
        DENSE_R(0, 0)
    }
#undef DENSE_R
}
#else
/* The plain C body: the same lane structure, in a form -O3 vectorises for whatever the CPU has. */
static void dense_rows(const void *const *wr, int K, const float *const *xr, float (*out)[4], int bf16, int pf,
                       int R) {
    (void)pf;
    for (int r = 0; r < R; r++)
        for (int i = 0; i < 4; i++) {
            float acc[16] = {0};
            const uint16_t *wh = wr[i];
            const float *wf = wr[i], *x = xr[r];
            for (int k0 = 0; k0 < K; k0 += 16) {
                int t = K - k0 < 16 ? K - k0 : 16;
                if (bf16)
                    for (int j = 0; j < t; j++) acc[j] += bf16_to_f32(wh[k0 + j]) * x[k0 + j];
                else
                    for (int j = 0; j < t; j++) acc[j] += wf[k0 + j] * x[k0 + j];
            }
            float s = 0;
            for (int j = 0; j < 16; j++) s += acc[j];
            out[r][i] = s;
        }
}
#endif

void dense_gemm(const float *x, int M, int K, const void *w, int bf16, int N, const float *bias, float *y, long ldy,
                int accumulate) {
    size_t el = bf16 ? 2 : 4;
#pragma omp parallel for schedule(static)
    for (int n0 = 0; n0 < N; n0 += 4) {
        const void *wr[4];
        for (int i = 0; i < 4; i++) /* rows past N repeat the last one and are not stored */
            wr[i] = (const char *)w + (size_t)(n0 + i < N ? n0 + i : N - 1) * K * el;
        for (int m0 = 0; m0 < M; m0 += DENSE_ROWS) {
            int R = M - m0 < DENSE_ROWS ? M - m0 : DENSE_ROWS;
            float out[DENSE_ROWS][4];
            const float *xr[DENSE_ROWS];
            for (int r = 0; r < R; r++) xr[r] = x + (size_t)(m0 + r) * K;
            dense_rows(wr, K, xr, out, bf16, m0 == 0, R);
            for (int r = 0; r < R; r++) {
                float *ym = y + (size_t)(m0 + r) * ldy;
#ifdef __AVX512F__
                if (n0 + 4 <= N) { /* the same operations as below, four at once */
                    __m128 v = _mm_add_ps(_mm_loadu_ps(out[r]), bias ? _mm_loadu_ps(bias + n0) : _mm_setzero_ps());
                    _mm_storeu_ps(ym + n0, accumulate ? _mm_add_ps(_mm_loadu_ps(ym + n0), v) : v);
                    continue;
                }
#endif
                for (int i = 0; i < 4 && n0 + i < N; i++) {
                    float v = out[r][i] + (bias ? bias[n0 + i] : 0.f);
                    ym[n0 + i] = accumulate ? ym[n0 + i] + v : v;
                }
            }
        }
    }
}

/* ---- RMSNorm: out[r] = w * x[r] / sqrt(mean(x[r]^2) + eps); rows `stride` floats apart ----------- */
void rms_norm(const float *x, float *out, int rows, int D, long x_stride, long out_stride, const float *w,
              float eps) {
    for (int r = 0; r < rows; r++) {
        const float *xr = x + r * x_stride;
        float *o = out + r * out_stride;
        float ss = 0;
#pragma omp simd reduction(+ : ss)
        for (int i = 0; i < D; i++) ss += xr[i] * xr[i];
        float inv = 1.f / sqrtf(ss / D + eps);
#pragma omp simd
        for (int i = 0; i < D; i++) o[i] = w[i] * (xr[i] * inv);
    }
}

/* ---- rotary embedding (Hugging Face rotate-half) on `heads` vectors of size D per row, in place.
   cos, sin: [M, D]. Row m's heads start at qk + m * row_stride. */
void rope(float *qk, int M, int heads, int D, long row_stride, const float *cos, const float *sin) {
    int half = D / 2;
    for (int m = 0; m < M; m++)
        for (int h = 0; h < heads; h++) {
            float *v = qk + m * row_stride + (long)h * D;
            const float *c = cos + (long)m * D, *s = sin + (long)m * D;
#pragma omp simd
            for (int i = 0; i < half; i++) {
                float a = v[i], b = v[i + half];
                v[i] = a * c[i] - b * s[i];
                v[i + half] = b * c[i + half] + a * s[i + half];
            }
        }
}

/* ---- K/V cache element types (`dtype` below): 0 fp32, 1 bf16 (rounded to nearest even), 2 int8 with
   one fp32 scale per (head, position): symmetric absmax over the D values, q = rint(x * (127 / amax)),
   scale = amax / 127, x ~ q * scale (all zero when amax is 0). fast/cache.py `quantize_kv` writes the
   same bytes. A vector's scale sits at index (its element offset) / D of the scales array, so the
   scales take the values' strides divided by D. */
#define KV_F32 0
#define KV_BF16 1
#define KV_INT8 2

static inline float kv_quantize(const float *x, int8_t *q, int D) {
    float amax = 0;
    for (int i = 0; i < D; i++) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
    float inv = amax > 0 ? 127.f / amax : 0.f;
#ifdef __AVX512F__
    if (D % 16 == 0) {
        for (int i = 0; i < D; i += 16) /* cvtps rounds to nearest even, as rintf and torch.round */
            _mm_storeu_si128((__m128i *)(q + i),
                             _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + i),
                                                                                   _mm512_set1_ps(inv)))));
        return amax / 127.f;
    }
#endif
    for (int i = 0; i < D; i++) q[i] = (int8_t)rintf(x[i] * inv);
    return amax / 127.f;
}

/* ---- K/V store: row m's k and v (Hkv heads of D, at qkv + m * row_stride + k_off / v_off) go to
   position pos[m] of its cache; kb[m], vb[m] point at head 0, position 0 (ks[m], vs[m] at their
   scales, int8 only); heads `head_stride[m]` elements apart. */
void kv_store(const float *qkv, int M, long row_stride, long k_off, long v_off, int Hkv, int D,
              void **kb, void **vb, float **ks, float **vs, const int *pos, const long *head_stride, int dtype) {
    for (int m = 0; m < M; m++) {
        if (!kb[m]) continue;
        for (int h = 0; h < Hkv; h++) {
            const float *k = qkv + m * row_stride + k_off + (long)h * D;
            const float *v = qkv + m * row_stride + v_off + (long)h * D;
            long at = h * head_stride[m] + (long)pos[m] * D;
            if (dtype == KV_INT8) {
                ks[m][at / D] = kv_quantize(k, (int8_t *)kb[m] + at, D);
                vs[m][at / D] = kv_quantize(v, (int8_t *)vb[m] + at, D);
                continue;
            }
            for (int i = 0; i < D; i++) {
                if (dtype == KV_BF16) {
                    ((uint16_t *)kb[m])[at + i] = f32_to_bf16(k[i]);
                    ((uint16_t *)vb[m])[at + i] = f32_to_bf16(v[i]);
                } else {
                    ((float *)kb[m])[at + i] = k[i];
                    ((float *)vb[m])[at + i] = v[i];
                }
            }
        }
    }
}

/* A cached K or V vector as fp32 (int8: times its scale). */
static inline void load_kv(float *dst, const void *src, int D, int dtype, float scale) {
#ifdef __AVX512F__
    if (dtype == KV_BF16 && D % 16 == 0) {
        for (int i = 0; i < D; i += 16) {
            __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)src + i));
            _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
        }
        return;
    }
    if (dtype == KV_INT8 && D % 16 == 0) {
        for (int i = 0; i < D; i += 16) {
            __m512i q = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)((const int8_t *)src + i)));
            _mm512_storeu_ps(dst + i, _mm512_mul_ps(_mm512_cvtepi32_ps(q), _mm512_set1_ps(scale)));
        }
        return;
    }
#endif
    if (dtype == KV_BF16) {
        const uint16_t *h = src;
        for (int i = 0; i < D; i++) dst[i] = bf16_to_f32(h[i]);
    } else if (dtype == KV_INT8) {
        const int8_t *q = src;
        for (int i = 0; i < D; i++) dst[i] = (float)q[i] * scale;
    } else {
        memcpy(dst, src, sizeof(float) * D);
    }
}

static inline size_t kv_size(int dtype) { return dtype == KV_F32 ? 4 : dtype == KV_BF16 ? 2 : 1; }

#ifdef __AVX512F__
/* e^x for x >= -88: 2^k e^r, k = round(x log2 e), |r| <= ln2/2, e^r by a degree-6 Taylor polynomial
   (rel. err ~2e-7) */
static inline __attribute__((always_inline)) __m512 exp512(__m512 x) {
    __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.69314718f), x);
    __m512 p = _mm512_set1_ps(1.f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, k);
}
#endif

#ifdef __AVX512F__
static inline __mmask16 first_lanes(int n) { return (__mmask16)(n >= 16 ? 0xffff : (1u << n) - 1); }
#endif

/* The largest of s[0 .. n) (NaNs passed over; -inf when n is 0). */
static inline float max_of(const float *s, int n) {
    float mx = -INFINITY;
    int i = 0;
#ifdef __AVX512F__
    __m512 v = _mm512_set1_ps(-INFINITY), w = v; /* two chains; max_ps(x, v) is v where x is NaN */
    for (; i + 32 <= n; i += 32) {
        v = _mm512_max_ps(_mm512_loadu_ps(s + i), v);
        w = _mm512_max_ps(_mm512_loadu_ps(s + i + 16), w);
    }
    for (; i < n; i += 16)
        v = _mm512_max_ps(_mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), first_lanes(n - i), s + i), v);
    mx = _mm512_reduce_max_ps(_mm512_max_ps(v, w));
#endif
    for (; i < n; i++) mx = s[i] > mx ? s[i] : mx;
    return mx;
}

#ifdef __AVX512F__
/* exp(s[i] - mx) of 16 scores, clamped below at exp(-88) (the softmax numerators) */
static inline __attribute__((always_inline)) __m512 exp_less(__m512 s, float mx) {
    return exp512(_mm512_max_ps(_mm512_sub_ps(s, _mm512_set1_ps(mx)), _mm512_set1_ps(-88.f)));
}
#endif

/* s[i] = exp(s[i] - mx), returning the sum (softmax numerators); with AVX-512 the last n % 16 in masked
   lanes of the same vectors. */
static inline float exp_sum(float *s, int n, float mx) {
    float sum = 0;
    int i = 0;
#ifdef __AVX512F__
    __m512 vsum = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        __m512 e = exp_less(_mm512_loadu_ps(s + i), mx);
        _mm512_storeu_ps(s + i, e);
        vsum = _mm512_add_ps(vsum, e);
    }
    if (i < n) {
        __mmask16 m = first_lanes(n - i);
        __m512 e = _mm512_maskz_mov_ps(m, exp_less(_mm512_maskz_loadu_ps(m, s + i), mx));
        _mm512_mask_storeu_ps(s + i, m, e);
        vsum = _mm512_add_ps(vsum, e);
        i = n;
    }
    sum = _mm512_reduce_add_ps(vsum);
#endif
    for (; i < n; i++) {
        s[i] = expf(s[i] - mx);
        sum += s[i];
    }
    return sum;
}

/* ---- decode attention: one query per row over its cache (positions 0 .. len[m] - 1, already
   holding this token's k and v). q at q + m * q_stride (Hq heads of D), out [M, Hq * D]; scale[m]
   multiplies the scores (1/sqrt(D), times LogN).

   A task is one kv head, one chunk of ATT_CHUNK positions and up to ATT_ROWS rows of one cache (rows
   whose K/V pointers are the same: consecutive tokens of one sequence, as a prompt given as rows of the
   step is; more rows of one cache are cut into groups of equal size). It converts its keys and values
   to fp32 once, ATT_BLOCK positions at a time, for all its queries: its rows' query heads (the heads h
   with h / (Hq / Hkv) = the kv head), ATT_Q at a time in the micro-kernels (att_scores_k, att_values_k),
   so each key or value vector loaded serves ATT_Q queries (bf16 values, and int8 ones of a task with at
   most 2 passes of ATT_Q queries, are converted by each pass as it uses them instead). Long caches have
   several chunks, merged by their softmax maxima and sums (as flash-decoding does). Threads take the
   tasks largest first, each the next one when it is free; with several threads, a group's chunk holding
   under half the work of its first (the last, mostly) goes in two tasks of half its rows, and a short
   run of many rows in more groups, so that the threads finish together.
   Per row, query head and chunk the operations are fixed by the row's own length, whatever the other
   rows and queries beside it and the thread count (batch invariance; a prompt's rows then write the K/V
   that token-by-token decoding writes):
   - score[t] = (sum over d = 0 .. D - 1, in order, of fma(q[d], k[t][d])) * scale: keys are held
     transposed, 16 positions to a vector, so 16 scores build up in one register (no lane reduction);
     a query computed with others may get scores past its length too, which nothing reads;
   - the chunk's maximum, e = exp(score - max) and their sum (exp_sum);
   - out[i] = sum over t in order of fma(e[t], v[t][i]) (from 0), the sum and maximum kept beside it;
     queries taken together share the positions all of them have, then each goes on alone;
   then per row the chunks are merged in chunk order and divided by the total sum.
   A bf16 cache with D a multiple of 64, in a build for AVX512-BF16 (att_pairs), takes bf16 dot products
   (vdpbf16ps: 32 products of bf16 pairs an instruction, summed in fp32, where an fp32 FMA does 16):
   - q is rounded to bf16 (to nearest even) once per task, and score[t] = (sum over d = 0, 2, .. in order
     of vdpbf16ps(q[d], q[d + 1] | k[t][d], k[t][d + 1])) * scale, the keys' 32-bit words as transposed
     (each is a pair), with no conversion to fp32;
   - the chunk's maximum, e and their sum in fp32 as above, then e rounded to bf16 (to nearest even);
   - out[i] = sum over pairs t, t + 1 (t = 0, 2, .. in order; an odd last t with a zero) of
     vdpbf16ps(e[t], e[t + 1] | v[t][i], v[t + 1][i]): the positions queries take together end at an even
     one, so a query's pairs are its own whatever the others;
   so only q and e are rounded to 8 significant bits (K and V are bf16 already; products and sums are
   fp32): the scores move by at most 2^-8 sum_d |q[d] k[t][d]| scale, the weights by 2^-8 more
   (tests/test_row_prefill.py holds it to that bound and to this arithmetic; on the default model the
   logits' mean KL against the fp32 kernel is 1e-5 to 2e-4 nats, under the int8 cache's, see
   docs/fast-cpu.md). fp32 and int8 caches, and builds without AVX512-BF16, compute as above. */
#define ATT_CHUNK 256
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define ATT_PAIRS 1 /* bf16 dot products (vdpbf16ps) built */
#endif

/* Whether attend takes bf16 pairs (vdpbf16ps) for a cache of `dtype` and heads of D. */
static inline int att_pairs(int dtype, int D) {
#ifdef ATT_PAIRS
    return dtype == KV_BF16 && D % 64 == 0;
#else
    (void)dtype, (void)D;
    return 0;
#endif
}
#define ATT_BLOCK 64 /* positions converted at once (a multiple of 16, at most 64: att_scores takes 4 x 16) */
#define ATT_ROWS 32  /* rows of one cache per task at most */

/* Element d of cached vector `src` (t-th of a head, int8 times its scale) as fp32. */
static inline float kv_elem(const void *src, size_t i, int dtype, float scale) {
    if (dtype == KV_BF16) return bf16_to_f32(((const uint16_t *)src)[i]);
    if (dtype == KV_INT8) return (float)((const int8_t *)src)[i] * scale;
    return ((const float *)src)[i];
}

#ifdef __AVX512F__
/* 16 elements of a cached vector as fp32 (what load_kv makes of them). */
static inline __attribute__((always_inline)) __m512 kv_load16(const char *src, int dtype, float scale) {
    if (dtype == KV_BF16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)src)), 16));
    if (dtype == KV_INT8)
        return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)src))),
                             _mm512_set1_ps(scale));
    return _mm512_loadu_ps((const float *)src);
}

/* r[i] <- column i of the 16 x 16 matrix whose rows are r[0 .. 15]. */
static inline __attribute__((always_inline)) void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xee);
        r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xee);
    }
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 4; j++) {
            t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
            t[8 * i + 4 + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0xdd);
        }
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
        r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd);
    }
}
#endif

#ifdef __AVX512F__
/* att_keys for one block of 16 positions (nl of them: zeros after), 64 bytes of each key at a time (16, 32
   or 64 elements) as 32-bit words: 16 x 16 words transposed, then bf16 and int8 words unpacked into 2 or 4
   fp32 elements each (int8 ones times the positions' scales, scv): half or a quarter of the shuffles of
   transposing them as fp32, the same values. */
static inline __attribute__((always_inline)) void att_key_words(float *kt, const char *src, int nl, int D,
                                                                const int dtype, __m512 scv, const int full,
                                                                const int pairs) {
    const int el = dtype == KV_F32 ? 4 : dtype == KV_BF16 ? 2 : 1, per = 4 / el; /* elements a word */
    for (int j = 0; j < D; j += 16 * per) {
        __m512 r[16];
        for (int l = 0; l < 16; l++)
            r[l] = full || l < nl ? _mm512_loadu_ps(src + ((size_t)l * D + j) * el) : _mm512_setzero_ps();
        transpose16(r); /* r[w]: word w of the 16 keys (elements j + per w ..) */
        for (int w = 0; w < 16; w++) {
            __m512i x = _mm512_castps_si512(r[w]);
            float *o = kt + ((size_t)j + per * w) * 16;
            if (pairs) { /* bf16 words as they are, word w of block b at kt[(b D / 2 + w) 16 ..] */
                _mm512_store_ps(kt + ((size_t)j / 2 + w) * 16, r[w]);
            } else if (dtype == KV_F32) {
                _mm512_store_ps(o, r[w]);
            } else if (dtype == KV_BF16) {
                _mm512_store_ps(o, _mm512_castsi512_ps(_mm512_slli_epi32(x, 16)));
                _mm512_store_ps(o + 16, _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32((int)0xffff0000))));
            } else {
                __m512i b0 = _mm512_slli_epi32(x, 24), b1 = _mm512_slli_epi32(x, 16), b2 = _mm512_slli_epi32(x, 8);
                _mm512_store_ps(o, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(b0, 24)), scv));
                _mm512_store_ps(o + 16, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(b1, 24)), scv));
                _mm512_store_ps(o + 32, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(b2, 24)), scv));
                _mm512_store_ps(o + 48, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(x, 24)), scv));
            }
        }
    }
}
#endif

/* Keys 0 .. n - 1 from `src` (one head's, D elements apart; sc: their int8 scales) as fp32 in kt,
   transposed per 16 positions: kt[(b D + d) 16 + l] = key 16 b + l, element d (0 past n). With `pairs`
   (bf16 keys, att_pairs) as bf16 pairs instead, 32-bit word w = elements 2 w, 2 w + 1 (the low half
   first): kt[(b D / 2 + w) 16 + l]. */
static void att_keys(float *kt, const char *src, int n, int D, int dtype, const float *sc, int pairs) {
    for (int b = 0; b * 16 < n; b++) {
#ifdef __AVX512F__
        if (D * kv_size(dtype) % 64 == 0) {
            int nl = n - b * 16 < 16 ? n - b * 16 : 16;
            float *o = kt + (size_t)b * D * 16;
            const char *s = src + (size_t)b * 16 * D * kv_size(dtype);
            __m512 z = _mm512_setzero_ps();
            if (pairs && nl == 16) att_key_words(kt + (size_t)b * D * 8, s, nl, D, KV_BF16, z, 1, 1);
            else if (pairs) att_key_words(kt + (size_t)b * D * 8, s, nl, D, KV_BF16, z, 0, 1);
            else if (dtype == KV_F32 && nl == 16) att_key_words(o, s, nl, D, KV_F32, z, 1, 0);
            else if (dtype == KV_F32) att_key_words(o, s, nl, D, KV_F32, z, 0, 0);
            else if (dtype == KV_BF16 && nl == 16) att_key_words(o, s, nl, D, KV_BF16, z, 1, 0);
            else if (dtype == KV_BF16) att_key_words(o, s, nl, D, KV_BF16, z, 0, 0);
            else {
                __m512 scv = _mm512_maskz_loadu_ps(first_lanes(nl), sc + b * 16);
                if (nl == 16) att_key_words(o, s, nl, D, KV_INT8, scv, 1, 0);
                else att_key_words(o, s, nl, D, KV_INT8, scv, 0, 0);
            }
            continue;
        }
        if (D % 16 == 0) {
            size_t el = kv_size(dtype);
            for (int j = 0; j < D; j += 16) {
                __m512 r[16];
                for (int l = 0; l < 16; l++) {
                    int t = b * 16 + l;
                    r[l] = t < n ? kv_load16(src + ((size_t)t * D + j) * el, dtype, sc ? sc[t] : 1.f)
                                 : _mm512_setzero_ps();
                }
                transpose16(r);
                for (int i = 0; i < 16; i++) _mm512_store_ps(kt + ((size_t)b * D + j + i) * 16, r[i]);
            }
            continue;
        }
#endif
        for (int d = 0; d < D; d++)
            for (int l = 0; l < 16; l++) {
                int t = b * 16 + l;
                kt[((size_t)b * D + d) * 16 + l] = t < n ? kv_elem(src, (size_t)t * D + d, dtype, sc ? sc[t] : 1.f) : 0.f;
            }
    }
}

#define ATT_Q 6 /* queries (row and query head pairs) sharing each key or value vector loaded */

#ifdef __AVX512F__
/* s[i][16 b + l] = score of key 16 b + l for query q[i] times scale[i], for R queries and KB blocks of
   16 keys (R x KB accumulators; each query's sum runs over d in order whatever R and KB). */
static inline __attribute__((always_inline)) void att_scores_k(const float *kt, int D, const float *const *q,
                                                               float *const *s, const float *scale, const int R,
                                                               const int KB) {
    __m512 acc[ATT_Q][4];
    for (int i = 0; i < R; i++)
        for (int b = 0; b < KB; b++) acc[i][b] = _mm512_setzero_ps();
    for (int d = 0; d < D; d++) {
        __m512 kv[4];
        for (int b = 0; b < KB; b++) kv[b] = _mm512_load_ps(kt + ((size_t)b * D + d) * 16);
        for (int i = 0; i < R; i++) {
            __m512 qd = _mm512_set1_ps(q[i][d]);
            for (int b = 0; b < KB; b++) acc[i][b] = _mm512_fmadd_ps(qd, kv[b], acc[i][b]);
        }
    }
    for (int i = 0; i < R; i++)
        for (int b = 0; b < KB; b++)
            _mm512_storeu_ps(s[i] + b * 16, _mm512_mul_ps(acc[i][b], _mm512_set1_ps(scale[i])));
}

/* o[i][0 .. 16 DV) += sum over t0 <= t < t1 of e[i][t] v[t][0 .. 16 DV), for R queries (v: cached vectors
   of `dtype`, D elements apart, vsc their int8 scales). */
static inline __attribute__((always_inline)) void att_values_k(const char *v, int D, int t0, int t1,
                                                               const float *const *e, float *const *o, const int R,
                                                               const int DV, const int dtype, const float *vsc) {
    __m512 acc[ATT_Q][4];
    for (int i = 0; i < R; i++)
        for (int j = 0; j < DV; j++) acc[i][j] = _mm512_loadu_ps(o[i] + 16 * j);
    for (int t = t0; t < t1; t++) {
        __m512 vv[4];
        for (int j = 0; j < DV; j++)
            vv[j] = kv_load16(v + ((size_t)t * D + 16 * j) * kv_size(dtype), dtype, dtype == KV_INT8 ? vsc[t] : 1.f);
        for (int i = 0; i < R; i++) {
            __m512 p = _mm512_set1_ps(e[i][t]);
            for (int j = 0; j < DV; j++) acc[i][j] = _mm512_fmadd_ps(p, vv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < R; i++)
        for (int j = 0; j < DV; j++) _mm512_storeu_ps(o[i] + 16 * j, acc[i][j]);
}

#ifdef ATT_PAIRS
/* att_scores_k on bf16 pairs: s[i][16 b + l] = sum over words w in order of vdpbf16ps(q[i] word w, key
   word w) (q[i]: the query's D / 2 words of bf16 pairs, kt: att_keys' pairs), times scale[i]. */
static inline __attribute__((always_inline)) void att_scores_pk(const float *kt, int D, const uint32_t *const *q,
                                                                float *const *s, const float *scale, const int R,
                                                                const int KB) {
    __m512 acc[ATT_Q][4];
    for (int i = 0; i < R; i++)
        for (int b = 0; b < KB; b++) acc[i][b] = _mm512_setzero_ps();
    for (int w = 0; w < D / 2; w++) {
        __m512bh kv[4];
        for (int b = 0; b < KB; b++) kv[b] = (__m512bh)_mm512_load_si512(kt + ((size_t)b * D / 2 + w) * 16);
        for (int i = 0; i < R; i++) {
            __m512bh qw = (__m512bh)_mm512_set1_epi32((int)q[i][w]);
            for (int b = 0; b < KB; b++) acc[i][b] = _mm512_dpbf16_ps(acc[i][b], qw, kv[b]);
        }
    }
    for (int i = 0; i < R; i++)
        for (int b = 0; b < KB; b++)
            _mm512_storeu_ps(s[i] + b * 16, _mm512_mul_ps(acc[i][b], _mm512_set1_ps(scale[i])));
}

/* att_values_k on bf16 pairs, 64 elements of bf16 vectors: o[i][0 .. 64) += per pair of positions t, t + 1
   (t = t0, t0 + 2, .. below t1; past t1 a zero vector) vdpbf16ps(e[i] word t / 2 (bf16 e[t], e[t + 1]),
   v[t] and v[t + 1] interleaved). o is in pair order: per 32 elements, vpunpck{l,h}wd of the two rows puts
   elements 8 k + i (k = 0 .. 3, i < 4) in lane 4 k + i of the low vector and elements 8 k + 4 + i in lane
   4 k + i of the high one, and o holds the low one's 16 sums, then the high one's (att_unpair undoes it). */
static inline __attribute__((always_inline)) void att_values_pk(const char *v, int D, int t0, int t1,
                                                                const uint32_t *const *e, float *const *o,
                                                                const int R) {
    __m512 acc[ATT_Q][4];
    for (int i = 0; i < R; i++)
        for (int j = 0; j < 4; j++) acc[i][j] = _mm512_loadu_ps(o[i] + 16 * j);
    for (int t = t0; t < t1; t += 2) {
        __m512bh vv[4];
        for (int c = 0; c < 2; c++) {
            const uint16_t *a = (const uint16_t *)v + (size_t)t * D + 32 * c;
            __m512i x = _mm512_loadu_si512(a), y = t + 1 < t1 ? _mm512_loadu_si512(a + D) : _mm512_setzero_si512();
            vv[2 * c] = (__m512bh)_mm512_unpacklo_epi16(x, y);
            vv[2 * c + 1] = (__m512bh)_mm512_unpackhi_epi16(x, y);
        }
        for (int i = 0; i < R; i++) {
            __m512bh p = (__m512bh)_mm512_set1_epi32((int)e[i][t / 2]);
            for (int j = 0; j < 4; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], p, vv[j]);
        }
    }
    for (int i = 0; i < R; i++)
        for (int j = 0; j < 4; j++) _mm512_storeu_ps(o[i] + 16 * j, acc[i][j]);
}

/* o[0 .. D) from att_values_pk's pair order back to element order (vpermt2ps per 32 elements). */
static void att_unpair(float *o, int D) {
    const __m512i o0 = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i o1 = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int j = 0; j < D; j += 32) {
        __m512 lo = _mm512_loadu_ps(o + j), hi = _mm512_loadu_ps(o + j + 16);
        _mm512_storeu_ps(o + j, _mm512_permutex2var_ps(lo, o0, hi));
        _mm512_storeu_ps(o + j + 16, _mm512_permutex2var_ps(lo, o1, hi));
    }
}

/* x[0 .. n) rounded to bf16 (to nearest even, vcvtneps2bf16) in h, then zeros up to a multiple of 16. */
static void att_to_bf16(uint16_t *h, const float *x, int n) {
    for (int i = 0; i < n; i += 16) {
        __m512 v = _mm512_maskz_loadu_ps(first_lanes(n - i), x + i);
        _mm256_storeu_si256((__m256i *)(h + i), (__m256i)_mm512_cvtneps_pbh(v));
    }
}
#endif

#define ATT_BY_R(R, CALL) /* CALL(r) with r = R as a constant, 1 <= R <= ATT_Q */                        \
    switch (R) {                                                                                          \
    case 1: CALL(1); break;                                                                               \
    case 2: CALL(2); break;                                                                               \
    case 3: CALL(3); break;                                                                               \
    case 4: CALL(4); break;                                                                               \
    case 5: CALL(5); break;                                                                               \
    default: CALL(6);                                                                                     \
    }
#define ATT_BY_4(N, CALL, R) /* CALL(R, n) with n = N as a constant, 1 <= N <= 4 */                      \
    switch (N) {                                                                                          \
    case 1: CALL(R, 1); break;                                                                            \
    case 2: CALL(R, 2); break;                                                                            \
    case 3: CALL(R, 3); break;                                                                            \
    default: CALL(R, 4);                                                                                  \
    }

/* The queries i .. i + r - 1 one micro-kernel pass takes (r, at most ATT_Q, is returned) and the most key
   blocks any of them has (kb). */
static inline int att_score_group(int nq, int i, const int *nkb, int *kb) {
    int r = nq - i < ATT_Q ? nq - i : ATT_Q;
    *kb = 0;
    for (int j = i; j < i + r; j++) *kb = nkb[j] > *kb ? nkb[j] : *kb;
    return r;
}

/* The queries i .. i + r - 1 one value pass takes (r is returned), their outputs from element j0 (oh) and
   the fewest positions any of them has (lo). */
static inline int att_value_group(int nq, int i, int j0, const int *n, float *const *o, float **oh, int *lo) {
    int r = nq - i < ATT_Q ? nq - i : ATT_Q; /* at least 1: i < nq */
    *lo = n[i];
    oh[0] = o[i] + j0;
    for (int j = 1; j < r; j++) {
        oh[j] = o[i + j] + j0;
        *lo = n[i + j] < *lo ? n[i + j] : *lo;
    }
    return r;
}
#endif

/* Scores of keys 0 .. 16 nkb[i] - 1 of kt for nq queries, times scale[i] (16 nkb[i] values written for
   query i, maybe more: up to 16 times the largest nkb of the ATT_Q queries it is computed with). */
static void att_scores(const float *kt, int D, int nq, const float *const *q, float *const *s, const float *scale,
                       const int *nkb) {
#ifdef __AVX512F__
    if (D % 16 == 0) {
        for (int i = 0; i < nq; i += ATT_Q) {
            int kb, r = att_score_group(nq, i, nkb, &kb);
#define ATT_S(R, KB) att_scores_k(kt, D, q + i, s + i, scale + i, R, KB)
#define ATT_S_R(R) ATT_BY_4(kb, ATT_S, R)
            ATT_BY_R(r, ATT_S_R)
#undef ATT_S_R
#undef ATT_S
        }
        return;
    }
#endif
    for (int i = 0; i < nq; i++)
        for (int b = 0; b < nkb[i]; b++) {
            float acc[16] = {0};
            for (int d = 0; d < D; d++)
                for (int l = 0; l < 16; l++) acc[l] += q[i][d] * kt[((size_t)b * D + d) * 16 + l];
            for (int l = 0; l < 16; l++) s[i][b * 16 + l] = acc[l] * scale[i];
        }
}

#ifdef ATT_PAIRS
/* att_scores on bf16 pairs (att_scores_pk): q[i] the queries' bf16 words, kt att_keys' pairs. */
static void att_scores_pairs(const float *kt, int D, int nq, const uint32_t *const *q, float *const *s,
                             const float *scale, const int *nkb) {
    for (int i = 0; i < nq; i += ATT_Q) {
        int kb, r = att_score_group(nq, i, nkb, &kb);
#define ATT_S(R, KB) att_scores_pk(kt, D, q + i, s + i, scale + i, R, KB)
#define ATT_S_R(R) ATT_BY_4(kb, ATT_S, R)
        ATT_BY_R(r, ATT_S_R)
#undef ATT_S_R
#undef ATT_S
    }
}

/* att_values on bf16 pairs (att_values_pk): o[i] += the pairs t, t + 1 below n[i] (t even) of e[i]'s words
   and the bf16 vectors v. The positions queries take together end at an even one, so that each query's
   pairs are the same whatever the others. */
static void att_values_pairs(const char *v, int D, int nq, const int *n, const uint32_t *const *e,
                             float *const *o) {
    for (int j0 = 0; j0 < D; j0 += 64) {
        const char *vj = v + (size_t)j0 * 2;
        for (int i = 0; i < nq; i += ATT_Q) {
            float *oh[ATT_Q];
            int lo, r = att_value_group(nq, i, j0, n, o, oh, &lo);
            lo &= ~1;
#define ATT_VP(R) att_values_pk(vj, D, 0, lo, e + i, oh, R)
            ATT_BY_R(r, ATT_VP)
#undef ATT_VP
            for (int j = 0; j < r; j++)
                if (n[i + j] > lo) att_values_pk(vj, D, lo, n[i + j], e + i + j, oh + j, 1);
        }
    }
}
#endif

/* o[i] += sum over t < n[i] of e[i][t] v[t] for nq queries; v: fp32 rows of D, or with AVX-512 and D a
   multiple of 64 cached bf16 or int8 vectors (vsc: int8 scales), converted as they are used. */
static void att_values(const char *v, int dtype, const float *vsc, int D, int nq, const int *n,
                       const float *const *e, float *const *o) {
#ifdef __AVX512F__
    if (D % 16 == 0) {
        for (int j0 = 0; j0 < D; j0 += 64) { /* 64 elements at a time */
            int dv = D - j0 >= 64 ? 4 : (D - j0) / 16;
            const char *vj = v + (size_t)j0 * kv_size(dtype);
            for (int i = 0; i < nq; i += ATT_Q) {
                float *oh[ATT_Q];
                int lo, r = att_value_group(nq, i, j0, n, o, oh, &lo);
                /* positions all r queries take together, then each query's own rest (same order) */
#define ATT_V(R, DV) att_values_k(vj, D, 0, lo, e + i, oh, R, DV, KV_F32, vsc)
#define ATT_V_R(R) ATT_BY_4(dv, ATT_V, R)
#define ATT_VB(R) att_values_k(vj, D, 0, lo, e + i, oh, R, 4, KV_BF16, vsc)
#define ATT_VI(R) att_values_k(vj, D, 0, lo, e + i, oh, R, 4, KV_INT8, vsc)
                if (dtype == KV_BF16) { ATT_BY_R(r, ATT_VB) } else if (dtype == KV_INT8) { ATT_BY_R(r, ATT_VI) }
                else { ATT_BY_R(r, ATT_V_R) }
#undef ATT_VI
#undef ATT_VB
#undef ATT_V_R
#undef ATT_V
                for (int j = 0; j < r; j++) {
                    int t0 = lo, t1 = n[i + j];
                    const float *const *ej = e + i + j;
                    if (t1 == lo) continue;
#define ATT_V1(R, DV) att_values_k(vj, D, t0, t1, ej, oh + j, R, DV, KV_F32, vsc)
                    if (dtype == KV_BF16) att_values_k(vj, D, t0, t1, ej, oh + j, 1, 4, KV_BF16, vsc);
                    else if (dtype == KV_INT8) att_values_k(vj, D, t0, t1, ej, oh + j, 1, 4, KV_INT8, vsc);
                    else { ATT_BY_4(dv, ATT_V1, 1) }
#undef ATT_V1
                }
            }
        }
        return;
    }
#endif
    for (int i = 0; i < nq; i++)
        for (int t = 0; t < n[i]; t++) {
            float p = e[i][t], *oh = o[i];
            const float *vt = (const float *)v + (size_t)t * D;
            for (int j = 0; j < D; j++) oh[j] += p * vt[j];
        }
}

typedef struct {
    int m0, rows, c, kvh; /* rows m0 .. m0 + rows - 1 of one cache, chunk c, kv head kvh */
    long cost;            /* its work, roughly: query heads x positions, plus converting the positions */
} AttTask;

static int att_larger(const void *a, const void *b) {
    long x = ((const AttTask *)a)->cost, y = ((const AttTask *)b)->cost;
    return x < y ? 1 : x > y ? -1 : 0;
}

/* A task's work for rows a .. b - 1 in chunk c, roughly: query heads x positions, plus the positions
   converted (0: none of its rows reach the chunk). */
static long att_cost(int a, int b, int c, const int *len, void **kb, int group) {
    long cost = 0, nmax = 0;
    for (int m = a; m < b; m++) {
        long n = len[m] - (long)c * ATT_CHUNK < ATT_CHUNK ? len[m] - (long)c * ATT_CHUNK : ATT_CHUNK;
        n = kb[m] && n > 0 ? n : 0;
        cost += n * group;
        nmax = n > nmax ? n : nmax;
    }
    return cost + 4 * nmax;
}

static int same_cache(int a, int b, void **kb, void **vb, float **ks, float **vs, const long *head_stride,
                      int dtype) {
    return kb[a] == kb[b] && vb[a] == vb[b] && head_stride[a] == head_stride[b] &&
           (dtype != KV_INT8 || (ks[a] == ks[b] && vs[a] == vs[b]));
}

void attend(const float *q, int M, int Hq, int Hkv, int D, long q_stride, void **kb, void **vb, float **ks,
            float **vs, const int *len, const long *head_stride, int dtype, const float *scale, float *out) {
    int group = Hq / Hkv;
    size_t el = kv_size(dtype);
    int *first = malloc(sizeof(int) * (M + 1)); /* row m's partial results: first[m] .. first[m + 1] - 1 */
    first[0] = 0;
    for (int m = 0; m < M; m++) {
        int chunks = kb[m] && len[m] > 0 ? (len[m] + ATT_CHUNK - 1) / ATT_CHUNK : 0;
        first[m + 1] = first[m] + chunks * Hkv;
    }
    AttTask *tasks = malloc(sizeof(AttTask) * (first[M] ? first[M] : 1));
    int ntasks = 0, threads = get_threads(), most = 1; /* most: rows of a task at most */
    for (int m0 = 0; m0 < M;) { /* a run of rows of one cache, in tasks per row group, chunk and kv head */
        int run = 1;
        while (m0 + run < M && kb[m0] && same_cache(m0, m0 + run, kb, vb, ks, vs, head_stride, dtype)) run++;
        /* groups of equal size, ATT_ROWS rows at most (each converts the keys and values once), more while
           the run's tasks are too few to keep the threads busy */
        int groups = (run + ATT_ROWS - 1) / ATT_ROWS, chunks = 0;
        for (int m = m0; m < m0 + run; m++) {
            int c = (first[m + 1] - first[m]) / Hkv;
            chunks = c > chunks ? c : chunks;
        }
        while (groups * chunks * Hkv < 2 * threads && run / (groups + 1) >= 8) groups++;
        for (int gi = 0; gi < groups; gi++) {
            int a = m0 + run * gi / groups, b = m0 + run * (gi + 1) / groups;
            long full = att_cost(a, b, 0, len, kb, group);
            for (int c = 0; c < chunks; c++) {
                /* a chunk (the last) with less than half the work of the first: in two tasks when there are
                   threads to share them (the smallest tasks go last and even out the threads' work) */
                int cut = threads > 1 && b - a >= 2 && 2 * att_cost(a, b, c, len, kb, group) < full ? (a + b) / 2 : b;
                for (int x = a; x < b; x = cut, cut = b) {
                    long cost = att_cost(x, cut, c, len, kb, group);
                    for (int h = 0; h < Hkv && cost; h++) tasks[ntasks++] = (AttTask){x, cut - x, c, h, cost};
                    most = cut - x > most ? cut - x : most;
                }
            }
        }
        m0 += run;
    }
    qsort(tasks, ntasks, sizeof(AttTask), att_larger); /* the largest first, each to the first free thread */
    size_t per = (size_t)group * (D + 2); /* per row, chunk and kv head: each query head's max, sum, D outputs */
    float *part = malloc(sizeof(float) * (first[M] ? first[M] : 1) * per);
    int pairs = att_pairs(dtype, D);
#pragma omp parallel
    {
        int nq = most * group; /* queries of a task at most: row r, query head g at r * group + g */
        /* pairs: the queries and the exp as bf16 (their 32-bit words: bf16 pairs), per query as s is */
        uint16_t *qb = pairs ? malloc(sizeof(uint16_t) * nq * D) : NULL;
        uint16_t *eb = pairs ? malloc(sizeof(uint16_t) * nq * ATT_CHUNK) : NULL;
        const uint32_t **wa = malloc(sizeof(uint32_t *) * nq);
        float *kt = aligned_alloc(64, sizeof(float) * ATT_BLOCK * D); /* keys, transposed */
        float *vf = aligned_alloc(64, sizeof(float) * ATT_BLOCK * D);
        float *s = malloc(sizeof(float) * nq * ATT_CHUNK); /* scores, then exp */
        float *sc = malloc(sizeof(float) * nq);
        int *nk = malloc(sizeof(int) * nq);
        /* per query with positions in the block: its query, scores (or exp), outputs, scale, positions */
        const float **qa = malloc(sizeof(float *) * nq);
        float **sa = malloc(sizeof(float *) * nq), **oa = malloc(sizeof(float *) * nq);
#pragma omp for schedule(dynamic, 1)
        for (int i = 0; i < ntasks; i++) {
            AttTask tk = tasks[i];
            int m0 = tk.m0, kvh = tk.kvh, t0 = tk.c * ATT_CHUNK, n[ATT_ROWS], nmax = 0;
            for (int r = 0; r < tk.rows; r++) {
                int m = m0 + r, e = len[m] < t0 + ATT_CHUNK ? len[m] : t0 + ATT_CHUNK;
                n[r] = kb[m] && e > t0 ? e - t0 : 0;
                nmax = n[r] > nmax ? n[r] : nmax;
            }
            const char *kh = (const char *)kb[m0] + ((size_t)kvh * head_stride[m0] + (size_t)t0 * D) * el;
            const char *vh = (const char *)vb[m0] + ((size_t)kvh * head_stride[m0] + (size_t)t0 * D) * el;
            /* int8: the scales of this head's positions (index = element offset / D) */
            const float *ksh = dtype == KV_INT8 ? ks[m0] + kvh * head_stride[m0] / D + t0 : NULL;
            const float *vsh = dtype == KV_INT8 ? vs[m0] + kvh * head_stride[m0] / D + t0 : NULL;
#ifdef ATT_PAIRS
            for (int r = 0; r < tk.rows && pairs; r++)
                for (int g = 0; g < group && n[r]; g++)
                    att_to_bf16(qb + (size_t)(r * group + g) * D,
                                q + (m0 + r) * q_stride + (long)(kvh * group + g) * D, D);
#endif
            for (int b0 = 0; b0 < nmax; b0 += ATT_BLOCK) {
                int nb = nmax - b0 < ATT_BLOCK ? nmax - b0 : ATT_BLOCK, na = 0;
                att_keys(kt, kh + (size_t)b0 * D * el, nb, D, dtype, ksh ? ksh + b0 : NULL, pairs);
                for (int r = 0; r < tk.rows; r++)
                    for (int g = 0; g < group && n[r] > b0; g++, na++) {
                        qa[na] = q + (m0 + r) * q_stride + (long)(kvh * group + g) * D;
                        wa[na] = (const uint32_t *)(qb + (size_t)(r * group + g) * D);
                        sa[na] = s + (size_t)(r * group + g) * ATT_CHUNK + b0;
                        sc[na] = scale[m0 + r];
                        nk[na] = ((n[r] - b0 < ATT_BLOCK ? n[r] - b0 : ATT_BLOCK) + 15) / 16;
                    }
#ifdef ATT_PAIRS
                if (pairs) att_scores_pairs(kt, D, na, wa, sa, sc, nk);
                else
#endif
                    att_scores(kt, D, na, qa, sa, sc, nk);
            }
            for (int r = 0; r < tk.rows; r++)
                for (int g = 0; g < group && n[r]; g++) {
                    float *sg = s + (size_t)(r * group + g) * ATT_CHUNK, mx = max_of(sg, n[r]);
                    float *pt = part + (size_t)(first[m0 + r] + tk.c * Hkv + kvh) * per + g * (D + 2);
                    pt[0] = mx;
                    pt[1] = exp_sum(sg, n[r], mx);
                    memset(pt + 2, 0, sizeof(float) * D);
#ifdef ATT_PAIRS
                    if (pairs) att_to_bf16(eb + (size_t)(r * group + g) * ATT_CHUNK, sg, n[r]);
#endif
                }
            /* the values as they are (an fp32 cache), or converted in each pass of ATT_Q queries that uses
               them (bf16: a shift; int8, a conversion and a multiply: up to 2 passes), rather than once into
               vf and loaded back (measured: the same for 19 rows of SmolLM2, 10-15% less for a decode row
               of 7 or 8 query heads) */
            int direct = dtype == KV_F32;
#ifdef __AVX512F__
            direct = direct || (D % 64 == 0 && (dtype == KV_BF16 || tk.rows * group <= 2 * ATT_Q));
#endif
            for (int b0 = 0; b0 < nmax; b0 += ATT_BLOCK) {
                int nb = nmax - b0 < ATT_BLOCK ? nmax - b0 : ATT_BLOCK, na = 0;
                for (int t = 0; t < nb && !direct; t++)
                    load_kv(vf + (size_t)t * D, vh + (size_t)(b0 + t) * D * el, D, dtype, vsh ? vsh[b0 + t] : 1.f);
                for (int r = 0; r < tk.rows; r++)
                    for (int g = 0; g < group && n[r] > b0; g++, na++) {
                        sa[na] = s + (size_t)(r * group + g) * ATT_CHUNK + b0;
                        oa[na] = part + (size_t)(first[m0 + r] + tk.c * Hkv + kvh) * per + g * (D + 2) + 2;
                        wa[na] = (const uint32_t *)(eb + (size_t)(r * group + g) * ATT_CHUNK + b0);
                        nk[na] = n[r] - b0 < ATT_BLOCK ? n[r] - b0 : ATT_BLOCK;
                    }
#ifdef ATT_PAIRS
                if (pairs) att_values_pairs(vh + (size_t)b0 * D * el, D, na, nk, wa, oa);
                else
#endif
                if (direct)
                    att_values(vh + (size_t)b0 * D * el, dtype, vsh ? vsh + b0 : NULL, D, na, nk,
                               (const float *const *)sa, oa);
                else
                    att_values((const char *)vf, KV_F32, NULL, D, na, nk, (const float *const *)sa, oa);
            }
#ifdef ATT_PAIRS
            for (int r = 0; r < tk.rows && pairs; r++)
                for (int g = 0; g < group && n[r]; g++)
                    att_unpair(part + (size_t)(first[m0 + r] + tk.c * Hkv + kvh) * per + g * (D + 2) + 2, D);
#endif
        }
        free(kt);
        free(vf);
        free(qb);
        free(eb);
        free(wa);
        free(s);
        free(sc);
        free(nk);
        free(qa);
        free(sa);
        free(oa);
#pragma omp for schedule(static) nowait /* merge the chunks of each row's query heads, in chunk order */
        for (int mh = 0; mh < M * Hq; mh++) {
            int m = mh / Hq, h = mh % Hq, chunks = (first[m + 1] - first[m]) / Hkv, kvh = h / group, g = h % group;
            float *o = out + (long)m * Hq * D + (long)h * D, mx = -INFINITY, sum = 0;
            memset(o, 0, sizeof(float) * D);
            for (int c = 0; c < chunks; c++) {
                float cm = part[(size_t)(first[m] + c * Hkv + kvh) * per + g * (D + 2)];
                mx = cm > mx ? cm : mx;
            }
            for (int c = 0; c < chunks; c++) {
                const float *pt = part + (size_t)(first[m] + c * Hkv + kvh) * per + g * (D + 2);
                float w = expf(pt[0] - mx);
                sum += w * pt[1];
                for (int i = 0; i < D; i++) o[i] += w * pt[2 + i];
            }
            for (int i = 0; i < D && sum > 0; i++) o[i] /= sum;
        }
    }
    free(tasks);
    free(part);
    free(first);
}

/* ---- SwiGLU: out[m, i] = silu(gu[m, i]) * gu[m, I + i] = g / (1 + e^-g) * u; with AVX-512, e^-g by
   exp512 (-g clamped to [-88, 88]: silu of |g| > 88 is g or -0) ------------------------------------- */
void silu_mul(const float *gu, int M, int I, float *out) {
#pragma omp parallel for schedule(static) if (M >= 8)
    for (int m = 0; m < M; m++) {
        const float *g = gu + (long)m * 2 * I, *u = g + I;
        float *o = out + (long)m * I;
        int i = 0;
#ifdef __AVX512F__
        for (; i + 16 <= I; i += 16) {
            __m512 gv = _mm512_loadu_ps(g + i);
            __m512 x = _mm512_min_ps(_mm512_max_ps(_mm512_sub_ps(_mm512_setzero_ps(), gv), _mm512_set1_ps(-88.f)),
                                     _mm512_set1_ps(88.f));
            __m512 s = _mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.f), exp512(x)));
            _mm512_storeu_ps(o + i, _mm512_mul_ps(s, _mm512_loadu_ps(u + i)));
        }
#endif
        for (; i < I; i++) o[i] = g[i] / (1.f + expf(-g[i])) * u[i];
    }
}

/* ---- B logits rows before their token is chosen (generation/sampling.py `penalized_rows`): row b's repetition
   penalty first, in place (each of its n_ids[b] distinct ids: v / p if v > 0, else v * p, in float32 as numpy and
   torch compute it; p == 1 or no ids: none), then its first largest value and index, a NaN counting as the
   largest (numpy's argmax), and with top_k[b] > 0 (always below V) its top_k[b]-th largest value (for a sampled
   row's cut). A row
   is cut into parts, as many as the threads leave to it, each part scanned by the thread that wrote it in the
   output layer's kernel when the cuts match; the parts' results are merged in order, so nothing depends on the
   thread count. ---------------------------------------------------------------------------------------------- */

#define TOP_SCAN 64 /* top_k up to this: one pass keeping the best (top_values); beyond: quickselect on a copy */

/* The k-th largest of v[0..n) (1 <= k <= n), reordering v so that v[0..k) are the k largest (quickselect). */
static float kth_largest(float *v, long n, long k) {
    long lo = 0, hi = n - 1, want = k - 1;
    while (lo < hi) {
        float pivot = v[lo + (hi - lo) / 2];
        long i = lo, j = hi;
        while (i <= j) {
            while (v[i] > pivot) i++;
            while (v[j] < pivot) j--;
            if (i <= j) {
                float t = v[i];
                v[i++] = v[j], v[j--] = t;
            }
        }
        if (want <= j) hi = j;
        else if (want >= i) lo = i;
        else break; /* between the two sides: equal to the pivot */
    }
    return v[want];
}

/* The k largest of r[0..n), in descending order (-inf for missing ones), into top[0..k): one pass keeping the k
   best so far, for small k (a value enters when it beats the k-th kept; NaNs never do). */
static inline void top_insert(float *top, long k, float v) {
    if (!(v > top[k - 1])) return;
    long j = k - 1;
    for (; j > 0 && top[j - 1] < v; j--) top[j] = top[j - 1];
    top[j] = v;
}

static void top_values(const float *r, long n, long k, float *top) {
    for (long j = 0; j < k; j++) top[j] = -INFINITY;
    long i = 0;
#ifdef __AVX512F__
    for (; i + 16 <= n; i += 16) /* 16 at a time, past those that all lose to the k-th kept */
        for (__mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(r + i), _mm512_set1_ps(top[k - 1]), _CMP_GT_OQ); hit;
             hit &= hit - 1)
            top_insert(top, k, r[i + __builtin_ctz(hit)]);
#endif
    for (; i < n; i++) top_insert(top, k, r[i]);
}

static void penalized_part(float *r, long lo, long hi, const long *ids, long n_ids, float p, long k, float *best,
                           long *at, int *nan, float *top) {
    if (p != 1.f)
        for (long j = 0; j < n_ids; j++)
            if (ids[j] >= lo && ids[j] < hi) {
                float v = r[ids[j]];
                r[ids[j]] = v > 0 ? v / p : v * p;
            }
    float m = -INFINITY;
    int any_nan = 0;
#pragma omp simd reduction(max : m) reduction(| : any_nan)
    for (long i = lo; i < hi; i++) {
        float v = r[i];
        m = v > m ? v : m;
        any_nan |= v != v;
    }
    long i = lo;
    if (any_nan)
        while (r[i] == r[i]) i++;
    else
        while (r[i] != m) i++;
    *best = r[i], *at = i, *nan = any_nan;
    if (k > 0 && !any_nan) { /* this part's k largest (all of them, fewer than k): top[0..k), -inf after */
        long n = hi - lo, kk = k < n ? k : n;
        if (k <= TOP_SCAN) {
            top_values(r + lo, n, k, top);
        } else {
            float *v = malloc(sizeof(float) * n);
            memcpy(v, r + lo, sizeof(float) * n);
            kth_largest(v, n, kk);
            for (long j = 0; j < k; j++) top[j] = j < kk ? v[j] : -INFINITY;
            free(v);
        }
    }
}

void penalized_rows(float *const *rows, long V, int B, const long *const *ids, const long *n_ids,
                    const float *penalty, const int *top_k, float *best, long *index, float *kth) {
    int T = 1;
#ifdef _OPENMP
    T = omp_get_max_threads();
#endif
    long P = B >= T ? 1 : (T + B - 1) / B;               /* parts per row */
    long step = ((V + P - 1) / P + 15) / 16 * 16;       /* a part's length, whole cache lines */
    P = (V + step - 1) / step;
    long K = 0; /* the largest top_k asked for */
    for (int b = 0; b < B; b++)
        if (top_k[b] > K) K = top_k[b];
    float *pb = malloc(sizeof(float) * B * P);
    long *pa = malloc(sizeof(long) * B * P);
    int *pn = malloc(sizeof(int) * B * P);
    float *pt = K ? malloc(sizeof(float) * B * P * K) : NULL; /* each part's largest values */
#pragma omp parallel for schedule(static) if (B * P > 1)
    for (long t = 0; t < B * P; t++) {
        long b = t / P, lo = t % P * step, hi = lo + step < V ? lo + step : V;
        penalized_part(rows[b], lo, hi, ids[b], n_ids[b], penalty[b], top_k[b], pb + t, pa + t, pn + t,
                       pt ? pt + t * K : NULL);
    }
    for (int b = 0; b < B; b++) { /* the first NaN, else the first part's of the largest */
        long win = (long)b * P, end = win + P, k = top_k[b];
        for (long t = win + 1; t < end; t++)
            if (!pn[win] && (pn[t] || pb[t] > pb[win])) win = t;
        best[b] = pb[win], index[b] = pa[win];
        kth[b] = NAN;
        if (k && !pn[win]) { /* the k-th largest of the parts' k largest (one part: its k-th, in place) */
            const float *top = pt + (long)b * P * K;
            if (P == 1) {
                kth[b] = top[k - 1];
            } else {
                float *v = malloc(sizeof(float) * P * k);
                for (long t = 0; t < P; t++) memcpy(v + t * k, top + t * K, sizeof(float) * k);
                kth[b] = kth_largest(v, P * k, k);
                free(v);
            }
        }
    }
    free(pb);
    free(pa);
    free(pn);
    free(pt);
}

/* ---- a whole decode step's layer stack in one call (fast/decode.py builds the descriptors), for
   models whose projections all have kernels: the same kernels in the same order as the step written
   out in Python, without a Python round trip per kernel (a fifth of a small model's step). ---------- */
typedef struct {
    int kind; /* 4: q4_gemm, 8: q8_gemm, 16: dense_gemm on bf16, 32: dense_gemm on fp32 (arguments as there) */
    int K, N, Npad, g;
    const void *w, *s;
    const float *bias;
} Proj;

typedef struct {
    const float *ln1, *ln2, *q_norm, *k_norm; /* q_norm, k_norm: Qwen3, else NULL */
    int n_qkv, n_gu;                          /* 1 when fused, else 3 (q, k, v) and 2 (gate, up) */
    Proj qkv[3], o, gu[2], down;
} Layer;

/* sizeof and offsetof of Proj's and Layer's fields, in declaration order, for native.py to check its
   ctypes mirror against (a library whose structs differ is refused). Returns how many it wrote. */
int struct_layout(long *out) {
    long v[] = {sizeof(Proj), offsetof(Proj, kind), offsetof(Proj, K), offsetof(Proj, N), offsetof(Proj, Npad),
                offsetof(Proj, g), offsetof(Proj, w), offsetof(Proj, s), offsetof(Proj, bias),
                sizeof(Layer), offsetof(Layer, ln1), offsetof(Layer, ln2), offsetof(Layer, q_norm),
                offsetof(Layer, k_norm), offsetof(Layer, n_qkv), offsetof(Layer, n_gu), offsetof(Layer, qkv),
                offsetof(Layer, o), offsetof(Layer, gu), offsetof(Layer, down)};
    int n = sizeof(v) / sizeof(v[0]);
    memcpy(out, v, sizeof(v));
    return n;
}

static void project(const Proj *p, int n, const float *x, int M, float *y, long ldy, int accumulate) {
    for (int i = 0; i < n; i++) { /* parts side by side in y */
        if (p[i].kind == 4)
            q4_gemm(x, M, p[i].K, p[i].w, p[i].s, p[i].g, p[i].N, p[i].Npad, p[i].bias, y, ldy, accumulate);
        else if (p[i].kind == 16 || p[i].kind == 32)
            dense_gemm(x, M, p[i].K, p[i].w, p[i].kind == 16, p[i].N, p[i].bias, y, ldy, accumulate);
        else
            q8_gemm(x, M, p[i].K, p[i].w, p[i].s, p[i].g, p[i].N, p[i].bias, y, ldy, accumulate);
        y += p[i].N;
    }
}

void decode_layers(const Layer *layers, int L, int M, int H, int Hq, int Hkv, int D, int I, float eps,
                   float *x, float *hbuf, float *qkv, float *att, float *gu, float *act, const float *cos,
                   const float *sin, const float *scale, void **k0, void **v0, float **ks0, float **vs0,
                   const long *layer_stride, const long *head_stride, const int *pos, const int *len, int dtype) {
    long qkv_n = (long)(Hq + 2 * Hkv) * D;
    size_t el = kv_size(dtype);
    void **kb = malloc(sizeof(void *) * 2 * (M ? M : 1)), **vb = kb + M;
    float **ks = malloc(sizeof(float *) * 2 * (M ? M : 1)), **vs = ks + M;
    for (int l = 0; l < L; l++) {
        const Layer *ly = &layers[l];
        for (int m = 0; m < M; m++) { /* row m's K/V for layer l */
            kb[m] = k0[m] ? (char *)k0[m] + (size_t)l * layer_stride[m] * el : NULL;
            vb[m] = v0[m] ? (char *)v0[m] + (size_t)l * layer_stride[m] * el : NULL;
            ks[m] = dtype == KV_INT8 && k0[m] ? ks0[m] + (size_t)l * layer_stride[m] / D : NULL;
            vs[m] = dtype == KV_INT8 && v0[m] ? vs0[m] + (size_t)l * layer_stride[m] / D : NULL;
        }
        rms_norm(x, hbuf, M, H, H, H, ly->ln1, eps);
        project(ly->qkv, ly->n_qkv, hbuf, M, qkv, qkv_n, 0);
        for (int m = 0; ly->q_norm && m < M; m++) {
            float *q = qkv + m * qkv_n, *k = q + (long)Hq * D;
            rms_norm(q, q, Hq, D, D, D, ly->q_norm, eps);
            rms_norm(k, k, Hkv, D, D, D, ly->k_norm, eps);
        }
        rope(qkv, M, Hq + Hkv, D, qkv_n, cos, sin);
        kv_store(qkv, M, qkv_n, (long)Hq * D, (long)(Hq + Hkv) * D, Hkv, D, kb, vb, ks, vs, pos, head_stride, dtype);
        attend(qkv, M, Hq, Hkv, D, qkv_n, kb, vb, ks, vs, len, head_stride, dtype, scale, att);
        project(&ly->o, 1, att, M, x, H, 1);
        rms_norm(x, hbuf, M, H, H, H, ly->ln2, eps);
        project(ly->gu, ly->n_gu, hbuf, M, gu, 2L * I, 0);
        silu_mul(gu, M, I, act);
        project(&ly->down, 1, act, M, x, H, 1);
    }
    free(kb);
    free(ks);
}
