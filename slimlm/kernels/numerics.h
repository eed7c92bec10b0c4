/* Elementwise pieces of a decode step: bf16 conversions, exp, SiLU, dot products, RMSNorm, RoPE. */
#pragma once
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "model.h"

static inline float bf16_to_f32(bf16 v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Round to nearest even, as torch's float -> bfloat16 conversion does (NaN stays NaN). */
static inline bf16 f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

#ifdef __AVX512F__
/* e^x for 16 lanes: 2^n * p(r) with x = n ln2 + r, |r| <= ln2/2, a degree-6 polynomial (a few ulp);
 * libm's expf one lane at a time was a tenth of a 16-sequence step (SiLU and softmax). */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-104.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}
#endif

/* out[i] = e^(in[i] - shift) for n values. */
static void exp_shifted(const float *in, float *out, int64_t n, float shift) {
    int64_t i = 0;
#ifdef __AVX512F__
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(out + i, exp16(_mm512_sub_ps(_mm512_loadu_ps(in + i), _mm512_set1_ps(shift))));
#endif
    for (; i < n; i++) out[i] = expf(in[i] - shift);
}

/* act[i] = silu(gate[i]) * up[i], rounded to bf16 (the down projection's input). */
static void swiglu_bf16(const float *gate, const float *up, bf16 *act, int64_t n) {
    int64_t i = 0;
#ifdef __AVX512F__
    for (; i + 16 <= n; i += 16) {
        __m512 g = _mm512_loadu_ps(gate + i);
        __m512 sig = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
        __m512 a = _mm512_mul_ps(_mm512_mul_ps(g, sig), _mm512_loadu_ps(up + i));
        float tmp[16];
        _mm512_storeu_ps(tmp, a);
        for (int j = 0; j < 16; j++) act[i + j] = f32_to_bf16(tmp[j]);
    }
#endif
    for (; i < n; i++) act[i] = f32_to_bf16(gate[i] / (1.0f + expf(-gate[i])) * up[i]);
}

/* out[i] = silu(gate[i]) * up[i] in float32 (out may be gate): a quantized down projection's input. */
static void swiglu_f32(const float *gate, const float *up, float *out, int64_t n) {
    int64_t i = 0;
#ifdef __AVX512F__
    for (; i + 16 <= n; i += 16) {
        __m512 g = _mm512_loadu_ps(gate + i);
        __m512 sig = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
        _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_mul_ps(g, sig), _mm512_loadu_ps(up + i)));
    }
#endif
    for (; i < n; i++) out[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

#ifdef __AVX512F__
/* 16 bf16 values -> 16 floats: a bf16 is the top half of a float32's bits. */
static inline __m512 bf16x16_to_ps(__m256i v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
#endif

/* dot(w[0..k), x[0..k)) with w in bf16, x and the sum in float32 (attention scores). */
static inline float dot_bf16(const bf16 *w, const float *x, int64_t k) {
    int64_t i = 0;
    float s = 0.0f;
#ifdef __AVX512F__
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (; i + 32 <= k; i += 32) {
        __m512 w0 = bf16x16_to_ps(_mm256_loadu_si256((const __m256i *)(w + i)));
        __m512 w1 = bf16x16_to_ps(_mm256_loadu_si256((const __m256i *)(w + i + 16)));
        a0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + i), a0);
        a1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + i + 16), a1);
    }
    s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#else
    float p[8] = {0};
    for (; i + 8 <= k; i += 8)
        for (int j = 0; j < 8; j++) p[j] += bf16_to_f32(w[i + j]) * x[i + j];
    for (int j = 0; j < 8; j++) s += p[j];
#endif
    for (; i < k; i++) s += bf16_to_f32(w[i]) * x[i];
    return s;
}

/* out = x * rsqrt(mean(x^2) + eps) * weight, all float32. */
static void rms_norm(const float *x, const bf16 *weight, float *out, int64_t n, float eps) {
    double ss = 0.0;
    for (int64_t i = 0; i < n; i++) ss += (double)x[i] * x[i];
    float inv = 1.0f / sqrtf((float)(ss / (double)n) + eps);
    for (int64_t i = 0; i < n; i++) out[i] = x[i] * inv * bf16_to_f32(weight[i]);
}

/* HF's x * cos + rotate_half(x) * sin on one head, with sin's sign already folded in (rope.py). */
static void rotate(float *x, const float *cos, const float *ssin, int64_t d) {
    int64_t half = d / 2;
    for (int64_t i = 0; i < half; i++) {
        float lo = x[i], hi = x[i + half];
        x[i] = lo * cos[i] + hi * ssin[i];
        x[i + half] = hi * cos[i + half] + lo * ssin[i + half];
    }
}

/* IEEE half <-> float32 for the fp16 scales of the quantized KV pools and weights (round to nearest
 * even, subnormals kept). */
static inline uint16_t f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    x &= 0x7fffffffu;
    if (x >= 0x47800000u) return sign | (x > 0x7f800000u ? 0x7e00 : 0x7c00); /* overflow, inf, nan */
    if (x < 0x38800000u) {                                                 /* fp16 subnormal or zero */
        float a;
        memcpy(&a, &x, 4);
        return sign | (uint16_t)rintf(a * 16777216.0f); /* units of 2^-24 */
    }
    x += 0xc8000fffu + ((x >> 13) & 1u); /* exponent rebias (-112), then round to nearest even */
    return sign | (uint16_t)(x >> 13);
}

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
    if (exp == 0) {
        float f = (float)man * 5.9604644775390625e-8f; /* 2^-24 */
        return sign ? -f : f;
    }
    bits = sign | (exp == 31 ? 0x7f800000u | (man << 13) : ((exp + 112) << 23) | (man << 13));
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* The integer sum of each run of `run` int8 activation codes (n codes in all), malloc'ed: the caller frees.
   Q5_0 and Q6_K subtract their code offset (16, 32) times these sums from each dot product. */
static inline int32_t *code_run_sums(const int8_t *xq, int64_t n, int run) {
    int32_t *sums = (int32_t *)malloc(sizeof(int32_t) * (size_t)(n / run + 1));
    for (int64_t i = 0; i < n / run; i++) {
        int32_t total = 0;
        for (int j = 0; j < run; j++) total += xq[i * run + j];
        sums[i] = total;
    }
    return sums;
}

/* Runs CALL(NB) over sequences b0 .. batch-1: tiles of 8, then one tile of the remainder. NB is a literal
   in each call, so every tile width compiles to its own unrolled code (the int4/int8, Q5_0 and Q6_K GEMMs). */
#define FOR_TILES_OF_8(b0, batch, CALL) \
    do { \
        for (; (b0) + 8 <= (batch); (b0) += 8) CALL(8); \
        switch ((batch) - (b0)) { \
        case 7: CALL(7); break; \
        case 6: CALL(6); break; \
        case 5: CALL(5); break; \
        case 4: CALL(4); break; \
        case 3: CALL(3); break; \
        case 2: CALL(2); break; \
        case 1: CALL(1); break; \
        } \
    } while (0)
