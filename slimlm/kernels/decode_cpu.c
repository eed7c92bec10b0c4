/* Decode steps of a Llama-family model (Llama, Mistral, Qwen2) on CPU: one new token for each of the
 * step's sequences, the whole model in one call.
 *
 * Why: eager PyTorch spends ~9 ms of a ~20 ms SmolLM2 token on ~1,600 small ops (norms, rotary,
 * cache writes, attention, residuals) and their Python dispatch. Here every layer is plain loops
 * between the weight GEMMs, so a token costs little more than streaming the weights once, and a
 * batch of sequences reads each weight tile once for all of them.
 *
 * Numerics: bf16 weights and the engine's own paged KV pool in place (bf16, or the int8/int4 pools with
 * their scales, zero points and turn, slimlm/kv/quantized.py), float32 activations,
 * residual stream and accumulation, rounded to bf16 only where a GEMM reads them (AVX512-BF16
 * multiplies bf16 pairs into float32 sums). Every (weight row, sequence) sum is the same sequence of
 * instructions whatever the batch size and tile shape, so a sequence's logits are bit-identical
 * whatever else is in the batch.
 *
 * Threads: GEMM rows and attention heads are split over OpenMP threads. The library links the
 * libgomp that torch already loaded (same soname), so both share one thread pool. GEMM rows are
 * handed out "guided" (big contiguous chunks first, then smaller): a thread the OS preempts, e.g. for
 * the HTTP server sharing the cores, no longer holds the whole step up (one streaming client on 2
 * cores: 22 -> 14 ms per token), and each thread still streams long runs of rows in address order,
 * which "dynamic" chunks broke (12 against 9 ms per token).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

typedef uint16_t bf16;

#define MAX_HEAD_DIM 512 /* the quantized pools' turn works on the stack */

typedef struct {
    const bf16 *qkv_w;     /* [(H + 2 KVH) * D, hidden]: q, k, v rows stacked */
    const bf16 *qkv_b;     /* [(H + 2 KVH) * D] or NULL (Qwen2 has a q/k/v bias) */
    const bf16 *o_w;       /* [hidden, H * D] */
    const bf16 *gate_up_w; /* [2 * inter, hidden]: gate rows, then up rows */
    const bf16 *down_w;    /* [hidden, inter] */
    const bf16 *in_norm;   /* [hidden] */
    const bf16 *post_norm; /* [hidden] */
    void *k_cache;         /* this layer's K pool: bf16 [KVH, blocks, block_size, D], or quantized codes */
    void *v_cache;         /* [blocks, block_size, KVH, D * bits / 8] (slimlm/kv/quantized.py) */
    uint16_t *k_scale;     /* quantized pools: fp16 [blocks, block_size, KVH]; else NULL */
    uint16_t *v_scale;
    uint8_t *k_zero;       /* quantized pools: uint8 [blocks, block_size, KVH]; else NULL */
    uint8_t *v_zero;
} slim_layer;

typedef struct {
    int64_t hidden, inter, heads, kv_heads, head_dim, layers, vocab;
    int64_t block_size, num_blocks, window, max_ctx, threads;
    int64_t kv_bits;        /* 16: the bf16 pool; 8 or 4: the quantized pools */
    float eps, scale;
    const float *rotation;  /* quantized pools: the orthogonal [D, D] K/V are stored turned by; else NULL */
    const bf16 *embed;      /* [vocab, hidden] */
    const bf16 *final_norm; /* [hidden] */
    const bf16 *lm_head;    /* [vocab, hidden] (the embedding itself when tied) */
    const slim_layer *layer;
    float *work; /* scratch, slim_work_floats() floats */
} slim_model;

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

/* dot(w[0..k), x[0..k)) with w in bf16, x and the sum in float32 (attention scores). */
static inline float dot_bf16(const bf16 *w, const float *x, int64_t k) {
    int64_t i = 0;
    float s = 0.0f;
#ifdef __AVX512F__
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (; i + 32 <= k; i += 32) {
        __m512i w0 = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(w + i)));
        __m512i w1 = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(w + i + 16)));
        a0 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(w0, 16)), _mm512_loadu_ps(x + i), a0);
        a1 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(w1, 16)), _mm512_loadu_ps(x + i + 16), a1);
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

