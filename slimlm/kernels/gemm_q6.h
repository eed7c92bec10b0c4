/* GGUF Q6_K weights as the file stores them (bits == 6, group == 16): w = d * sc * (code - 32), with a
 * 6-bit code (0..63), an int8 scale sc per 16 inputs and an fp16 d per 256. Held at the file's 6.5625
 * bits per weight: dequantizing to bf16 would more than double the bytes, and int8 g16 codes with fp32
 * d * sc and minimum (fp16 cannot hold d * sc exactly) would take 12 bits.
 *
 * Layout, per tile of 16 rows and 32-block of k (384 bytes): the low 4 bits of each code in the int4
 * layout of gemm_q.h (256 bytes: chunk c, byte (row r, j): input 8c + j low nibble, 8c + 4 + j high),
 * then the top 2 bits in two 64-byte planes (plane h, byte (row r, j), bits 2s..2s+1: input
 * 16h + 4s + j). Scales, per tile and 256-block (288 bytes): 16 x 16 int8 sc (sub-block g, row r at
 * 16 g + r), then 16 fp16 d (one per row). slimlm/kernels/qweights_q6.py packs and unpacks it.
 *
 * Per 32-block of activations (int8 q with scale s, as for int4/int8): the two sub-blocks' integer sums
 * sum_i code_i q_i - 32 sum_i q_i are exact in int32, scaled by their sc and added in int32
 * (|.| < 2^25), so the float work is one multiply-add by d * s per block, the same instructions for a
 * (row, sequence) whatever the batch: bit-identical whatever else is in the step. */
#pragma once
#include <stdlib.h>

#include "model.h"
#include "numerics.h"

#define Q6_TILE_BLOCK 384 /* code bytes per (tile, 32-block) */
#define Q6_TILE_SUPER 288 /* scale bytes per (tile, 256-block) */

static inline int q6_code(const slim_weight *w, int64_t row, int64_t i) {
    const uint8_t *t = (const uint8_t *)w->data + (row / 16) * (w->k / 32) * Q6_TILE_BLOCK + (i / 32) * Q6_TILE_BLOCK;
    int64_t l = row % 16, j = i % 32;
    uint8_t byte = t[(j / 8) * 64 + l * 4 + j % 4];
    int low = (j % 8) < 4 ? byte & 0xF : byte >> 4;
    int high = (t[256 + (j / 16) * 64 + l * 4 + j % 4] >> (2 * ((j / 4) % 4))) & 3;
    return low | high << 4;
}

static inline const uint8_t *q6_scales(const slim_weight *w, int64_t row, int64_t super) {
    return (const uint8_t *)w->scales + ((row / 16) * (w->k / 256) + super) * Q6_TILE_SUPER;
}

static inline int q6_sc(const slim_weight *w, int64_t row, int64_t sub) {
    return (int8_t)q6_scales(w, row, sub / 16)[(sub % 16) * 16 + row % 16];
}

static inline float q6_d(const slim_weight *w, int64_t row, int64_t super) {
    uint16_t h;
    memcpy(&h, q6_scales(w, row, super) + 256 + 2 * (row % 16), 2);
    return f16_to_f32(h);
}

/* One row as float32: (d * sc) * (code - 32), every product exact in float32 (as gguf's dequantizer). */
static void q6_embed_row(const slim_weight *w, int64_t row, float *out) {
    for (int64_t i = 0; i < w->k; i++)
        out[i] = (q6_d(w, row, i / 256) * (float)q6_sc(w, row, i / 16)) * (float)(q6_code(w, row, i) - 32);
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
static inline int32_t q6_load4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* Tile `tile` for nb (<= 8) sequences; s16 [nb, k / 16]: the integer sums of each sequence's 16-input
 * runs of xq. Inlined with constant nb, so the accumulators live in registers. */
static inline __attribute__((always_inline)) void q6gemm_tile(const slim_weight *w, int64_t tile, const int8_t *xq,
                                                              const float *xs, const int32_t *s16, float *y,
                                                              int64_t ldy, int64_t nvalid, const int nb) {
    int64_t k = w->k, nblk = k / 32;
    const uint8_t *codes = (const uint8_t *)w->data + tile * nblk * Q6_TILE_BLOCK;
    const uint8_t *scales = (const uint8_t *)w->scales + tile * (k / 256) * Q6_TILE_SUPER;
    const __m512i low = _mm512_set1_epi8(0x0F), top = _mm512_set1_epi8(0x30);
    __m512 acc[8];
#pragma GCC unroll 8
    for (int c = 0; c < nb; c++) acc[c] = _mm512_setzero_ps();
    __m512 d = _mm512_setzero_ps();
    for (int64_t blk = 0; blk < nblk; blk++) {
        const uint8_t *s = scales + (blk / 8) * Q6_TILE_SUPER;
        if (blk % 8 == 0) d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s + 256)));
        __m512i sc_lo = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(s + (2 * (blk % 8)) * 16)));
        __m512i sc_hi = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(s + (2 * (blk % 8) + 1) * 16)));
        const uint8_t *p = codes + blk * Q6_TILE_BLOCK;
