/* Decode steps of a Llama-family model (Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma 3) on CPU: one new
 * token for each of the step's sequences, the whole model in one call. What the families change (q/k
 * norms, Gemma's extra norms, GeGLU, per-layer windows and RoPE bases, scaled embeddings, final-logit
 * soft-capping) are fields of slim_layer / slim_model that slimlm/kernels/family.py fills from the
 * config, so this file holds one step with no family names in it.
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
#include <omp.h>

#include "attend_bf16.h"
#include "family.h"
#include "gemm.h"
#include "gemm_q.h"
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

/* 1 when built with the AVX512-VNNI tiles for int4/int8 weights (gemm_q.h); 0 for the portable loops. */
int slim_quant_fast_path(void) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    return 1;
#else
    return 0;
#endif
}

static int64_t widest_input(const slim_model *m) {
    int64_t widest = m->inter > m->hidden ? m->inter : m->hidden;
    return m->heads * m->head_dim > widest ? m->heads * m->head_dim : widest;
}

/* Floats of scratch `work` must hold for a step of `batch` sequences (one or more). */
int64_t slim_work_floats(const slim_model *m, int64_t batch) {
    int64_t qkv = (m->heads + 2 * m->kv_heads) * m->head_dim;
    int64_t widest = widest_input(m);
    int64_t per_seq = 2 * m->hidden + qkv + m->heads * m->head_dim + 2 * m->inter;
    /* + a GEMM's input as bf16, or as int8 codes with a scale and a sum per 32 */
    return batch * per_seq + (batch * widest + 1) / 2 + (batch * widest + 3) / 4 + 2 * batch * (widest / QBLOCK);
}

/* The step's GEMM inputs, laid out after the float activations in `work`. */
static slim_input inputs_in(const slim_model *m, float *after, int64_t batch) {
    int64_t widest = widest_input(m);
    slim_input in;
    in.xb = (bf16 *)after;
    in.xq = (int8_t *)(after + (batch * widest + 1) / 2);
    in.xs = after + (batch * widest + 1) / 2 + (batch * widest + 3) / 4;
    in.xsum = in.xs + batch * (widest / QBLOCK);
    return in;
}

/* y [n, w->rows] = x [n, w->k] W^T for any weight (the PyTorch path's linears on the kernel's weights:
 * prefill of quantized models). xq / xs / xsum: scratch for n rows of k int8 and k / 32 floats twice;
 * xb: n * k bf16. */
void slim_linear(const slim_weight *w, const float *x, int64_t n, int8_t *xq, float *xs, float *xsum, bf16 *xb,
                 float *y, int64_t threads) {
    slim_input in = {xb, xq, xs, xsum};
#pragma omp parallel for num_threads((int)threads) schedule(static)
    for (int64_t b = 0; b < n; b++) prep_row(w, x + b * w->k, &in, b);
    linear(w, &in, y, w->rows, n, (int)threads);
}

/* slim_linear for bf16 rows in and out (the PyTorch path of bf16 models): the bits slim_linear gives
 * for the rows widened to float32, rounded to bf16, without the float32 copies of inputs and outputs
 * (a tenth of a quantized prefill went to those). xf: threads * k floats of scratch (each thread widens
 * one row at a time there); yf: n * rows floats of scratch, used where the GEMM cannot write bf16 itself
 * (qgemm_bf16_out). */
void slim_linear_bf16(const slim_weight *w, const bf16 *x, int64_t n, int8_t *xq, float *xs, float *xsum, bf16 *xb,
                      float *xf, float *yf, bf16 *y, int64_t threads) {
    slim_input in = {xb, xq, xs, xsum};
    int64_t k = w->k;
#pragma omp parallel for num_threads((int)threads) schedule(static)
    for (int64_t b = 0; b < n; b++) {
        float *row = xf + omp_get_thread_num() * k;
        for (int64_t i = 0; i < k; i++) row[i] = bf16_to_f32(x[b * k + i]);
        prep_row(w, row, &in, b);
    }
    if (qgemm_bf16_out(w, xq, xs, xsum, y, w->rows, n, (int)threads)) return;
    linear(w, &in, yf, w->rows, n, (int)threads);
#pragma omp parallel for num_threads((int)threads) schedule(static)
    for (int64_t i = 0; i < n * w->rows; i++) y[i] = f32_to_bf16(yf[i]);
}

/* out [n, w->k] = rows ids of the table w (float32), each divided by div where given. */
void slim_embed(const slim_weight *w, const int64_t *ids, int64_t n, const float *div, float *out) {
    for (int64_t b = 0; b < n; b++) embed_row(w, ids[b], div, out + b * w->k);
}

