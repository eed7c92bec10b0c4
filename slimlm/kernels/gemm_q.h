/* Quantized weight GEMMs: int4 or int8 codes with a scale d and a float minimum m per (row, group of
 * 32, 64, 128 or the whole row), w = d * code + m. GGUF's Q4_1 is exactly this (Q4_0: m = -8 d, Q8_0:
 * code = q + 128, m = -128 d) and slimlm's integer zero points are m = -z d, so every source format
 * lands here without requantizing.
 *
 * Activations: each sequence's input row is quantized per block of 32 to int8 with a float scale s
 * (s = max|x| / 127), as llama.cpp's Q8 activations are. Per 32-block of a row,
 *     sum_i w_i x_i = s (d sum_i code_i q_i + m sum_i q_i),
 * the integer sum on AVX512-VNNI (vpdpbusd: unsigned codes times signed activations into int32).
 *
 * Layout: rows in tiles of 16, so one vpdpbusd multiplies 16 rows by 4 inputs (a broadcast int32 of
 * activations) and a tile's 16 sums stay in one register: no horizontal reductions. Per tile, per
 * 32-block of k: int8 holds 8 chunks of 64 bytes (chunk c: inputs 4c..4c+3, 4 bytes per row); int4
 * holds 4 chunks, byte (row r, j) of chunk c with input 8c + j in the low nibble and 8c + 4 + j in the
 * high one. Scales: per tile and group, 16 d then 16 m (fp16 where that is exact, else fp32).
 * slimlm/kernels/qweights.py packs and unpacks it.
 *
 * Batch invariance: a (row, sequence) sum is the same instructions whatever the tile of sequences. */
#pragma once
#include "gemm.h"
#include "model.h"
#include "numerics.h"

#define QBLOCK 32
#include "gemm_q5.h" /* GGUF Q5_0 blocks (bits 5): their own tiles, dispatched below */
#include "gemm_q6.h" /* GGUF Q6_K blocks (bits 6): likewise */

/* x[k] (read as x[perm[i]] under act-order) -> int8 q[k], per 32-block scale[k/32] and the block's
 * value sum[k/32] = scale * sum(q). The AVX-512 loop does the same float operations lane by lane
 * (one multiply by 127 / amax, round to nearest even as lrintf does), so both give the same codes. */
static void quantize_act_row(const float *x, const int32_t *perm, int64_t k, int8_t *q, float *scale, float *sum) {
#ifdef __AVX512F__
    if (!perm) {
        const __m512 sign = _mm512_set1_ps(-0.0f);
        for (int64_t b = 0; b < k / QBLOCK; b++) {
            __m512 v0 = _mm512_loadu_ps(x + b * QBLOCK), v1 = _mm512_loadu_ps(x + b * QBLOCK + 16);
            float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign, v0), _mm512_andnot_ps(sign, v1)));
            __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
            const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
            __m512i c0 = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v0, inv)), lo), hi);
            __m512i c1 = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v1, inv)), lo), hi);
            _mm_storeu_si128((__m128i *)(q + b * QBLOCK), _mm512_cvtepi32_epi8(c0));
            _mm_storeu_si128((__m128i *)(q + b * QBLOCK + 16), _mm512_cvtepi32_epi8(c1));
            scale[b] = amax / 127.0f;
            sum[b] = scale[b] * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(c0, c1));
        }
        return;
    }
#endif
    for (int64_t b = 0; b < k / QBLOCK; b++) {
        float v[QBLOCK], amax = 0.0f;
        for (int j = 0; j < QBLOCK; j++) {
            v[j] = perm ? x[perm[b * QBLOCK + j]] : x[b * QBLOCK + j];
            float a = fabsf(v[j]);
            amax = a > amax ? a : amax;
        }
        float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        int32_t total = 0;
        for (int j = 0; j < QBLOCK; j++) {
            int32_t c = (int32_t)lrintf(v[j] * inv);
            c = c > 127 ? 127 : (c < -127 ? -127 : c);
            q[b * QBLOCK + j] = (int8_t)c;
            total += c;
        }
        scale[b] = amax / 127.0f;
        sum[b] = scale[b] * (float)total;
    }
}