/* ---- KV storage: the engine's pools, read and written in place ---- */

/* fp16 <-> float32 for the quantized pools' scales (round to nearest even, subnormals kept). */
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

/* The bf16 pool: heads first, [KVH, blocks, block_size, D]. */
static inline int64_t slot_offset(const slim_model *m, int64_t kv_head, int64_t block, int64_t offset) {
    return ((kv_head * m->num_blocks + block) * m->block_size + offset) * m->head_dim;
}

/* The quantized pools: token major, [blocks, block_size, KVH]; codes take D * bits / 8 bytes. */
static inline int64_t token_head(const slim_model *m, int64_t kv_head, int64_t block, int64_t offset) {
    return (block * m->block_size + offset) * m->kv_heads + kv_head;
}

/* slimlm/kv/quant_ops.quantize for one vector: asymmetric codes over [min(x, 0), max(x, 0)], an fp16
 * scale, a uint8 zero point; int4 puts element i in the low nibble, i + D/2 in the high one. */
static void quantize_vector(const float *x, int64_t d, int bits, uint8_t *codes, uint16_t *scale, uint8_t *zero) {
    float levels = (float)((1 << bits) - 1), lo = 0.0f, hi = 0.0f;
    for (int64_t i = 0; i < d; i++) {
        if (x[i] < lo) lo = x[i];
        if (x[i] > hi) hi = x[i];
    }
    float s = (hi - lo) / levels;
    s = s < 5.9604644775390625e-8f ? 5.9604644775390625e-8f : (s > 65504.0f ? 65504.0f : s);
    *scale = f32_to_f16(s);
    s = f16_to_f32(*scale); /* quantize against the scale as stored */
    float z = rintf(-lo / s);
    z = z < 0.0f ? 0.0f : (z > levels ? levels : z);
    *zero = (uint8_t)z;
    for (int64_t i = 0; i < d; i++) {
        float c = rintf(x[i] / s + z);
        uint8_t q = (uint8_t)(c < 0.0f ? 0.0f : (c > levels ? levels : c));
        if (bits == 8) codes[i] = q;
        else if (i < d / 2) codes[i] = q;
        else codes[i - d / 2] |= (uint8_t)(q << 4);
    }
}

static inline float code_at(const uint8_t *codes, int64_t i, int64_t d, int bits) {
    if (bits == 8) return (float)codes[i];
    return (float)(i < d / 2 ? codes[i] & 0xF : codes[i - d / 2] >> 4);
}

/* Write one token's K and V (float32, RoPE applied, turned for quantized pools) for one KV head. */
static void kv_write(const slim_model *m, const slim_layer *l, int64_t g, int64_t block, int64_t offset,
                     const float *k, const float *v) {
    int64_t d = m->head_dim;
    if (m->kv_bits == 16) {
        bf16 *kd = (bf16 *)l->k_cache + slot_offset(m, g, block, offset);
        bf16 *vd = (bf16 *)l->v_cache + slot_offset(m, g, block, offset);
        for (int64_t i = 0; i < d; i++) {
            kd[i] = f32_to_bf16(k[i]);
            vd[i] = f32_to_bf16(v[i]);
        }
        return;
    }
    int bits = (int)m->kv_bits;
    int64_t th = token_head(m, g, block, offset), bytes = d * bits / 8;
    quantize_vector(k, d, bits, (uint8_t *)l->k_cache + th * bytes, l->k_scale + th, l->k_zero + th);
    quantize_vector(v, d, bits, (uint8_t *)l->v_cache + th * bytes, l->v_scale + th, l->v_zero + th);
}