/* One new token for each of `batch` sequences (the cache holds each one's earlier positions).
 * tokens/positions [batch]; cos/ssin [m->ropes, batch, head_dim] (layer l reads pair l->rope); tables [batch, n_table] (each sequence's block
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
    slim_input in = inputs_in(m, gate_up + batch * 2 * inter, batch);

    for (int64_t b = 0; b < batch; b++) {
        embed_row(&m->embed, tokens[b], m->embed_div, x + b * hid);
        if (m->embed_scale != 1.0f)
            for (int64_t i = b * hid; i < (b + 1) * hid; i++) x[i] *= m->embed_scale;
    }
    for (int64_t li = 0; li < m->layers; li++) {
        const slim_layer *l = &m->layer[li];
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t b = 0; b < batch; b++) {
            rms_norm_f(x + b * hid, l->in_norm, hn + b * hid, hid, m->eps);
            prep_row(&l->qkv_w, hn + b * hid, &in, b);
        }
        linear(&l->qkv_w, &in, qkv, nqkv, batch, threads);
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t b = 0; b < batch; b++) {
            float *row = qkv + b * nqkv;
            if (l->qkv_b)
                for (int64_t i = 0; i < nqkv; i++) row[i] += bf16_to_f32(l->qkv_b[i]);
            if (l->q_norm)
                for (int64_t j = 0; j < h; j++) rms_norm_f(row + j * d, l->q_norm, row + j * d, d, m->eps);
            if (l->k_norm)
                for (int64_t j = h; j < h + kvh; j++) rms_norm_f(row + j * d, l->k_norm, row + j * d, d, m->eps);
            const float *c = cos + (l->rope * batch + b) * d, *s = ssin + (l->rope * batch + b) * d;
            for (int64_t j = 0; j < h + kvh; j++) rotate(row + j * d, c, s, d);
            if (m->rotation) /* quantized pools hold K and V turned: q turns with them, out turns back */
                for (int64_t j = 0; j < h + 2 * kvh; j++) turn(row + j * d, m->rotation, d, 0);
            int64_t pos = positions[b], block = tables[b * n_table + pos / m->block_size];
            for (int64_t g = 0; g < kvh; g++)
                kv_write(m, l, g, block, pos, row + (h + g) * d, row + (h + kvh + g) * d);
        }
#ifdef __AVX512BF16__
        if (m->kv_bits == 16 && d % 16 == 0) { /* the bf16 pool: a KV head's query heads together */
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
            for (int64_t bg = 0; bg < batch * kvh; bg++) {
                int64_t b = bg / kvh, g = bg % kvh, ctx = positions[b] + 1, per = h / kvh;
                int64_t lo = (l->window > 0 && ctx > l->window) ? ctx - l->window : 0;
                attend_group_bf16(m, l, qkv + b * nqkv + g * per * d, per, g, tables + b * n_table, lo, ctx,
                                  attn + b * h * d + g * per * d);
            }
        } else
#endif
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
        for (int64_t bj = 0; bj < batch * h; bj++) {
            int64_t b = bj / h, j = bj % h, ctx = positions[b] + 1;
            int64_t lo = (l->window > 0 && ctx > l->window) ? ctx - l->window : 0;
            attend_head(m, l, qkv + b * nqkv + j * d, j / (h / kvh), tables + b * n_table, lo, ctx,
                        attn + b * h * d + j * d);
            if (m->rotation) turn(attn + b * h * d + j * d, m->rotation, d, 1);
        }
        for (int64_t b = 0; b < batch; b++) prep_row(&l->o_w, attn + b * h * d, &in, b);
        linear(&l->o_w, &in, hn, hid, batch, threads);
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t b = 0; b < batch; b++) {
            if (l->attn_out_norm) rms_norm_f(hn + b * hid, l->attn_out_norm, hn + b * hid, hid, m->eps);
            for (int64_t i = b * hid; i < (b + 1) * hid; i++) x[i] += hn[i];
            rms_norm_f(x + b * hid, l->post_norm, hn + b * hid, hid, m->eps);
            prep_row(&l->gate_up_w, hn + b * hid, &in, b);
        }
        linear(&l->gate_up_w, &in, gate_up, 2 * inter, batch, threads);
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t b = 0; b < batch; b++) {
            float *gate = gate_up + b * 2 * inter;
            if (l->down_w.bits == 16 && m->act == 0) {
                swiglu_bf16(gate, gate + inter, in.xb + b * inter, inter);
            } else if (l->down_w.bits == 16) {
                geglu_bf16(gate, gate + inter, in.xb + b * inter, inter);
            } else {
                if (m->act == 0) swiglu_f32(gate, gate + inter, gate, inter);
                else geglu_f32(gate, gate + inter, gate, inter);
                prep_row(&l->down_w, gate, &in, b);
            }
        }
        linear(&l->down_w, &in, hn, hid, batch, threads);
        if (l->mlp_out_norm)
#pragma omp parallel for num_threads(threads) schedule(static)
            for (int64_t b = 0; b < batch; b++) rms_norm_f(hn + b * hid, l->mlp_out_norm, hn + b * hid, hid, m->eps);
        for (int64_t i = 0; i < batch * hid; i++) x[i] += hn[i];
    }
    for (int64_t b = 0; b < batch; b++) {
        rms_norm_f(x + b * hid, m->final_norm, hn + b * hid, hid, m->eps);
        prep_row(&m->lm_head, hn + b * hid, &in, b);
    }
    linear(&m->lm_head, &in, logits, m->vocab, batch, threads);
    if (m->final_softcap > 0.0f)
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t b = 0; b < batch; b++) soft_cap(logits + b * m->vocab, m->vocab, m->final_softcap);
    return 0;
}
