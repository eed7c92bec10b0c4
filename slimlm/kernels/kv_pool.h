/* The engine's paged KV pools, read and written in place: the bf16 pool (slimlm/kv/paged.py) and the
 * int8/int4/k8v4 pools (slimlm/kv/quantized.py); and one query head's attention over a sequence's blocks. */
#pragma once
#include "model.h"
#include "numerics.h"

/* The bf16 pool: heads first, [KVH, blocks, block_size, D]. */
static inline int64_t slot_offset(const slim_model *m, int64_t kv_head, int64_t block, int64_t offset) {
    return ((kv_head * m->num_blocks + block) * m->block_size + offset) * m->head_dim;
}

/* The quantized pools: token major, [blocks, block_size, KVH]; codes take D * bits / 8 bytes. */
static inline int64_t token_head(const slim_model *m, int64_t kv_head, int64_t block, int64_t offset) {
    return (block * m->block_size + offset) * m->kv_heads + kv_head;
}

/* slimlm/kv/quant_ops.quantize for one vector: asymmetric codes over [min(x, 0), max(x, 0)] of each group
 * of `group` channels (0: the whole vector), an fp16 scale and a uint8 zero point per group; int4 puts
 * element i in the low nibble, i + D/2 in the high one. */
static void quantize_vector(const float *x, int64_t d, int bits, int64_t group, uint8_t *codes, uint16_t *scale,
                            uint8_t *zero) {
    float levels = (float)((1 << bits) - 1);
    int64_t gs = group ? group : d;
    uint8_t q[MAX_HEAD_DIM];
    for (int64_t g0 = 0, gi = 0; g0 < d; g0 += gs, gi++) {
        float lo = 0.0f, hi = 0.0f;
        for (int64_t i = g0; i < g0 + gs; i++) {
            if (x[i] < lo) lo = x[i];
            if (x[i] > hi) hi = x[i];
        }
        float s = (hi - lo) / levels;
        s = s < 5.9604644775390625e-8f ? 5.9604644775390625e-8f : (s > 65504.0f ? 65504.0f : s);
        scale[gi] = f32_to_f16(s);
        s = f16_to_f32(scale[gi]); /* quantize against the scale as stored */
        float z = rintf(-lo / s);
        z = z < 0.0f ? 0.0f : (z > levels ? levels : z);
        zero[gi] = (uint8_t)z;
        for (int64_t i = g0; i < g0 + gs; i++) {
            float c = rintf(x[i] / s + z);
            q[i] = (uint8_t)(c < 0.0f ? 0.0f : (c > levels ? levels : c));
        }
    }
    if (bits == 8) memcpy(codes, q, (size_t)d);
    else
        for (int64_t i = 0; i < d / 2; i++) codes[i] = (uint8_t)(q[i] | (q[i + d / 2] << 4));
}

static inline float code_at(const uint8_t *codes, int64_t i, int64_t d, int bits) {
    if (bits == 8) return (float)codes[i];
    return (float)(i < d / 2 ? codes[i] & 0xF : codes[i - d / 2] >> 4);
}

/* Scale groups per token and head of K (or V). */
static inline int64_t groups_of(const slim_model *m, int64_t group) { return group ? m->head_dim / group : 1; }

/* The int4 pool (slimlm/kv/kivi.py): a token of an unfinished block, in its staging slot. */
static inline bf16 *staged(const slim_model *m, bf16 *stage, int64_t block, int64_t g, int64_t offset) {
    int64_t slot = m->stage_of[block];
    return stage + ((slot * m->block_size + offset) * m->kv_heads + g) * m->head_dim;
}

/* The int4 pool's block `block` is full: quantize its staged tokens for KV head g. Keys get a scale and
 * zero per channel over the block (slimlm/kv/kivi.quantize_channels), values one per token and v_group. */