static inline int64_t qtile_bytes(const slim_weight *w) { return w->k * 16 * w->bits / 8; }

/* Code of (row, input i) and scale d (which 0) or minimum m (which 1) of (row, group g). */
static inline int qcode(const slim_weight *w, int64_t row, int64_t i) {
    const uint8_t *t = (const uint8_t *)w->data + (row / 16) * qtile_bytes(w);
    int64_t l = row % 16, blk = i / QBLOCK, j = i % QBLOCK;
    if (w->bits == 8) return t[blk * 512 + (j / 4) * 64 + l * 4 + j % 4];
    uint8_t byte = t[blk * 256 + (j / 8) * 64 + l * 4 + j % 4];
    return (j % 8) < 4 ? byte & 0xF : byte >> 4;
}

static inline float qscale(const slim_weight *w, int64_t row, int64_t g, int which) {
    int64_t idx = ((row / 16) * (w->k / w->group) + g) * 32 + which * 16 + row % 16;
    return w->scale_bits == 16 ? f16_to_f32(((const uint16_t *)w->scales)[idx]) : ((const float *)w->scales)[idx];
}

/* One table row as float32 (the embedding lookup), divided by div[i] where given. */
static void embed_row(const slim_weight *w, int64_t row, const float *div, float *out) {
    int64_t k = w->k;
    if (w->bits == 16) {
        for (int64_t i = 0; i < k; i++) out[i] = bf16_to_f32(((const bf16 *)w->data)[row * k + i]);
    } else if (w->bits == 6) {
        q6_embed_row(w, row, out);
    } else if (w->bits == 5) {
        q5_embed_row(w, row, out);
    } else {
        for (int64_t i = 0; i < k; i++) {
            int64_t g = i / w->group;
            out[i] = qscale(w, row, g, 0) * (float)qcode(w, row, i) + qscale(w, row, g, 1);
        }
    }
    if (div)
        for (int64_t i = 0; i < k; i++) out[i] /= div[i];
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
/* Software prefetch QPF bytes ahead in the code stream, into L2 (T1): at batch 1 the tile loop is
 * bound by how many lines are in flight, and L2 prefetches ahead of the hardware's own stream measured
 * faster than L1 (T0) ones 1-2 KiB ahead (figures: docs/engine.md, "w8 and w4 faster"). */
#ifndef QPF
#define QPF 4096
#endif
static inline int32_t load4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

static inline __attribute__((always_inline)) __m512 load_scales16(const void *s, int64_t idx, const int f16) {
    if (f16) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)s + idx)));
    return _mm512_loadu_ps((const float *)s + idx);
}

/* Tile `tile` (16 rows) for nb (<= 8) sequences: xq [nb, k], xs / xsum [nb, k / 32]. Inlined with
 * constant nb / four / f16, so the accumulators live in registers. */
