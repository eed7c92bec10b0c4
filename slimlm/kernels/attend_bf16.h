/* Decode attention over the bf16 paged pool, the query heads of one KV head together (GQA).
 *
 * Why: attend_head (kv_pool.h) runs each query head alone, so every head of a KV group reads and
 * widens the same keys and values to float32 again; at 16 sequences that was about a third of a w4
 * decode step of SmolLM2 (3 query heads per KV head). Here 16 keys are widened once into a float32
 * tile that every head of the group scores against, and each widened value vector feeds every head,
 * with the accumulators in registers.
 *
 * Same numbers as attend_head: every score, softmax and value sum is the same float operations in the
 * same order, so the logits do not change (and stay independent of the other sequences of the step).
 * (Scoring with q rounded to bf16 on vdpbf16ps was tried: faster still, but it moved greedy text off
 * the float32 reference at a near-tie on a tiny Gemma 3 model, so it was left out.) */
#pragma once
#include "kv_pool.h"

#ifdef __AVX512BF16__
#define GROUP_MAX 4 /* heads a pass holds: 4 heads x 4 float32 vectors of the output in registers */

/* q . k for 16 keys already widened to float32 (kw [16, d], d a multiple of 16): the same
 * instructions as kv_pool.h's key_dots16, so the same scores. */
static inline void key_dots16_f32(const float *kw, const float *q, int64_t d, float *out) {
    __m512 acc[16];
    for (int r = 0; r < 16; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t i = 0; i < d; i += 16) {
        __m512 qv = _mm512_loadu_ps(q + i);
        for (int r = 0; r < 16; r++) acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(kw + r * d + i), qv, acc[r]);
    }
    _mm512_storeu_ps(out, sum16x16(acc));
}

/* out[h, :16 nc] += sum_t p[h][t] v[t, :16 nc] for nh heads over n positions from start (v: the pool
 * at the first channel, out: at the first channel, row stride d). */
static inline __attribute__((always_inline)) void values_tile(const slim_model *m, const bf16 *v,
                                                             float scores[][ATTN_CHUNK], int64_t start, int64_t n,
                                                             int64_t kv_head, const int64_t *table, float *out,
                                                             const int nh, const int nc) {
    int64_t d = m->head_dim, bs = m->block_size;
    __m512 acc[GROUP_MAX][4];
    for (int h = 0; h < nh; h++)
        for (int c = 0; c < nc; c++) acc[h][c] = _mm512_loadu_ps(out + h * d + 16 * c);
    for (int64_t t = 0; t < n; t++) {
        int64_t p = start + t;
        const bf16 *row = v + slot_offset(m, kv_head, table[p / bs], p % bs);
        for (int c = 0; c < nc; c++) {
            __m512 vv = bf16x16_to_ps(_mm256_loadu_si256((const __m256i *)(row + 16 * c)));
            for (int h = 0; h < nh; h++) /* multiply, then add: attend_head's value_add rounds twice too */
                acc[h][c] = _mm512_add_ps(acc[h][c], _mm512_mul_ps(_mm512_set1_ps(scores[h][t]), vv));
        }
    }
    for (int h = 0; h < nh; h++)
        for (int c = 0; c < nc; c++) _mm512_storeu_ps(out + h * d + 16 * c, acc[h][c]);
}

/* nh (<= GROUP_MAX) query heads q [nh, d] of KV head kv_head over positions [lo, ctx) -> out [nh, d].
 * d is a multiple of 16. Online softmax over chunks of ATTN_CHUNK positions, as attend_head. */