static void quantize_block(const slim_model *m, const slim_layer *l, int64_t g, int64_t block) {
    int64_t d = m->head_dim, bs = m->block_size;
    float x[MAX_HEAD_DIM];
    uint8_t q[MAX_HEAD_DIM];
    uint16_t *ks = l->k_scale + (block * m->kv_heads + g) * d;
    uint8_t *kz = l->k_zero + (block * m->kv_heads + g) * d;
    for (int64_t i = 0; i < d; i++) {
        float lo = 0.0f, hi = 0.0f;
        for (int64_t t = 0; t < bs; t++) {
            float v = bf16_to_f32(staged(m, l->k_stage, block, g, t)[i]);
            if (v < lo) lo = v;
            if (v > hi) hi = v;
        }
        float s = (hi - lo) / 15.0f;
        s = s < 5.9604644775390625e-8f ? 5.9604644775390625e-8f : (s > 65504.0f ? 65504.0f : s);
        ks[i] = f32_to_f16(s);
        s = f16_to_f32(ks[i]);
        float z = rintf(-lo / s);
        kz[i] = (uint8_t)(z < 0.0f ? 0.0f : (z > 15.0f ? 15.0f : z));
    }
    for (int64_t t = 0; t < bs; t++) {
        const bf16 *kt = staged(m, l->k_stage, block, g, t), *vt = staged(m, l->v_stage, block, g, t);
        int64_t th = token_head(m, g, block, t);
        uint8_t *codes = (uint8_t *)l->k_cache + th * (d / 2);
        for (int64_t i = 0; i < d; i++) {
            float c = rintf(bf16_to_f32(kt[i]) / f16_to_f32(ks[i]) + (float)kz[i]);
            q[i] = (uint8_t)(c < 0.0f ? 0.0f : (c > 15.0f ? 15.0f : c));
        }
        for (int64_t i = 0; i < d / 2; i++) codes[i] = (uint8_t)(q[i] | (q[i + d / 2] << 4));
        for (int64_t i = 0; i < d; i++) x[i] = bf16_to_f32(vt[i]);
        int64_t vg = groups_of(m, m->v_group);
        quantize_vector(x, d, 4, m->v_group, (uint8_t *)l->v_cache + th * (d / 2), l->v_scale + th * vg,
                        l->v_zero + th * vg);
    }
}

/* Write the K and V of the token at position pos (float32, RoPE applied, turned for quantized pools)
 * for one KV head. */
static void kv_write(const slim_model *m, const slim_layer *l, int64_t g, int64_t block, int64_t pos,
                     const float *k, const float *v) {
    int64_t d = m->head_dim, offset = pos % m->block_size;
    if (m->kv_bits == 16) {
        bf16 *kd = (bf16 *)l->k_cache + slot_offset(m, g, block, offset);
        bf16 *vd = (bf16 *)l->v_cache + slot_offset(m, g, block, offset);
        for (int64_t i = 0; i < d; i++) {
            kd[i] = f32_to_bf16(k[i]);
            vd[i] = f32_to_bf16(v[i]);
        }
        return;
    }
    if (m->key_channels) { /* staged in bf16 until the block is full, then quantized as a whole */
        bf16 *ks = staged(m, l->k_stage, block, g, offset), *vs = staged(m, l->v_stage, block, g, offset);
        for (int64_t i = 0; i < d; i++) {
            ks[i] = f32_to_bf16(k[i]);
            vs[i] = f32_to_bf16(v[i]);
        }
        /* a full block is quantized, but for the sequence's first (sink) blocks, which stay staged */
        if (offset == m->block_size - 1 && pos / m->block_size >= m->sink_blocks) quantize_block(m, l, g, block);
        return;
    }
    int64_t th = token_head(m, g, block, offset), kg = groups_of(m, m->k_group), vg = groups_of(m, m->v_group);
    quantize_vector(k, d, (int)m->k_bits, m->k_group, (uint8_t *)l->k_cache + th * (d * m->k_bits / 8),
                    l->k_scale + th * kg, l->k_zero + th * kg);
    quantize_vector(v, d, (int)m->v_bits, m->v_group, (uint8_t *)l->v_cache + th * (d * m->v_bits / 8),
                    l->v_scale + th * vg, l->v_zero + th * vg);
}