/* q . k for the key at (block, offset): for quantized keys s * (sum(c q) - z * sum(q)). */
static inline float key_dot(const slim_model *m, const slim_layer *l, int64_t g, int64_t block, int64_t offset,
                            const float *q, float q_sum) {
    int64_t d = m->head_dim;
    if (m->kv_bits == 16) return dot_bf16((const bf16 *)l->k_cache + slot_offset(m, g, block, offset), q, d);
    int bits = (int)m->kv_bits;
    int64_t th = token_head(m, g, block, offset);
    const uint8_t *c = (const uint8_t *)l->k_cache + th * (d * bits / 8);
    float acc = 0.0f;
    for (int64_t i = 0; i < d; i++) acc += code_at(c, i, d, bits) * q[i];
    return f16_to_f32(l->k_scale[th]) * (acc - (float)l->k_zero[th] * q_sum);
}

/* out += p * v for the value at (block, offset). */
static inline void value_add(const slim_model *m, const slim_layer *l, int64_t g, int64_t block, int64_t offset,
                             float p, float *out) {
    int64_t d = m->head_dim;
    if (m->kv_bits == 16) {
        const bf16 *v = (const bf16 *)l->v_cache + slot_offset(m, g, block, offset);
        for (int64_t i = 0; i < d; i++) out[i] += p * bf16_to_f32(v[i]);
        return;
    }
    int bits = (int)m->kv_bits;
    int64_t th = token_head(m, g, block, offset);
    const uint8_t *c = (const uint8_t *)l->v_cache + th * (d * bits / 8);
    float ps = p * f16_to_f32(l->v_scale[th]), z = (float)l->v_zero[th];
    for (int64_t i = 0; i < d; i++) out[i] += ps * (code_at(c, i, d, bits) - z);
}

/* x <- x R (transpose = 0) or x R^T (transpose = 1), R [d, d] orthogonal: the quantized pools' turn. */
static void turn(float *x, const float *r, int64_t d, int transpose) {
    float y[MAX_HEAD_DIM];
    for (int64_t j = 0; j < d; j++) {
        float acc = 0.0f;
        for (int64_t i = 0; i < d; i++) acc += x[i] * (transpose ? r[j * d + i] : r[i * d + j]);
        y[j] = acc;
    }
    memcpy(x, y, (size_t)d * sizeof(float));
}

/* One query head over positions [lo, ctx) of its KV head, read through the block table. Online
 * softmax over chunks of the context (running max and sum), so no scratch grows with the context. */
#define ATTN_CHUNK 256
static void attend_head(const slim_model *m, const slim_layer *l, const float *q, int64_t kv_head,
                        const int64_t *table, int64_t lo, int64_t ctx, float *out) {
    int64_t d = m->head_dim, bs = m->block_size;
    float scores[ATTN_CHUNK], top = -INFINITY, total = 0.0f, q_sum = 0.0f;
    for (int64_t i = 0; i < d; i++) {
        out[i] = 0.0f;
        q_sum += q[i];
    }
    for (int64_t start = lo; start < ctx; start += ATTN_CHUNK) {
        int64_t n = ctx - start < ATTN_CHUNK ? ctx - start : ATTN_CHUNK;
        float chunk_top = -INFINITY;
        for (int64_t t = 0; t < n; t++) {
            int64_t p = start + t;
            scores[t] = key_dot(m, l, kv_head, table[p / bs], p % bs, q, q_sum) * m->scale;
            if (scores[t] > chunk_top) chunk_top = scores[t];
        }
        float new_top = chunk_top > top ? chunk_top : top;
        float rescale = expf(top - new_top); /* 0 on the first chunk (top = -inf) */
        total *= rescale;
        for (int64_t i = 0; i < d; i++) out[i] *= rescale;
        top = new_top;
        exp_shifted(scores, scores, n, top);
        for (int64_t t = 0; t < n; t++) {
            int64_t p = start + t;
            total += scores[t];
            value_add(m, l, kv_head, table[p / bs], p % bs, scores[t], out);
        }
    }
    for (int64_t i = 0; i < d; i++) out[i] /= total;
}

