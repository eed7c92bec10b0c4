/* Weight GEMMs of a decode step: y[b, n] = W[n, :] . x[b, :] for every sequence b, bf16 W and x,
 * float32 sums, on AVX512-BF16 tiles (a portable loop elsewhere). */
#pragma once
#include "model.h"
#include "numerics.h"


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