/* q . k for the key at (block, offset): for quantized keys, per scale group, s * (sum(c q) - z * sum(q));
 * q_sum[j] is the sum of q over group j. */
static inline float key_dot(const slim_model *m, const slim_layer *l, int64_t g, int64_t block, int64_t offset,
                            const float *q, const float *q_sum) {
    int64_t d = m->head_dim;
    if (m->kv_bits == 16) return dot_bf16((const bf16 *)l->k_cache + slot_offset(m, g, block, offset), q, d);
    int bits = (int)m->k_bits;
    int64_t th = token_head(m, g, block, offset), ng = groups_of(m, m->k_group), gs = d / ng;
    const uint8_t *c = (const uint8_t *)l->k_cache + th * (d * bits / 8);
    const uint16_t *sc = l->k_scale + th * ng;
    const uint8_t *zr = l->k_zero + th * ng;
    float total = 0.0f;
    for (int64_t j = 0; j < ng; j++) {
        float acc = 0.0f;
        for (int64_t i = j * gs; i < (j + 1) * gs; i++) acc += code_at(c, i, d, bits) * q[i];
        total += f16_to_f32(sc[j]) * (acc - (float)zr[j] * q_sum[j]);
    }
    return total;
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
    int bits = (int)m->v_bits;
    int64_t th = token_head(m, g, block, offset), ng = groups_of(m, m->v_group), gs = d / ng;
    const uint8_t *c = (const uint8_t *)l->v_cache + th * (d * bits / 8);
    for (int64_t j = 0; j < ng; j++) {
        float ps = p * f16_to_f32(l->v_scale[th * ng + j]), z = (float)l->v_zero[th * ng + j];
        for (int64_t i = j * gs; i < (j + 1) * gs; i++) out[i] += ps * (code_at(c, i, d, bits) - z);
    }
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

#ifdef __AVX512F__
/* r[i] = the sum of v[i]'s 16 lanes, for 16 vectors at once: halves added pairwise (256, then 128-bit),
 * then within 128-bit lanes; about 2 instructions per sum against ~8 for one reduction at a time. */
static inline __m512 sum16x16(const __m512 v[16]) {
    __m512 a[8], b[4];
    for (int k = 0; k < 8; k++) /* 128-bit lanes: [x0 + x2, x1 + x3, y0 + y2, y1 + y3] */
        a[k] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int k = 0; k < 4; k++) /* lane j now holds 4 partial sums of v[4k + j] */
        b[k] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    __m512 c0 = _mm512_add_ps(_mm512_unpacklo_ps(b[0], b[1]), _mm512_unpackhi_ps(b[0], b[1]));
    __m512 c1 = _mm512_add_ps(_mm512_unpacklo_ps(b[2], b[3]), _mm512_unpackhi_ps(b[2], b[3]));
    __m512 d = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(c0), _mm512_castps_pd(c1))),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(c0), _mm512_castps_pd(c1))));
    /* d[4j + e] is the sum of v[4e + j] */
    const __m512i order = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
    return _mm512_permutexvar_ps(order, d);
}

/* q . k for 16 consecutive keys of the bf16 pool (16 rows of d): one accumulator per key. */
static inline void key_dots16(const bf16 *k, const float *q, int64_t d, float *out) {
    __m512 acc[16];
    for (int r = 0; r < 16; r++) acc[r] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= d; i += 16) {
        __m512 qv = _mm512_loadu_ps(q + i);
        for (int r = 0; r < 16; r++)
            acc[r] = _mm512_fmadd_ps(bf16x16_to_ps(_mm256_loadu_si256((const __m256i *)(k + r * d + i))), qv, acc[r]);
    }
    if (i < d) {
        __mmask16 mask = (__mmask16)((1u << (d - i)) - 1);
        __m512 qv = _mm512_maskz_loadu_ps(mask, q + i);
        for (int r = 0; r < 16; r++)
            acc[r] = _mm512_fmadd_ps(bf16x16_to_ps(_mm256_maskz_loadu_epi16(mask, k + r * d + i)), qv, acc[r]);
    }
    _mm512_storeu_ps(out, sum16x16(acc));
}
#endif

