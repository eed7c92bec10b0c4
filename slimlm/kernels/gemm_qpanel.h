/* The int4 / int8 GEMM of gemm_q.h for many rows (prefill, wide batches): the same sums, reorganised.
 *
 * Why: gemm_q.h's tiles take 16 outputs x up to 8 rows and unpack each int4 code in registers for
 * every 8 rows; at 2,048 prefill rows that unpacking, the activation broadcasts (one per dpbusd) and
 * each tile's sweep over all rows' activations are what the time goes to. Here a panel of QP_TILES
 * tiles (16 outputs each) is unpacked once into an int8 scratch laid out as gemm_q.h's int8 tiles
 * (int8 weights are already in that form and are read in place), then a register block of
 * QP_TILES x QP_ROWS (tiles x rows) runs over every row: each activation broadcast feeds QP_TILES
 * vpdpbusd, each weight vector QP_ROWS.
 *
 * Bit-identical to gemm_q.h's tiles: per (row, output) the int32 sum of each 32-block is exact (any
 * order), and the float operations are the same ones in the same order (per 32-block one multiply
 * d * s and one fused multiply-add into the accumulator, per group one fused multiply-add of m by the
 * activations' summed values, accumulated from 0 in block order). tests/engine/test_qgemm_rows.py
 * compares the two paths bit for bit. */
#pragma once
#include <omp.h>
#include <stdlib.h>

#include "model.h"
#include "numerics.h"

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#ifndef QP_TILES
#define QP_TILES 2
#endif
#ifndef QP_ROWS
#define QP_ROWS 6 /* at most 8 */
#endif

/* The rows' activations regrouped QP_ROWS at a time, so the register block reads every row at a constant
 * offset from one pointer: per group of rows and 32-block, the 8 int32 words (4 codes each) of each
 * row interleaved ([q][row]), the rows' scales s ([row]), and per group of weights the activations'
 * summed values ms ([row]; accumulated from 0 in block order, as gemm_q.h's tiles do). Rows past the
 * end of the last group are zeros, computed and never stored. */
typedef struct {
    int32_t *x; /* [row groups][k / 32][8][QP_ROWS] */
    float *s;   /* [row groups][k / 32][QP_ROWS] */
    float *ms;  /* [row groups][k / group][QP_ROWS] */
} qp_acts;

static int qp_pack(const slim_weight *w, const int8_t *xq, const float *xs, const float *xsum, int64_t batch,
                   int threads, qp_acts *a) {
    int64_t k = w->k, nblk = k / QBLOCK, groups = k / w->group, bpg = w->group / QBLOCK;
    int64_t ngr = (batch + QP_ROWS - 1) / QP_ROWS;
    a->x = (int32_t *)calloc((size_t)(ngr * nblk * 8 * QP_ROWS), 4);
    a->s = (float *)calloc((size_t)(ngr * nblk * QP_ROWS), 4);
    a->ms = (float *)calloc((size_t)(ngr * groups * QP_ROWS), 4);
    if (!a->x || !a->s || !a->ms) return 0;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < batch; b++) {
        int64_t gr = b / QP_ROWS, r = b % QP_ROWS;
        for (int64_t blk = 0; blk < nblk; blk++) {
            for (int q = 0; q < 8; q++)
                a->x[((gr * nblk + blk) * 8 + q) * QP_ROWS + r] = load4(xq + b * k + blk * QBLOCK + 4 * q);
            a->s[(gr * nblk + blk) * QP_ROWS + r] = xs[b * nblk + blk];
        }
        for (int64_t g = 0; g < groups; g++) {
            float ms = 0.0f;
            for (int64_t bb = 0; bb < bpg; bb++) ms += xsum[b * nblk + g * bpg + bb];
            a->ms[(gr * groups + g) * QP_ROWS + r] = ms;
        }
    }
    return 1;
}

/* 16 floats rounded to bf16 as numerics.h's f32_to_bf16 does (nearest even, NaN kept quiet): the
 * bf16 output of the PyTorch path's bf16 models, bit for bit what rounding the float result would give. */
static inline __m256i qp_to_bf16(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb)), 16);
    __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                            _mm512_set1_epi32(0x7f800000));
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
    return _mm512_cvtepi32_epi16(r);
}

/* nt (<= QP_TILES) tiles of the panel x nr (<= QP_ROWS) rows of one row group. panel: int8-layout codes
 * of the nt tiles (pstride bytes apart); sc: the first tile's scales (sstride values to the next tile's);
 * x / s / ms: the row group's packed activations; y (float) or yb (bf16, where not NULL): its first
 * row's first output; the last tile stores nlast (<= 16) outputs. */
