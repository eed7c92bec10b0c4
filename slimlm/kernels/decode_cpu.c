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
 * Pieces: model.h (the descriptors), numerics.h (elementwise), gemm.h (weight GEMMs), kv_pool.h (the
 * pools and attention); this file holds the step itself.
 *
 * Threads: GEMM rows and attention heads are split over OpenMP threads. The library links the
 * libgomp that torch already loaded (same soname), so both share one thread pool. GEMM rows are
 * handed out "guided" (big contiguous chunks first, then smaller): a thread the OS preempts, e.g. for
 * the HTTP server sharing the cores, no longer holds the whole step up (one streaming client on 2
 * cores: 22 -> 14 ms per token), and each thread still streams long runs of rows in address order,
 * which "dynamic" chunks broke (12 against 9 ms per token).
 */
#include "gemm.h"
#include "kv_pool.h"
#include "model.h"
#include "numerics.h"


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

/* One new token for each of `batch` sequences (the cache holds each one's earlier positions).
 * tokens/positions [batch]; cos/ssin [batch, head_dim]; tables [batch, n_table] (each sequence's block
 * table, padded); logits [batch, vocab]. The float32
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
