/* CPU decode kernels for qianwen.fast (compiled on first use by native.py, called through ctypes).

   Activations are fp32. Every output row is computed by the same sequence of operations whatever the
   number of rows or threads, so a sequence's result never depends on its batch (conventions.md).
   Threads come from OpenMP; the library links the libgomp that torch already loaded, so both share
   one thread pool and torch.set_num_threads applies to both.

   Each kernel has an AVX-512 body and a plain C body for other CPUs (auto-vectorised by -O3). */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

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
   `planes` weights (each `packed_stride` / `sz_stride` elements apart) are summed (GGUF Q8_0 is held
   as two 4-bit planes). y[m, n] (+)= sum_k x[m, k] w[n, k] + bias[n]. */
#ifdef __AVX512F__
/* One group of one 64-row block for R rows of x at once: the nibbles are unpacked once and used by
   every row (a row's own operations are the same for any R). out[r] accumulates 64 outputs. */
static inline __attribute__((always_inline)) void q4_group(const uint8_t *wb, const uint16_t *s, int k0, int g,
                                                           const float **xr, const float *xsum, float (*out)[64],
                                                           const int R) {
    /* nibbles become floats by a 16-entry table lookup (vpermps reads the low 4 bits) */
    const __m512 tbl = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512 acc[4][4]; /* fixed size, not [R]: R is a constant at each call, so this stays in registers */
    for (int r = 0; r < R; r++)
        for (int i = 0; i < 4; i++) acc[r][i] = _mm512_setzero_ps();
    for (int k = k0; k < k0 + g; k++) {
        _mm_prefetch((const char *)(wb + k * 32 + 2048), _MM_HINT_T0); /* 64 k ahead */
        __m512i a = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(wb + k * 32)));
        __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(wb + k * 32 + 16)));
        __m512 w[4] = {_mm512_permutexvar_ps(a, tbl), _mm512_permutexvar_ps(b, tbl),
                       _mm512_permutexvar_ps(_mm512_srli_epi32(a, 4), tbl),
                       _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), tbl)};
        for (int r = 0; r < R; r++) {
            __m512 xk = _mm512_set1_ps(xr[r][k]);
            for (int i = 0; i < 4; i++) acc[r][i] = _mm512_fmadd_ps(w[i], xk, acc[r][i]);
        }
    }
    for (int i = 0; i < 4; i++) {
        __m512i v = _mm512_loadu_si512(s + i * 32); /* 16 (scale, zero) bf16 pairs */
        __m512 sc = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
        __m512 zr = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xffff0000)));
        __m512 z8 = _mm512_fnmadd_ps(_mm512_set1_ps(8.f), sc, zr); /* zero - 8 scale */
        for (int r = 0; r < R; r++) {
            __m512 o = _mm512_fmadd_ps(acc[r][i], sc, _mm512_loadu_ps(out[r] + i * 16));
            _mm512_storeu_ps(out[r] + i * 16, _mm512_fmadd_ps(z8, _mm512_set1_ps(xsum[r]), o));
        }
    }
}
#endif

