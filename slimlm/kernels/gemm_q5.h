/* GGUF Q5_0 weights as the file stores them (bits == 5, group == 32): w = d * (code - 16), with a 5-bit
 * code (0..31) and an fp16 d per 32 inputs. 5.5 bits per weight, the file's own; as int8 g32 codes
 * with an fp16 d and minimum (gemm_q.h) they took 9.
 *
 * Layout, per tile of 16 rows and 32-block of k (352 bytes): the low 4 bits of each code in the int4
 * layout of gemm_q.h (256 bytes), then the fifth bits in one 64-byte plane (byte (row r, j), bit s:
 * input 4s + j), then the 16 rows' fp16 d (32 bytes). slimlm/kernels/qweights_q5.py packs and unpacks it.
 *
 * Per 32-block of activations (int8 q with scale s): sum_i code_i q_i - 16 sum_i q_i is exact in int32,
 * then one multiply-add by d * s: the same instructions for a (row, sequence) whatever the batch. */
#pragma once
#include <stdlib.h>

#include "model.h"
#include "numerics.h"

#define Q5_TILE_BLOCK 352 /* bytes per (tile, 32-block): codes and scales together */

static inline int q5_code(const slim_weight *w, int64_t row, int64_t i) {
    const uint8_t *t = (const uint8_t *)w->data + ((row / 16) * (w->k / 32) + i / 32) * Q5_TILE_BLOCK;
    int64_t l = row % 16, j = i % 32;
    uint8_t byte = t[(j / 8) * 64 + l * 4 + j % 4];
    int low = (j % 8) < 4 ? byte & 0xF : byte >> 4;
    return low | ((t[256 + l * 4 + j % 4] >> (j / 4)) & 1) << 4;
}

static inline float q5_d(const slim_weight *w, int64_t row, int64_t blk) {
    uint16_t h;
    memcpy(&h, (const uint8_t *)w->data + ((row / 16) * (w->k / 32) + blk) * Q5_TILE_BLOCK + 320 + 2 * (row % 16), 2);
    return f16_to_f32(h);
}

/* One row as float32: d * (code - 16), exact. */
static void q5_embed_row(const slim_weight *w, int64_t row, float *out) {
    for (int64_t i = 0; i < w->k; i++) out[i] = q5_d(w, row, i / 32) * (float)(q5_code(w, row, i) - 16);
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
static inline int32_t q5_load4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* Tile `tile` for nb (<= 8) sequences; s32 [nb, k / 32]: the integer sums of each 32-block of xq. */
static inline __attribute__((always_inline)) void q5gemm_tile(const slim_weight *w, int64_t tile, const int8_t *xq,
                                                              const float *xs, const int32_t *s32, float *y,
                                                              int64_t ldy, int64_t nvalid, const int nb) {
    int64_t k = w->k, nblk = k / 32;
    const uint8_t *base = (const uint8_t *)w->data + tile * nblk * Q5_TILE_BLOCK;
    const __m512i low = _mm512_set1_epi8(0x0F), fifth = _mm512_set1_epi8(0x10);
    __m512 acc[8];
#pragma GCC unroll 8
    for (int c = 0; c < nb; c++) acc[c] = _mm512_setzero_ps();
    for (int64_t blk = 0; blk < nblk; blk++) {
        const uint8_t *p = base + blk * Q5_TILE_BLOCK;
#pragma GCC unroll 6
        for (int c = 0; c < 6; c++) _mm_prefetch((const char *)(p + 1408 + 64 * c), _MM_HINT_T0);
        __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + 320)));
        __m512i wv[8];
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) {
            __m512i v = _mm512_loadu_si512((const void *)(p + 64 * c));
            wv[2 * c] = _mm512_and_si512(v, low);
            wv[2 * c + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        }
        /* the fifth bit of wv[s] is bit s of the plane: move it to bit 4 */
        __m512i h = _mm512_loadu_si512((const void *)(p + 256));
        wv[0] = _mm512_or_si512(wv[0], _mm512_and_si512(_mm512_slli_epi16(h, 4), fifth));
        wv[1] = _mm512_or_si512(wv[1], _mm512_and_si512(_mm512_slli_epi16(h, 3), fifth));
        wv[2] = _mm512_or_si512(wv[2], _mm512_and_si512(_mm512_slli_epi16(h, 2), fifth));
        wv[3] = _mm512_or_si512(wv[3], _mm512_and_si512(_mm512_slli_epi16(h, 1), fifth));
        wv[4] = _mm512_or_si512(wv[4], _mm512_and_si512(h, fifth));
        wv[5] = _mm512_or_si512(wv[5], _mm512_and_si512(_mm512_srli_epi16(h, 1), fifth));
        wv[6] = _mm512_or_si512(wv[6], _mm512_and_si512(_mm512_srli_epi16(h, 2), fifth));
        wv[7] = _mm512_or_si512(wv[7], _mm512_and_si512(_mm512_srli_epi16(h, 3), fifth));
#pragma GCC unroll 8
        for (int c = 0; c < nb; c++) {
            const int8_t *x = xq + c * k + blk * 32;
            __m512i a0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv[0], _mm512_set1_epi32(q5_load4(x)));
            __m512i a1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv[1], _mm512_set1_epi32(q5_load4(x + 4)));