/* 1 when built with the AVX512-BF16 GEMM tiles; 0 for the portable loops (correct, but slower than
 * PyTorch's kernels, so the engine only picks them when asked). */
int slim_fast_path(void) {
#ifdef __AVX512BF16__
    return 1;
#else
    return 0;
#endif
}

/* Floats of scratch `work` must hold for a step of `batch` sequences (one or more). */
int64_t slim_work_floats(const slim_model *m, int64_t batch) {
    int64_t qkv = (m->heads + 2 * m->kv_heads) * m->head_dim;
    int64_t widest = m->inter > m->hidden ? m->inter : m->hidden;
    if (m->heads * m->head_dim > widest) widest = m->heads * m->head_dim;
    int64_t per_seq = 2 * m->hidden + qkv + m->heads * m->head_dim + 2 * m->inter;
    return batch * per_seq + (batch * widest + 1) / 2; /* + the bf16 copy of a GEMM's input */
}

/* Round rows of float32 activations to bf16: the GEMM input (AVX512-BF16 multiplies bf16 pairs). */
static void to_bf16_rows(const float *x, bf16 *out, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = f32_to_bf16(x[i]);
}

#ifdef __AVX512BF16__
/* A tile of nr (<= 4) weight rows x nb (<= 4) sequences: up to 16 accumulators, each weight vector
 * used for every sequence of the tile. Inlined with constant nr/nb, so the arrays live in registers.
 * 4-row tiles prefetch the rows after them: without it they wait on memory (84 against 132 GMAC/s at
 * 16 sequences); single rows stream in address order, which the hardware prefetcher already follows. */
#define PREFETCH_ROWS 8
#ifndef ROW_TILE_BATCH
#define ROW_TILE_BATCH 8
#endif
static inline __attribute__((always_inline)) void gemm_tile(const bf16 *w, const bf16 *xb, float *y, int64_t ldy,
                                                            int64_t k_len, const int nr, const int nb) {
    __m512 acc[4][4];
#pragma GCC unroll 4
    for (int r = 0; r < nr; r++)
#pragma GCC unroll 4
        for (int c = 0; c < nb; c++) acc[r][c] = _mm512_setzero_ps();
    int64_t full = k_len & ~(int64_t)31;
    for (int64_t k = 0; k < full; k += 32) {
        __m512i wv[4], xv[4];
#pragma GCC unroll 4
        for (int r = 0; r < nr; r++) {
            wv[r] = _mm512_loadu_si512((const void *)(w + r * k_len + k));
            if (nr == 4) _mm_prefetch((const char *)(w + (r + PREFETCH_ROWS) * k_len + k), _MM_HINT_T0);
        }
#pragma GCC unroll 4
        for (int c = 0; c < nb; c++) xv[c] = _mm512_loadu_si512((const void *)(xb + c * k_len + k));
#pragma GCC unroll 4
        for (int r = 0; r < nr; r++)
#pragma GCC unroll 4
            for (int c = 0; c < nb; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], (__m512bh)xv[c], (__m512bh)wv[r]);
    }
    if (full < k_len) { /* a K that is not a multiple of 32: masked loads read zeros past the end */
        __mmask32 mask = (__mmask32)((1ull << (k_len - full)) - 1);
#pragma GCC unroll 4
        for (int r = 0; r < nr; r++)
#pragma GCC unroll 4
            for (int c = 0; c < nb; c++)
                acc[r][c] = _mm512_dpbf16_ps(acc[r][c], (__m512bh)_mm512_maskz_loadu_epi16(mask, xb + c * k_len + full),
                                             (__m512bh)_mm512_maskz_loadu_epi16(mask, w + r * k_len + full));
    }
#pragma GCC unroll 4
    for (int r = 0; r < nr; r++)
#pragma GCC unroll 4
        for (int c = 0; c < nb; c++) y[c * ldy + r] = _mm512_reduce_add_ps(acc[r][c]);
}