void q4_gemm(const float *x, int M, int K, const uint8_t *packed, const uint16_t *sz, int planes,
             long packed_stride, long sz_stride, int g, int N, int Npad, const float *bias, float *y, long ldy,
             int accumulate) {
    int G = K / g, nblk = Npad / 64;
    float *xs = malloc(sizeof(float) * (size_t)M * G); /* per-group sums of x, for the zero term */
    for (int m = 0; m < M; m++)
        for (int gi = 0; gi < G; gi++) {
            float s = 0;
            for (int k = gi * g; k < (gi + 1) * g; k++) s += x[(size_t)m * K + k];
            xs[m * G + gi] = s;
        }
#pragma omp parallel for schedule(static)
    for (int blk = 0; blk < nblk; blk++) {
        for (int m0 = 0; m0 < M;) {
            int R = M - m0 >= 4 ? 4 : M - m0 >= 2 ? 2 : 1; /* rows sharing one pass over the weights */
            float out[4][64] = {{0}};
            const float *xr[4];
            for (int r = 0; r < R; r++) xr[r] = x + (size_t)(m0 + r) * K;
            for (int p = 0; p < planes; p++) {
                const uint8_t *wb = packed + p * packed_stride + (size_t)blk * K * 32;
                for (int gi = 0; gi < G; gi++) {
                    const uint16_t *s = sz + p * sz_stride + ((size_t)gi * Npad + blk * 64) * 2;
                    float xsum[4];
                    for (int r = 0; r < R; r++) xsum[r] = xs[(m0 + r) * G + gi];
#ifdef __AVX512F__
                    if (R == 4)
                        q4_group(wb, s, gi * g, g, xr, xsum, out, 4);
                    else if (R == 2)
                        q4_group(wb, s, gi * g, g, xr, xsum, out, 2);
                    else
                        q4_group(wb, s, gi * g, g, xr, xsum, out, 1);
#else
                    for (int r = 0; r < R; r++) {
                        float acc[64] = {0};
                        for (int k = gi * g; k < (gi + 1) * g; k++) {
                            const uint8_t *wk = wb + k * 32;
                            for (int j = 0; j < 32; j++) {
                                acc[j] += (float)(wk[j] & 15) * xr[r][k];
                                acc[j + 32] += (float)(wk[j] >> 4) * xr[r][k];
                            }
                        }
                        for (int j = 0; j < 64; j++) {
                            float sc = bf16_to_f32(s[2 * j]), zr = bf16_to_f32(s[2 * j + 1]);
                            out[r][j] += acc[j] * sc + (zr - 8.f * sc) * xsum[r];
                        }
                    }
#endif
                }
            }
            for (int r = 0; r < R; r++) {
                float *ym = y + (size_t)(m0 + r) * ldy;
                for (int j = 0; j < 64 && blk * 64 + j < N; j++) {
                    int n = blk * 64 + j;
                    float v = out[r][j] + (bias ? bias[n] : 0.f);
                    ym[n] = accumulate ? ym[n] + v : v;
                }
            }
            m0 += R;
        }
    }
    free(xs);
}

/* ---- int8 GEMM, row-major: q [N, K] int8, scales [N, K/g] fp32: w[n, k] = q[n, k] scale[n, k/g] ----
   (GGUF Q8_0 blocks have g = 32; per-channel int8 has g = K.) Four rows at a time share the loads of x;
   a row's arithmetic is the same wherever it falls. */