#pragma GCC unroll 3
            for (int q = 2; q < 8; q += 2) {
                a0 = _mm512_dpbusd_epi32(a0, wv[q], _mm512_set1_epi32(q5_load4(x + 4 * q)));
                a1 = _mm512_dpbusd_epi32(a1, wv[q + 1], _mm512_set1_epi32(q5_load4(x + 4 * q + 4)));
            }
            __m512i a = _mm512_sub_epi32(_mm512_add_epi32(a0, a1), _mm512_set1_epi32(16 * s32[c * nblk + blk]));
            acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), _mm512_mul_ps(d, _mm512_set1_ps(xs[c * nblk + blk])),
                                     acc[c]);
        }
    }
    __mmask16 mask = nvalid >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nvalid) - 1);
#pragma GCC unroll 8
    for (int c = 0; c < nb; c++) _mm512_mask_storeu_ps(y + c * ldy + tile * 16, mask, acc[c]);
}

#define Q5_TILE_CALL(NB) \
    q5gemm_tile(w, t, xq + b0 * w->k, xs + b0 * nblk, s32 + b0 * nblk, y + b0 * ldy, ldy, nv, NB)
#endif

/* y[b, n] = W[n, :] . x[b, :] for a Q5_0 weight, from quantize_act_row's codes and scales. */
static void q5gemm(const slim_weight *w, const int8_t *xq, const float *xs, float *y, int64_t ldy, int64_t batch,
                   int threads) {
    int64_t k = w->k, nblk = k / 32, tiles = (w->rows + 15) / 16;
    int32_t *s32 = code_run_sums(xq, batch * k, 32);
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#pragma omp parallel for num_threads(threads) schedule(guided, 2)
    for (int64_t t = 0; t < tiles; t++) {
        int64_t nv = w->rows - t * 16 < 16 ? w->rows - t * 16 : 16, b0 = 0;
        FOR_TILES_OF_8(b0, batch, Q5_TILE_CALL);
    }
#else
#pragma omp parallel for num_threads(threads) schedule(guided, 2)
    for (int64_t t = 0; t < tiles; t++)
        for (int64_t n = t * 16; n < w->rows && n < (t + 1) * 16; n++)
            for (int64_t b = 0; b < batch; b++) {
                float acc = 0.0f;
                for (int64_t blk = 0; blk < nblk; blk++) {
                    int32_t dot = 0;
                    for (int64_t i = blk * 32; i < blk * 32 + 32; i++) dot += q5_code(w, n, i) * xq[b * k + i];
                    acc = fmaf((float)(dot - 16 * s32[b * nblk + blk]), q5_d(w, n, blk) * xs[b * nblk + blk], acc);
                }
                y[b * ldy + n] = acc;
            }
#endif
    free(s32);
}