static inline __attribute__((always_inline)) void qpanel_block(const uint8_t *panel, int64_t pstride, const void *sc,
                                                               int64_t sstride, int64_t nblk, int64_t groups,
                                                               const int32_t *x, const float *s, const float *ms,
                                                               float *y, bf16 *yb, int64_t ldy, int64_t nlast,
                                                               const int nt, const int nr, const int f16) {
    int64_t bpg = nblk / groups;
    __m512 acc[QP_TILES][QP_ROWS];
#pragma GCC unroll 4
    for (int t = 0; t < nt; t++)
#pragma GCC unroll 8
        for (int r = 0; r < nr; r++) acc[t][r] = _mm512_setzero_ps();
    const uint8_t *p = panel;
    for (int64_t g = 0; g < groups; g++) {
        __m512 d[QP_TILES];
#pragma GCC unroll 4
        for (int t = 0; t < nt; t++) d[t] = load_scales16(sc, t * sstride + g * 32, f16);
        for (int64_t bb = 0; bb < bpg; bb++, p += 512, x += 8 * QP_ROWS, s += QP_ROWS) {
            __m512i ia[QP_TILES][QP_ROWS];
#pragma GCC unroll 8
            for (int q = 0; q < 8; q++) {
                __m512i wv[QP_TILES];
#pragma GCC unroll 4
                for (int t = 0; t < nt; t++) wv[t] = _mm512_loadu_si512((const void *)(p + t * pstride + 64 * q));
#pragma GCC unroll 8
                for (int r = 0; r < nr; r++) {
                    __m512i xb = _mm512_set1_epi32(x[q * QP_ROWS + r]);
#pragma GCC unroll 4
                    for (int t = 0; t < nt; t++)
                        ia[t][r] = _mm512_dpbusd_epi32(q ? ia[t][r] : _mm512_setzero_si512(), wv[t], xb);
                }
            }
#pragma GCC unroll 8
            for (int r = 0; r < nr; r++) {
                __m512 sv = _mm512_set1_ps(s[r]);
#pragma GCC unroll 4
                for (int t = 0; t < nt; t++)
                    acc[t][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[t][r]), _mm512_mul_ps(d[t], sv), acc[t][r]);
            }
        }
#pragma GCC unroll 8
        for (int r = 0; r < nr; r++) {
            __m512 msv = _mm512_set1_ps(ms[g * QP_ROWS + r]);
#pragma GCC unroll 4
            for (int t = 0; t < nt; t++)
                acc[t][r] = _mm512_fmadd_ps(load_scales16(sc, t * sstride + g * 32 + 16, f16), msv, acc[t][r]);
        }
    }
    __mmask16 last = nlast >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nlast) - 1);
#pragma GCC unroll 4
    for (int t = 0; t < nt; t++)
#pragma GCC unroll 8
        for (int r = 0; r < nr; r++) {
            __mmask16 mask = t == nt - 1 ? last : (__mmask16)0xFFFF;
            if (yb) _mm256_mask_storeu_epi16(yb + r * ldy + t * 16, mask, qp_to_bf16(acc[t][r]));
            else _mm512_mask_storeu_ps(y + r * ldy + t * 16, mask, acc[t][r]);
        }
}

/* Every row group through one panel; the last group at its own constant width. */
#define QP_CALL(NT, NR)                                                                                          \
    qpanel_block(panel, pstride, sc, sstride, nblk, groups, a->x + gr * nblk * 8 * QP_ROWS,                     \
                 a->s + gr * nblk * QP_ROWS, a->ms + gr * groups * QP_ROWS,                                     \
                 y ? y + gr * QP_ROWS * ldy + t0 * 16 : NULL, yb ? yb + gr * QP_ROWS * ldy + t0 * 16 : NULL,    \
                 ldy, nlast, NT, NR, f16)