#pragma GCC unroll 6
        for (int c = 0; c < 6; c++) _mm_prefetch((const char *)(p + 1536 + 64 * c), _MM_HINT_T0);
        __m512i wv[8];
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) {
            __m512i v = _mm512_loadu_si512((const void *)(p + 64 * c));
            wv[2 * c] = _mm512_and_si512(v, low);
            wv[2 * c + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        }
        /* the top bits of wv[4h + s] sit at bits 2s..2s+1 of plane h: move them to bits 4..5 */
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++) {
            __m512i v = _mm512_loadu_si512((const void *)(p + 256 + 64 * h));
            wv[4 * h] = _mm512_or_si512(wv[4 * h], _mm512_and_si512(_mm512_slli_epi16(v, 4), top));
            wv[4 * h + 1] = _mm512_or_si512(wv[4 * h + 1], _mm512_and_si512(_mm512_slli_epi16(v, 2), top));
            wv[4 * h + 2] = _mm512_or_si512(wv[4 * h + 2], _mm512_and_si512(v, top));
            wv[4 * h + 3] = _mm512_or_si512(wv[4 * h + 3], _mm512_and_si512(_mm512_srli_epi16(v, 2), top));
        }
#pragma GCC unroll 8
        for (int c = 0; c < nb; c++) {
            const int8_t *x = xq + c * k + blk * 32;
            __m512i a0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv[0], _mm512_set1_epi32(q6_load4(x)));
            __m512i a1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv[4], _mm512_set1_epi32(q6_load4(x + 16)));
#pragma GCC unroll 3
            for (int q = 1; q < 4; q++) {
                a0 = _mm512_dpbusd_epi32(a0, wv[q], _mm512_set1_epi32(q6_load4(x + 4 * q)));
                a1 = _mm512_dpbusd_epi32(a1, wv[4 + q], _mm512_set1_epi32(q6_load4(x + 16 + 4 * q)));
            }
            const int32_t *sums = s16 + c * (k / 16) + 2 * blk;
            a0 = _mm512_mullo_epi32(_mm512_sub_epi32(a0, _mm512_set1_epi32(32 * sums[0])), sc_lo);
            a1 = _mm512_mullo_epi32(_mm512_sub_epi32(a1, _mm512_set1_epi32(32 * sums[1])), sc_hi);
            acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(a0, a1)),
                                     _mm512_mul_ps(d, _mm512_set1_ps(xs[c * nblk + blk])), acc[c]);
        }
    }
    __mmask16 mask = nvalid >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nvalid) - 1);
#pragma GCC unroll 8
    for (int c = 0; c < nb; c++) _mm512_mask_storeu_ps(y + c * ldy + tile * 16, mask, acc[c]);
}

#define Q6_TILE_CALL(NB) \
    q6gemm_tile(w, t, xq + b0 * w->k, xs + b0 * nblk, s16 + b0 * (w->k / 16), y + b0 * ldy, ldy, nv, NB)
#endif

/* y[b, n] = W[n, :] . x[b, :] for a Q6_K weight, from quantize_act_row's codes and scales. */
static void q6gemm(const slim_weight *w, const int8_t *xq, const float *xs, float *y, int64_t ldy, int64_t batch,
                   int threads) {
    int64_t k = w->k, nblk = k / 32, tiles = (w->rows + 15) / 16;
    int32_t *s16 = code_run_sums(xq, batch * k, 16);
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#pragma omp parallel for num_threads(threads) schedule(guided, 2)
    for (int64_t t = 0; t < tiles; t++) {
        int64_t nv = w->rows - t * 16 < 16 ? w->rows - t * 16 : 16, b0 = 0;
        FOR_TILES_OF_8(b0, batch, Q6_TILE_CALL);
    }
#else
    /* The same integers and the same float multiply-add per block as the vector tile. */
#pragma omp parallel for num_threads(threads) schedule(guided, 2)
    for (int64_t t = 0; t < tiles; t++)
        for (int64_t n = t * 16; n < w->rows && n < (t + 1) * 16; n++)
            for (int64_t b = 0; b < batch; b++) {
                float acc = 0.0f, d = 0.0f;
                for (int64_t blk = 0; blk < nblk; blk++) {
                    if (blk % 8 == 0) d = q6_d(w, n, blk / 8);
                    int32_t total = 0;
                    for (int h = 0; h < 2; h++) {
                        int32_t dot = 0;
                        for (int64_t i = blk * 32 + 16 * h; i < blk * 32 + 16 * h + 16; i++)
                            dot += q6_code(w, n, i) * xq[b * k + i];
                        total += (dot - 32 * s16[b * (k / 16) + 2 * blk + h]) * q6_sc(w, n, 2 * blk + h);
                    }
                    acc = fmaf((float)total, d * xs[b * nblk + blk], acc);
                }
                y[b * ldy + n] = acc;
            }
#endif
    free(s16);
}