void q8_gemm(const float *x, int M, int K, const int8_t *q, const float *scales, int g, int N,
             const float *bias, float *y, long ldy, int accumulate) {
    int G = K / g;
#pragma omp parallel for schedule(static)
    for (int n0 = 0; n0 < N; n0 += 4) {
        const int8_t *qr[4];
        const float *sr[4];
        for (int r = 0; r < 4; r++) { /* rows past N repeat the last one and are not stored */
            int n = n0 + r < N ? n0 + r : N - 1;
            qr[r] = q + (size_t)n * K;
            sr[r] = scales + (size_t)n * G;
        }
        for (int m = 0; m < M; m++) {
            const float *xm = x + (size_t)m * K;
            float out[4];
#ifdef __AVX512F__
            if (g % 16 == 0) {
                __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
                for (int gi = 0; gi < G; gi++) {
                    __m512 blk[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
                    for (int k = gi * g; k < (gi + 1) * g; k += 16) {
                        __m512 xv = _mm512_loadu_ps(xm + k);
                        for (int r = 0; r < 4; r++) {
                            _mm_prefetch((const char *)(qr[r] + k + 16 * K), _MM_HINT_T0);
                            __m512i w = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(qr[r] + k)));
                            blk[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(w), xv, blk[r]);
                        }
                    }
                    for (int r = 0; r < 4; r++) acc[r] = _mm512_fmadd_ps(blk[r], _mm512_set1_ps(sr[r][gi]), acc[r]);
                }
                for (int r = 0; r < 4; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
            } else
#endif
            {
                for (int r = 0; r < 4; r++) {
                    float acc = 0;
                    for (int gi = 0; gi < G; gi++) {
                        float blk = 0;
                        for (int k = gi * g; k < (gi + 1) * g; k++) blk += (float)qr[r][k] * xm[k];
                        acc += blk * sr[r][gi];
                    }
                    out[r] = acc;
                }
            }
            for (int r = 0; r < 4 && n0 + r < N; r++) {
                float v = out[r] + (bias ? bias[n0 + r] : 0.f);
                float *dst = y + (size_t)m * ldy + n0 + r;
                *dst = accumulate ? *dst + v : v;
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

/* ---- K/V store: row m's k and v (Hkv heads of D, at qkv + m * row_stride + k_off / v_off) go to
   position pos[m] of its cache; kb[m], vb[m] point at head 0, position 0; heads `head_stride[m]`
   elements apart. bf16 caches are rounded to nearest even. */
void kv_store(const float *qkv, int M, long row_stride, long k_off, long v_off, int Hkv, int D,
              void **kb, void **vb, const int *pos, const long *head_stride, int bf16) {
    for (int m = 0; m < M; m++) {
        if (!kb[m]) continue;
        for (int h = 0; h < Hkv; h++) {
            const float *k = qkv + m * row_stride + k_off + (long)h * D;
            const float *v = qkv + m * row_stride + v_off + (long)h * D;
            long at = h * head_stride[m] + (long)pos[m] * D;
            for (int i = 0; i < D; i++) {
                if (bf16) {
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

static inline float dot_kv(const float *q, const void *k, int D, int bf16) {
#ifdef __AVX512F__
    if (D % 16 == 0) {
        __m512 acc = _mm512_setzero_ps();
        for (int i = 0; i < D; i += 16) {
            __m512 kv = bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(
                                   _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)k + i))), 16))
                             : _mm512_loadu_ps((const float *)k + i);
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), kv, acc);
        }
        return _mm512_reduce_add_ps(acc);
    }
#endif
    float s = 0;
    for (int i = 0; i < D; i++) s += q[i] * (bf16 ? bf16_to_f32(((const uint16_t *)k)[i]) : ((const float *)k)[i]);
    return s;
}

static inline void axpy_kv(float *out, float p, const void *v, int D, int bf16) {
    if (bf16) {
        const uint16_t *vh = v;
#pragma omp simd
        for (int i = 0; i < D; i++) out[i] += p * bf16_to_f32(vh[i]);
    } else {
        const float *vf = v;
#pragma omp simd
        for (int i = 0; i < D; i++) out[i] += p * vf[i];
    }
}

/* ---- decode attention: one query per row over its cache (positions 0 .. len[m] - 1, already
   holding this token's k and v). q at q + m * q_stride (Hq heads of D), out [M, Hq * D]. Query
   head h reads kv head h / (Hq / Hkv). scale[m] multiplies the scores (1/sqrt(D), times LogN). */
void attend(const float *q, int M, int Hq, int Hkv, int D, long q_stride, void **kb, void **vb,
            const int *len, const long *head_stride, int bf16, const float *scale, float *out) {
    int group = Hq / Hkv;
    size_t el = bf16 ? 2 : 4;
#pragma omp parallel for schedule(static)
    for (int task = 0; task < M * Hq; task++) {
        int m = task / Hq, h = task % Hq, n = len[m];
        float *o = out + (long)m * Hq * D + (long)h * D;
        memset(o, 0, sizeof(float) * D);
        if (!kb[m] || n <= 0) continue;
        const float *qh = q + m * q_stride + (long)h * D;
        const char *kh = (const char *)kb[m] + (size_t)(h / group) * head_stride[m] * el;
        const char *vh = (const char *)vb[m] + (size_t)(h / group) * head_stride[m] * el;
        float *s = malloc(sizeof(float) * n);
        float mx = -INFINITY, sum = 0;
        for (int t = 0; t < n; t++) {
            s[t] = dot_kv(qh, kh + (size_t)t * D * el, D, bf16) * scale[m];
            mx = s[t] > mx ? s[t] : mx;
        }
        for (int t = 0; t < n; t++) {
            s[t] = expf(s[t] - mx);
            sum += s[t];
        }
        for (int t = 0; t < n; t++) axpy_kv(o, s[t] / sum, vh + (size_t)t * D * el, D, bf16);
        free(s);
    }
}

/* ---- SwiGLU: out[m, i] = silu(gu[m, i]) * gu[m, I + i] ----------------------------------------- */
void silu_mul(const float *gu, int M, int I, float *out) {
    for (int m = 0; m < M; m++) {
        const float *g = gu + (long)m * 2 * I, *u = g + I;
        float *o = out + (long)m * I;
#pragma omp simd
        for (int i = 0; i < I; i++) o[i] = g[i] / (1.f + expf(-g[i])) * u[i];
    }
}