/* NR (a constant: 1 or 4) weight rows at w for every sequence of the step, 4 sequences per tile; the
 * remainder tile keeps its own constant width so every call is specialised. */
#define TILES_OVER_SEQUENCES(NR)                                                                     \
    do {                                                                                             \
        int64_t b0 = 0;                                                                              \
        for (; b0 + 4 <= batch; b0 += 4) gemm_tile(w, xb + b0 * k, y + b0 * ldy, ldy, k, NR, 4);    \
        switch (batch - b0) {                                                                        \
        case 3: gemm_tile(w, xb + b0 * k, y + b0 * ldy, ldy, k, NR, 3); break;                       \
        case 2: gemm_tile(w, xb + b0 * k, y + b0 * ldy, ldy, k, NR, 2); break;                       \
        case 1: gemm_tile(w, xb + b0 * k, y + b0 * ldy, ldy, k, NR, 1); break;                       \
        }                                                                                            \
    } while (0)

/* One weight row for every sequence of the step. */
static void gemm_row(const bf16 *w, const bf16 *xb, float *y, int64_t ldy, int64_t k, int64_t batch) {
    TILES_OVER_SEQUENCES(1);
}

/* Up to 4 weight rows for every sequence of the step (large batches). */
static void gemm_rows(const bf16 *w, const bf16 *xb, float *y, int64_t ldy, int64_t k, int64_t nr, int64_t batch) {
    if (nr < 4) {
        for (int64_t r = 0; r < nr; r++) gemm_row(w + r * k, xb, y + r, ldy, k, batch);
        return;
    }
    TILES_OVER_SEQUENCES(4);
}
#endif

/* y[b, n] = W[n, :] . xb[b, :] for b < batch; W [rows, k] bf16, xb [batch, k] bf16, y row stride ldy.
 * Each weight tile is read once per step and used for every sequence (from L1 after the first). */
static void gemm(const bf16 *w, const bf16 *xb, float *y, int64_t ldy, int64_t batch, int64_t rows, int64_t k,
                 int threads) {
#ifdef __AVX512BF16__
    if (batch < ROW_TILE_BATCH) { /* bandwidth-bound: one row at a time streams memory in order */
#pragma omp parallel for num_threads(threads) schedule(guided, 32)
        for (int64_t n = 0; n < rows; n++) gemm_row(w + n * k, xb, y + n, ldy, k, batch);
        return;
    }
#pragma omp parallel for num_threads(threads) schedule(guided, 8)
    for (int64_t n0 = 0; n0 < rows; n0 += 4)
        gemm_rows(w + n0 * k, xb, y + n0, ldy, k, rows - n0 < 4 ? rows - n0 : 4, batch);
#else
#pragma omp parallel for num_threads(threads) schedule(guided, 32)
    for (int64_t n = 0; n < rows; n++)
        for (int64_t b = 0; b < batch; b++) {
            float s = 0.0f;
            for (int64_t i = 0; i < k; i++) s += bf16_to_f32(w[n * k + i]) * bf16_to_f32(xb[b * k + i]);
            y[b * ldy + n] = s;
        }
#endif
}

/* One new token for each of `batch` sequences (the cache holds each one's earlier positions). tokens/positions [batch]; cos/ssin [batch, head_dim];
 * tables [batch, n_table] (each sequence's block table, padded); logits [batch, vocab]. The float32
 * activations are rounded to bf16 at each weight GEMM's input, as PyTorch's bf16 path does.
 * Returns 0, or 1 when a position is outside the scratch or its table. */