static inline __attribute__((always_inline)) void qgemm_tile(const slim_weight *w, int64_t tile, const int8_t *xq,
                                                             const float *xs, const float *xsum, float *y, int64_t ldy,
                                                             int64_t nvalid, const int nb, const int four, const int f16) {
    int64_t k = w->k, nblk = k / QBLOCK, groups = k / w->group, bpg = w->group / QBLOCK;
    const uint8_t *codes = (const uint8_t *)w->data + tile * (k * (four ? 8 : 16));
    int64_t sbase = tile * groups * 32;
    const __m512i low = _mm512_set1_epi8(0x0F);
    __m512 acc[8];
#pragma GCC unroll 8
    for (int c = 0; c < nb; c++) acc[c] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m512 d = load_scales16(w->scales, sbase + g * 32, f16);
        __m512 m = load_scales16(w->scales, sbase + g * 32 + 16, f16);
        for (int64_t bb = 0; bb < bpg; bb++) {
            int64_t blk = g * bpg + bb;
            __m512i wv[8];
            if (four) {
                const uint8_t *p = codes + blk * 256;
#pragma GCC unroll 4
                for (int c = 0; c < 4; c++) _mm_prefetch((const char *)(p + QPF + 64 * c), _MM_HINT_T1);
#pragma GCC unroll 4
                for (int c = 0; c < 4; c++) {
                    __m512i v = _mm512_loadu_si512((const void *)(p + 64 * c));
                    wv[2 * c] = _mm512_and_si512(v, low);
                    wv[2 * c + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
                }
            } else {
                const uint8_t *p = codes + blk * 512;
#pragma GCC unroll 8
                for (int c = 0; c < 8; c++) _mm_prefetch((const char *)(p + QPF + 64 * c), _MM_HINT_T1);
#pragma GCC unroll 8
                for (int c = 0; c < 8; c++) wv[c] = _mm512_loadu_si512((const void *)(p + 64 * c));
            }
#pragma GCC unroll 8
            for (int c = 0; c < nb; c++) {
                const int8_t *x = xq + c * k + blk * QBLOCK;
                /* int4 chunk c holds inputs 8c..8c+3 (low) and 8c+4..8c+7 (high): wv[q] is inputs 4q..4q+3.
                 * One sequence: two chains for latency; more: one chain each (the sequences overlap).
                 * The int32 sum is exact either way, so the result does not depend on nb. */
                __m512i a0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv[0], _mm512_set1_epi32(load4(x)));
                if (nb == 1) {
                    __m512i a1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv[1], _mm512_set1_epi32(load4(x + 4)));
#pragma GCC unroll 4
                    for (int q = 2; q < 8; q += 2) {
                        a0 = _mm512_dpbusd_epi32(a0, wv[q], _mm512_set1_epi32(load4(x + 4 * q)));
                        a1 = _mm512_dpbusd_epi32(a1, wv[q + 1], _mm512_set1_epi32(load4(x + 4 * q + 4)));
                    }
                    a0 = _mm512_add_epi32(a0, a1);
                } else {
#pragma GCC unroll 8
                    for (int q = 1; q < 8; q++) a0 = _mm512_dpbusd_epi32(a0, wv[q], _mm512_set1_epi32(load4(x + 4 * q)));
                }
                acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a0), _mm512_mul_ps(d, _mm512_set1_ps(xs[c * nblk + blk])),
                                         acc[c]);
            }
        }
#pragma GCC unroll 8
        for (int c = 0; c < nb; c++) {
            float ms = 0.0f;
            for (int64_t bb = 0; bb < bpg; bb++) ms += xsum[c * nblk + g * bpg + bb];
            acc[c] = _mm512_fmadd_ps(m, _mm512_set1_ps(ms), acc[c]);
        }
    }
    __mmask16 mask = nvalid >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nvalid) - 1);
#pragma GCC unroll 8
    for (int c = 0; c < nb; c++) _mm512_mask_storeu_ps(y + c * ldy + tile * 16, mask, acc[c]);
}

/* Every sequence of the step on one tile, 8 at a time; each remainder width is its own specialisation
 * (FOR_TILES_OF_8, shared with the Q5_0 / Q6_K GEMMs). four / f16 are compile-time constants in each
 * function below, so the always-inlined tile is specialised on them as on nb. */
#define QTILE_CALL(NB) \
    qgemm_tile(w, t, xq + b0 * w->k, xs + b0 * nblk, xsum + b0 * nblk, y + b0 * ldy, ldy, nv, NB, four, f16)

#define QTILE_FN(NAME, FOUR, F16)                                                                        \
    static void NAME(const slim_weight *w, int64_t t, int64_t nv, const int8_t *xq, const float *xs,     \
                     const float *xsum, float *y, int64_t ldy, int64_t batch) {                          \
        const int four = FOUR, f16 = F16;                                                                \
        int64_t nblk = w->k / QBLOCK, b0 = 0;                                                            \
        FOR_TILES_OF_8(b0, batch, QTILE_CALL);                                                           \
    }
QTILE_FN(qtiles_4h, 1, 1)
QTILE_FN(qtiles_4f, 1, 0)
QTILE_FN(qtiles_8h, 0, 1)
QTILE_FN(qtiles_8f, 0, 0)
#include "gemm_qpanel.h" /* many rows: the same sums on panels of unpacked tiles */
#ifndef QPANEL_MIN_ROWS
#define QPANEL_MIN_ROWS 32
#endif
#endif