#define QP_ROWS_OF(NT)                                                                                           \
    do {                                                                                                         \
        int64_t gr = 0;                                                                                          \
        for (; (gr + 1) * QP_ROWS <= batch; gr++) QP_CALL(NT, QP_ROWS);                                          \
        switch (batch - gr * QP_ROWS) {                                                                          \
        case 7: if (7 < QP_ROWS) QP_CALL(NT, 7 < QP_ROWS ? 7 : 1); break;                                        \
        case 6: if (6 < QP_ROWS) QP_CALL(NT, 6 < QP_ROWS ? 6 : 1); break;                                        \
        case 5: if (5 < QP_ROWS) QP_CALL(NT, 5 < QP_ROWS ? 5 : 1); break;                                        \
        case 4: if (4 < QP_ROWS) QP_CALL(NT, 4 < QP_ROWS ? 4 : 1); break;                                        \
        case 3: QP_CALL(NT, 3); break;                                                                           \
        case 2: QP_CALL(NT, 2); break;                                                                           \
        case 1: QP_CALL(NT, 1); break;                                                                           \
        }                                                                                                        \
    } while (0)

#define QP_FN(NAME, F16)                                                                                         \
    static void NAME(const slim_weight *w, int64_t t0, int64_t nt, const uint8_t *panel, const qp_acts *a,       \
                     float *y, bf16 *yb, int64_t ldy, int64_t batch) {                                           \
        const int f16 = F16;                                                                                     \
        int64_t k = w->k, nblk = k / QBLOCK, groups = k / w->group, pstride = k * 16, sstride = groups * 32;     \
        int64_t nlast = w->rows - (t0 + nt - 1) * 16 < 16 ? w->rows - (t0 + nt - 1) * 16 : 16;                   \
        const void *sc = f16 ? (const void *)((const uint16_t *)w->scales + t0 * sstride)                        \
                             : (const void *)((const float *)w->scales + t0 * sstride);                          \
        if (nt == QP_TILES) QP_ROWS_OF(QP_TILES);                                                                \
        else QP_ROWS_OF(1);                                                                                      \
    }
QP_FN(qpanel_rows_h, 1)
QP_FN(qpanel_rows_f, 0)

/* int4 tile codes -> gemm_q.h's int8 tile layout (chunk 2c: the low nibbles of int4 chunk c, 2c + 1: the
 * high ones), nt tiles from tile t0, into out (64-byte aligned). */
static void qpanel_unpack4(const slim_weight *w, int64_t t0, int64_t nt, uint8_t *out) {
    int64_t k = w->k, nblk = k / QBLOCK;
    const uint8_t *codes = (const uint8_t *)w->data + t0 * (k * 8);
    const __m512i low = _mm512_set1_epi8(0x0F);
    for (int64_t b = 0; b < nt * nblk; b++)
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) {
            __m512i v = _mm512_loadu_si512((const void *)(codes + b * 256 + 64 * c));
            _mm512_store_si512((void *)(out + b * 512 + 128 * c), _mm512_and_si512(v, low));
            _mm512_store_si512((void *)(out + b * 512 + 128 * c + 64), _mm512_and_si512(_mm512_srli_epi16(v, 4), low));
        }
}

/* y[b, n] = W[n, :] . x[b, :] for int4 / int8 W (bits 4 or 8) over many rows; see the top of the file.
 * Into y (float), or rounded to bf16 into yb where yb is not NULL. Returns 0 (nothing written) when its
 * scratch cannot be allocated. */
static int qgemm_rows(const slim_weight *w, const int8_t *xq, const float *xs, const float *xsum, float *y, bf16 *yb,
                      int64_t ldy, int64_t batch, int threads) {
    int64_t tiles = (w->rows + 15) / 16, panels = (tiles + QP_TILES - 1) / QP_TILES, k = w->k;
    int64_t per_panel = QP_TILES * k * 16; /* a multiple of 64: k is a multiple of 32 */
    int four = w->bits == 4, f16 = w->scale_bits == 16;
    qp_acts a;
    uint8_t *scratch = four ? (uint8_t *)aligned_alloc(64, (size_t)(threads * per_panel)) : NULL;
    int ok = qp_pack(w, xq, xs, xsum, batch, threads, &a) && (scratch || !four);
    if (ok) {
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
        for (int64_t p = 0; p < panels; p++) {
            int64_t t0 = p * QP_TILES, nt = tiles - t0 < QP_TILES ? tiles - t0 : QP_TILES;
            const uint8_t *panel = (const uint8_t *)w->data + t0 * (k * 16);
            if (four) { /* each thread unpacks into its own scratch panel */
                uint8_t *own = scratch + omp_get_thread_num() * per_panel;
                qpanel_unpack4(w, t0, nt, own);
                panel = own;
            }
            (f16 ? qpanel_rows_h : qpanel_rows_f)(w, t0, nt, panel, &a, y, yb, ldy, batch);
        }
    }
    free(scratch);
    free(a.x);
    free(a.s);
    free(a.ms);
    return ok;
}
#endif