int slim_decode(const slim_model *m, int64_t batch, const int64_t *tokens, const int64_t *positions,
                      const float *cos, const float *ssin, const int64_t *tables, int64_t n_table,
                      float *logits) {
    int64_t d = m->head_dim, h = m->heads, kvh = m->kv_heads, hid = m->hidden, inter = m->inter;
    int64_t nqkv = (h + 2 * kvh) * d;
    for (int64_t b = 0; b < batch; b++) {
        if (positions[b] < 0 || positions[b] + 1 > m->max_ctx || positions[b] / m->block_size >= n_table ||
            tokens[b] < 0 || tokens[b] >= m->vocab)
            return 1;
        for (int64_t i = 0; i <= positions[b] / m->block_size; i++) /* every block the step touches */
            if (tables[b * n_table + i] < 0 || tables[b * n_table + i] >= m->num_blocks) return 1;
    }
    int threads = (int)m->threads;
    float *x = m->work, *hn = x + batch * hid, *qkv = hn + batch * hid, *attn = qkv + batch * nqkv;
    float *gate_up = attn + batch * h * d;
    bf16 *xb = (bf16 *)(gate_up + batch * 2 * inter);

    for (int64_t b = 0; b < batch; b++)
        for (int64_t i = 0; i < hid; i++) x[b * hid + i] = bf16_to_f32(m->embed[tokens[b] * hid + i]);
    for (int64_t li = 0; li < m->layers; li++) {
        const slim_layer *l = &m->layer[li];
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t b = 0; b < batch; b++) {
            rms_norm(x + b * hid, l->in_norm, hn + b * hid, hid, m->eps);
            to_bf16_rows(hn + b * hid, xb + b * hid, hid);
        }
        gemm(l->qkv_w, xb, qkv, nqkv, batch, nqkv, hid, threads);
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t b = 0; b < batch; b++) {
            float *row = qkv + b * nqkv;
            if (l->qkv_b)
                for (int64_t i = 0; i < nqkv; i++) row[i] += bf16_to_f32(l->qkv_b[i]);
            for (int64_t j = 0; j < h + kvh; j++) rotate(row + j * d, cos + b * d, ssin + b * d, d);
            if (m->rotation) /* quantized pools hold K and V turned: q turns with them, out turns back */
                for (int64_t j = 0; j < h + 2 * kvh; j++) turn(row + j * d, m->rotation, d, 0);
            int64_t pos = positions[b], block = tables[b * n_table + pos / m->block_size];
            for (int64_t g = 0; g < kvh; g++)
                kv_write(m, l, g, block, pos % m->block_size, row + (h + g) * d, row + (h + kvh + g) * d);
        }
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
        for (int64_t bj = 0; bj < batch * h; bj++) {
            int64_t b = bj / h, j = bj % h, ctx = positions[b] + 1;
            int64_t lo = (m->window > 0 && ctx > m->window) ? ctx - m->window : 0;
            attend_head(m, l, qkv + b * nqkv + j * d, j / (h / kvh), tables + b * n_table, lo, ctx,
                        attn + b * h * d + j * d);
            if (m->rotation) turn(attn + b * h * d + j * d, m->rotation, d, 1);
        }
        to_bf16_rows(attn, xb, batch * h * d);
        gemm(l->o_w, xb, hn, hid, batch, hid, h * d, threads);
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t b = 0; b < batch; b++) {
            for (int64_t i = b * hid; i < (b + 1) * hid; i++) x[i] += hn[i];
            rms_norm(x + b * hid, l->post_norm, hn + b * hid, hid, m->eps);
            to_bf16_rows(hn + b * hid, xb + b * hid, hid);
        }
        gemm(l->gate_up_w, xb, gate_up, 2 * inter, batch, 2 * inter, hid, threads);
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t b = 0; b < batch; b++)
            swiglu_bf16(gate_up + b * 2 * inter, gate_up + b * 2 * inter + inter, xb + b * inter, inter);
        gemm(l->down_w, xb, hn, hid, batch, hid, inter, threads);
        for (int64_t i = 0; i < batch * hid; i++) x[i] += hn[i];
    }
    for (int64_t b = 0; b < batch; b++) rms_norm(x + b * hid, m->final_norm, hn + b * hid, hid, m->eps);
    to_bf16_rows(hn, xb, batch * hid);
    gemm(m->lm_head, xb, logits, m->vocab, batch, m->vocab, hid, threads);
    return 0;
}
