/* Elementwise pieces only some families use (slim_layer's and slim_model's family fields): RMSNorm with
 * float32 weights (Gemma's 1 + w folded in at layout time, so one loop serves every family), GeGLU with
 * tanh-approximated GELU, and tanh soft-capping. */
#pragma once
#include "numerics.h"

/* out = x * rsqrt(mean(x^2) + eps) * weight (out may be x). */
static void rms_norm_f(const float *x, const float *weight, float *out, int64_t n, float eps) {
    double ss = 0.0;
    for (int64_t i = 0; i < n; i++) ss += (double)x[i] * x[i];
    float inv = 1.0f / sqrtf((float)(ss / (double)n) + eps);
    for (int64_t i = 0; i < n; i++) out[i] = x[i] * inv * weight[i];
}

#ifdef __AVX512F__
/* tanh for 16 lanes: 1 - 2 / (e^(2x) + 1), saturating cleanly at +-1 (exp16 clamps its argument). */
static inline __m512 tanh16(__m512 x) {
    __m512 e = exp16(_mm512_add_ps(x, x));
    return _mm512_sub_ps(_mm512_set1_ps(1.0f),
                         _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(e, _mm512_set1_ps(1.0f))));
}

/* torch's gelu(approximate="tanh"): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))). */
static inline __m512 gelu_tanh16(__m512 x) {
    __m512 inner = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f),
                                 _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), x), _mm512_mul_ps(x, x), x));
    return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x), _mm512_add_ps(_mm512_set1_ps(1.0f), tanh16(inner)));
}
#endif

static inline float gelu_tanh1(float x) {
    return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}

/* out[i] = gelu_tanh(gate[i]) * up[i] in float32 (out may be gate). */
static void geglu_f32(const float *gate, const float *up, float *out, int64_t n) {
    int64_t i = 0;
#ifdef __AVX512F__
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(out + i, _mm512_mul_ps(gelu_tanh16(_mm512_loadu_ps(gate + i)), _mm512_loadu_ps(up + i)));
#endif
    for (; i < n; i++) out[i] = gelu_tanh1(gate[i]) * up[i];
}

/* The same rounded to bf16 (a bf16 down projection's input). */
static void geglu_bf16(const float *gate, const float *up, bf16 *act, int64_t n) {
    int64_t i = 0;
#ifdef __AVX512F__
    for (; i + 16 <= n; i += 16) {
        float tmp[16];
        _mm512_storeu_ps(tmp, _mm512_mul_ps(gelu_tanh16(_mm512_loadu_ps(gate + i)), _mm512_loadu_ps(up + i)));
        for (int j = 0; j < 16; j++) act[i + j] = f32_to_bf16(tmp[j]);
    }
#endif
    for (; i < n; i++) act[i] = f32_to_bf16(gelu_tanh1(gate[i]) * up[i]);
}

/* x[i] = cap * tanh(x[i] / cap) for n values (final-logit soft-capping). */
static void soft_cap(float *x, int64_t n, float cap) {
    int64_t i = 0;
#ifdef __AVX512F__
    __m512 c = _mm512_set1_ps(cap), inv = _mm512_set1_ps(1.0f / cap);
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(x + i, _mm512_mul_ps(c, tanh16(_mm512_mul_ps(_mm512_loadu_ps(x + i), inv))));
#endif
    for (; i < n; i++) x[i] = cap * tanhf(x[i] / cap);
}