/* One query head over positions [lo, ctx) of its KV head, read through the block table. Online
 * softmax over chunks of the context (running max and sum), so no scratch grows with the context. */
#define ATTN_CHUNK 256
static void attend_head(const slim_model *m, const slim_layer *l, const float *q, int64_t kv_head,
                        const int64_t *table, int64_t lo, int64_t ctx, float *out) {
    int64_t d = m->head_dim, bs = m->block_size;
    float scores[ATTN_CHUNK], top = -INFINITY, total = 0.0f, q_sum[MAX_HEAD_DIM];
    int64_t gs = m->kv_bits == 16 ? d : d / groups_of(m, m->k_group); /* channels per key scale */
    int64_t own = (ctx - 1) / bs, qs_block = -1; /* int4: the query's own block, the block qs is for */
    float qs[MAX_HEAD_DIM], q_off = 0.0f;
    for (int64_t i = 0; i < d; i++) {
        out[i] = 0.0f;
        if (i % gs == 0) q_sum[i / gs] = 0.0f;
        q_sum[i / gs] += q[i];
    }
    for (int64_t start = lo; start < ctx; start += ATTN_CHUNK) {
        int64_t n = ctx - start < ATTN_CHUNK ? ctx - start : ATTN_CHUNK;
        float chunk_top = -INFINITY;
        for (int64_t t = 0; t < n;) {
            int64_t p = start + t;
#ifdef __AVX512F__
            /* 16 keys that start a 16-aligned run of one bf16 block: scored together */
            if (m->kv_bits == 16 && p % 16 == 0 && bs % 16 == 0 && t + 16 <= n) {
                key_dots16((const bf16 *)l->k_cache + slot_offset(m, kv_head, table[p / bs], p % bs), q, d,
                           scores + t);
                for (int64_t j = t; j < t + 16; j++) {
                    scores[j] *= m->scale;
                    if (scores[j] > chunk_top) chunk_top = scores[j];
                }
                t += 16;
                continue;
            }
#endif
            if (m->key_channels) { /* own and sink blocks exact (staged), the others per-channel int4 */
                int64_t block = table[p / bs];
                if (p / bs == own || p / bs < m->sink_blocks) {
                    scores[t] = dot_bf16(staged(m, l->k_stage, block, kv_head, p % bs), q, d) * m->scale;
                } else {
                    if (block != qs_block) { /* q times this block's channel scales, and the zero term */
                        const uint16_t *ks = l->k_scale + (block * m->kv_heads + kv_head) * d;
                        const uint8_t *kz = l->k_zero + (block * m->kv_heads + kv_head) * d;
                        q_off = 0.0f;
                        for (int64_t i = 0; i < d; i++) {
                            qs[i] = q[i] * f16_to_f32(ks[i]);
                            q_off += (float)kz[i] * qs[i];
                        }
                        qs_block = block;
                    }
                    const uint8_t *c = (const uint8_t *)l->k_cache + token_head(m, kv_head, block, p % bs) * (d / 2);
                    float acc = 0.0f;
                    for (int64_t i = 0; i < d / 2; i++)
                        acc += (float)(c[i] & 0xF) * qs[i] + (float)(c[i] >> 4) * qs[i + d / 2];
                    scores[t] = (acc - q_off) * m->scale;
                }
            } else
                scores[t] = key_dot(m, l, kv_head, table[p / bs], p % bs, q, q_sum) * m->scale;
            if (scores[t] > chunk_top) chunk_top = scores[t];
            t++;
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
            if (m->key_channels && (p / bs == own || p / bs < m->sink_blocks)) {
                const bf16 *v = staged(m, l->v_stage, table[p / bs], kv_head, p % bs);
                for (int64_t i = 0; i < d; i++) out[i] += scores[t] * bf16_to_f32(v[i]);
            } else
                value_add(m, l, kv_head, table[p / bs], p % bs, scores[t], out);
        }
    }
    for (int64_t i = 0; i < d; i++) out[i] /= total;
}