/* y[b, n] = W[n, :] . x[b, :] for quantized W, from the prepared activations of quantize_act_row. */
static void qgemm(const slim_weight *w, const int8_t *xq, const float *xs, const float *xsum, float *y, int64_t ldy,
                  int64_t batch, int threads) {
    if (w->bits == 6 || w->bits == 5) {
        (w->bits == 6 ? q6gemm : q5gemm)(w, xq, xs, y, ldy, batch, threads);
        return;
    }
    int64_t tiles = (w->rows + 15) / 16;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    if (batch >= QPANEL_MIN_ROWS && qgemm_rows(w, xq, xs, xsum, y, NULL, ldy, batch, threads)) return;
    int four = w->bits == 4, f16 = w->scale_bits == 16;
#pragma omp parallel for num_threads(threads) schedule(guided, 2)
    for (int64_t t = 0; t < tiles; t++) {
        int64_t nv = w->rows - t * 16 < 16 ? w->rows - t * 16 : 16;
        if (four && f16) qtiles_4h(w, t, nv, xq, xs, xsum, y, ldy, batch);
        else if (four) qtiles_4f(w, t, nv, xq, xs, xsum, y, ldy, batch);
        else if (f16) qtiles_8h(w, t, nv, xq, xs, xsum, y, ldy, batch);
        else qtiles_8f(w, t, nv, xq, xs, xsum, y, ldy, batch);
    }
#else
    int64_t k = w->k, nblk = k / QBLOCK, bpg = w->group / QBLOCK;
#pragma omp parallel for num_threads(threads) schedule(guided, 2)
    for (int64_t t = 0; t < tiles; t++)
        for (int64_t n = t * 16; n < w->rows && n < (t + 1) * 16; n++)
            for (int64_t b = 0; b < batch; b++) {
                float acc = 0.0f;
                for (int64_t g = 0; g < k / w->group; g++) {
                    float d = qscale(w, n, g, 0), ms = 0.0f;
                    for (int64_t bb = 0; bb < bpg; bb++) {
                        int64_t blk = g * bpg + bb;
                        int32_t dot = 0;
                        for (int64_t i = blk * QBLOCK; i < (blk + 1) * QBLOCK; i++) dot += qcode(w, n, i) * xq[b * k + i];
                        acc += (float)dot * (d * xs[b * nblk + blk]);
                        ms += xsum[b * nblk + blk];
                    }
                    acc += qscale(w, n, g, 1) * ms;
                }
                y[b * ldy + n] = acc;
            }
#endif
}

/* qgemm straight into bf16 outputs where the many-rows path runs (int4 / int8, from QPANEL_MIN_ROWS
 * rows, AVX512-VNNI); returns 0 (nothing written) elsewhere. */
static int qgemm_bf16_out(const slim_weight *w, const int8_t *xq, const float *xs, const float *xsum, bf16 *y,
                          int64_t ldy, int64_t batch, int threads) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    if ((w->bits == 4 || w->bits == 8) && batch >= QPANEL_MIN_ROWS)
        return qgemm_rows(w, xq, xs, xsum, NULL, y, ldy, batch, threads);
#endif
    (void)w, (void)xq, (void)xs, (void)xsum, (void)y, (void)ldy, (void)batch, (void)threads;
    return 0;
}

/* A GEMM's input in the form its weight reads: bf16 rows, or int8 blocks with scales and sums. */
typedef struct {
    bf16 *xb;
    int8_t *xq;
    float *xs, *xsum;
} slim_input;

/* Sequence b's input row x[w->k] prepared for weight w. */
static void prep_row(const slim_weight *w, const float *x, const slim_input *in, int64_t b) {
    int64_t k = w->k;
    if (w->bits == 16) to_bf16_rows(x, in->xb + b * k, k);
    else quantize_act_row(x, w->perm, k, in->xq + b * k, in->xs + b * (k / QBLOCK), in->xsum + b * (k / QBLOCK));
}

/* y[b, :rows] = W x_b for the step's prepared inputs. */
static void linear(const slim_weight *w, const slim_input *in, float *y, int64_t ldy, int64_t batch, int threads) {
    if (w->bits == 16) gemm((const bf16 *)w->data, in->xb, y, ldy, batch, w->rows, w->k, threads);
    else qgemm(w, in->xq, in->xs, in->xsum, y, ldy, batch, threads);
}
