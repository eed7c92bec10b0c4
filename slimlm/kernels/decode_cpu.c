/* One-token decode of a Llama-family model (Llama, Mistral, Qwen2) on CPU, the whole model in one call.
 *
 * Why: eager PyTorch spends ~9 ms of a ~20 ms SmolLM2 token on ~1,600 small ops (norms, rotary,
 * cache writes, attention, residuals) and their Python dispatch. Here every layer is plain loops
 * between the weight GEMVs, so the token costs little more than streaming the weights once.
 *
 * Numerics: bf16 weights and bf16 paged KV (the engine's own pool, same layout), float32 activations
 * and accumulation throughout (HF rounds activations to bf16 between ops; this keeps them in float32,
 * closer to a float32 run of the same bf16 weights).
 *
 * Threads: GEMV rows and attention heads are split over OpenMP threads. The library links the
 * libgomp that torch already loaded (same soname), so both share one thread pool.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

typedef uint16_t bf16;

typedef struct {
    const bf16 *qkv_w;     /* [(H + 2 KVH) * D, hidden]: q, k, v rows stacked */
    const bf16 *qkv_b;     /* [(H + 2 KVH) * D] or NULL (Qwen2 has a q/k/v bias) */
    const bf16 *o_w;       /* [hidden, H * D] */
    const bf16 *gate_up_w; /* [2 * inter, hidden]: gate rows, then up rows */
    const bf16 *down_w;    /* [hidden, inter] */
    const bf16 *in_norm;   /* [hidden] */
    const bf16 *post_norm; /* [hidden] */
    bf16 *k_cache;         /* this layer's K pool [KVH, num_blocks, block_size, D] */
    bf16 *v_cache;
} slim_layer;

typedef struct {
    int64_t hidden, inter, heads, kv_heads, head_dim, layers, vocab;
    int64_t block_size, num_blocks, window, max_ctx, threads;
    float eps, scale;
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

/* dot(w[0..k), x[0..k)) with w in bf16, x and the sum in float32. */
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

/* y[n] = W[n, :] . x (+ b[n]), W [rows, k] bf16 row-major; rows split over threads. */
static void gemv(const bf16 *w, const bf16 *b, const float *x, float *y, int64_t rows, int64_t k, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < rows; n++) y[n] = dot_bf16(w + n * k, x, k) + (b ? bf16_to_f32(b[n]) : 0.0f);
}

/* x[n] += W[n, :] . a: the residual add folded into the output projection. */
static void gemv_add(const bf16 *w, const float *a, float *x, int64_t rows, int64_t k, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < rows; n++) x[n] += dot_bf16(w + n * k, a, k);
}

/* act[i] = silu(gate_i . x) * (up_i . x): both rows of an i land on the same thread. */
static void gemv_swiglu(const bf16 *w, const float *x, float *act, int64_t inter, int64_t k, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < inter; i++) {
        float g = dot_bf16(w + i * k, x, k);
        float u = dot_bf16(w + (i + inter) * k, x, k);
        act[i] = g / (1.0f + expf(-g)) * u;
    }
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

static inline int64_t slot_offset(const slim_model *m, int64_t kv_head, int64_t block, int64_t offset) {
    return ((kv_head * m->num_blocks + block) * m->block_size + offset) * m->head_dim;
}

/* One query head over positions [lo, ctx) of its KV head, read through the block table. */
static void attend_head(const slim_model *m, const slim_layer *l, const float *q, int64_t kv_head,
                        const int64_t *table, int64_t lo, int64_t ctx, float *scores, float *out) {
    int64_t d = m->head_dim, bs = m->block_size;
    float top = -INFINITY;
    for (int64_t t = lo; t < ctx; t++) {
        const bf16 *k = l->k_cache + slot_offset(m, kv_head, table[t / bs], t % bs);
        float s = dot_bf16(k, q, d) * m->scale;
        scores[t - lo] = s;
        if (s > top) top = s;
    }
    float total = 0.0f;
    for (int64_t t = 0; t < ctx - lo; t++) {
        scores[t] = expf(scores[t] - top);
        total += scores[t];
    }
    for (int64_t i = 0; i < d; i++) out[i] = 0.0f;
    for (int64_t t = lo; t < ctx; t++) {
        const bf16 *v = l->v_cache + slot_offset(m, kv_head, table[t / bs], t % bs);
        float p = scores[t - lo] / total;
        for (int64_t i = 0; i < d; i++) out[i] += p * bf16_to_f32(v[i]);
    }
}

/* Floats of scratch `work` must hold. */
int64_t slim_work_floats(const slim_model *m) {
    int64_t qkv = (m->heads + 2 * m->kv_heads) * m->head_dim;
    return 2 * m->hidden + qkv + m->heads * m->head_dim + m->inter + m->heads * m->max_ctx;
}

/* Decode one token at position `pos` (the cache holds positions 0..pos-1 already) and write its
 * float32 logits. cos/ssin: [head_dim] for `pos` (signed sin, rope.py). table: the sequence's block
 * table, n_table entries. Returns 0, or 1 when pos is outside the scratch / the table. */
int slim_decode(const slim_model *m, int64_t token, int64_t pos, const float *cos, const float *ssin,
                const int64_t *table, int64_t n_table, float *logits) {
    int64_t ctx = pos + 1, d = m->head_dim, h = m->heads, kvh = m->kv_heads, hid = m->hidden;
    if (pos < 0 || ctx > m->max_ctx || (pos / m->block_size) >= n_table || token < 0 || token >= m->vocab)
        return 1;
    int threads = (int)m->threads;
    float *x = m->work, *hn = x + hid, *qkv = hn + hid, *attn = qkv + (h + 2 * kvh) * d;
    float *act = attn + h * d, *scores = act + m->inter;
    int64_t lo = (m->window > 0 && ctx > m->window) ? ctx - m->window : 0;
    int64_t block = table[pos / m->block_size], offset = pos % m->block_size;

    for (int64_t i = 0; i < hid; i++) x[i] = bf16_to_f32(m->embed[token * hid + i]);
    for (int64_t li = 0; li < m->layers; li++) {
        const slim_layer *l = &m->layer[li];
        rms_norm(x, l->in_norm, hn, hid, m->eps);
        gemv(l->qkv_w, l->qkv_b, hn, qkv, (h + 2 * kvh) * d, hid, threads);
        for (int64_t j = 0; j < h + kvh; j++) rotate(qkv + j * d, cos, ssin, d);  /* q heads, then k heads */
        for (int64_t g = 0; g < kvh; g++) {
            const float *k = qkv + (h + g) * d, *v = qkv + (h + kvh + g) * d;
            bf16 *kd = l->k_cache + slot_offset(m, g, block, offset);
            bf16 *vd = l->v_cache + slot_offset(m, g, block, offset);
            for (int64_t i = 0; i < d; i++) {
                kd[i] = f32_to_bf16(k[i]);
                vd[i] = f32_to_bf16(v[i]);
            }
        }
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t j = 0; j < h; j++)
            attend_head(m, l, qkv + j * d, j / (h / kvh), table, lo, ctx, scores + j * m->max_ctx, attn + j * d);
        gemv_add(l->o_w, attn, x, hid, h * d, threads);
        rms_norm(x, l->post_norm, hn, hid, m->eps);
        gemv_swiglu(l->gate_up_w, hn, act, m->inter, hid, threads);
        gemv_add(l->down_w, act, x, hid, m->inter, threads);
    }
    rms_norm(x, m->final_norm, hn, hid, m->eps);
    gemv(m->lm_head, NULL, hn, logits, m->vocab, hid, threads);
    return 0;
}