static void attend_heads_bf16(const slim_model *m, const slim_layer *l, const float *q, int64_t nh, int64_t kv_head,
                              const int64_t *table, int64_t lo, int64_t ctx, float *out) {
    int64_t d = m->head_dim, bs = m->block_size;
    float kw[16 * MAX_HEAD_DIM];
    float scores[GROUP_MAX][ATTN_CHUNK], top[GROUP_MAX], total[GROUP_MAX];
    const bf16 *kc = (const bf16 *)l->k_cache, *vc = (const bf16 *)l->v_cache;
    for (int64_t h = 0; h < nh; h++) {
        for (int64_t i = 0; i < d; i++) out[h * d + i] = 0.0f;
        top[h] = -INFINITY;
        total[h] = 0.0f;
    }
    for (int64_t start = lo; start < ctx; start += ATTN_CHUNK) {
        int64_t n = ctx - start < ATTN_CHUNK ? ctx - start : ATTN_CHUNK;
        for (int64_t t = 0; t < n;) {
            int64_t p = start + t;
            const bf16 *k = kc + slot_offset(m, kv_head, table[p / bs], p % bs);
            if (p % 16 == 0 && bs % 16 == 0 && t + 16 <= n) { /* 16 keys of one block: widened once */
                for (int64_t i = 0; i < 16 * d; i += 16)
                    _mm512_storeu_ps(kw + i, bf16x16_to_ps(_mm256_loadu_si256((const __m256i *)(k + i))));
                for (int64_t h = 0; h < nh; h++) key_dots16_f32(kw, q + h * d, d, scores[h] + t);
                t += 16;
            } else {
                for (int64_t h = 0; h < nh; h++) scores[h][t] = dot_bf16(k, q + h * d, d);
                t++;
            }
        }
        for (int64_t h = 0; h < nh; h++) {
            float chunk_top = -INFINITY;
            for (int64_t t = 0; t < n; t++) {
                scores[h][t] *= m->scale;
                if (scores[h][t] > chunk_top) chunk_top = scores[h][t];
            }
            float new_top = chunk_top > top[h] ? chunk_top : top[h];
            float rescale = expf(top[h] - new_top); /* 0 on the first chunk (top = -inf) */
            total[h] *= rescale;
            for (int64_t i = 0; i < d; i++) out[h * d + i] *= rescale;
            top[h] = new_top;
            exp_shifted(scores[h], scores[h], n, top[h]);
            for (int64_t t = 0; t < n; t++) total[h] += scores[h][t];
        }
        /* out[h] += p[h][t] v[t]: 64 channels at a time, each widened value vector used by every head */
        for (int64_t i0 = 0; i0 < d; i0 += 64) {
            int nc = d - i0 >= 64 ? 4 : (int)((d - i0) / 16);
            const bf16 *v = vc + i0;
            float *o = out + i0;
            if (nc == 4) switch (nh) { /* constant shapes: the accumulators stay in registers */
                case 1: values_tile(m, v, scores, start, n, kv_head, table, o, 1, 4); break;
                case 2: values_tile(m, v, scores, start, n, kv_head, table, o, 2, 4); break;
                case 3: values_tile(m, v, scores, start, n, kv_head, table, o, 3, 4); break;
                default: values_tile(m, v, scores, start, n, kv_head, table, o, 4, 4); break;
                }
            else
                values_tile(m, v, scores, start, n, kv_head, table, o, (int)nh, nc);
        }
    }
    for (int64_t h = 0; h < nh; h++)
        for (int64_t i = 0; i < d; i++) out[h * d + i] /= total[h];
}

/* The `group` query heads of KV head kv_head (q and out [group, d]), GROUP_MAX at a time. */
static void attend_group_bf16(const slim_model *m, const slim_layer *l, const float *q, int64_t group,
                              int64_t kv_head, const int64_t *table, int64_t lo, int64_t ctx, float *out) {
    int64_t d = m->head_dim;
    for (int64_t h0 = 0; h0 < group; h0 += GROUP_MAX) {
        int64_t nh = group - h0 < GROUP_MAX ? group - h0 : GROUP_MAX;
        attend_heads_bf16(m, l, q + h0 * d, nh, kv_head, table, lo, ctx, out + h0 * d);
    }
}
#endif
