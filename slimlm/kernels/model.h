/* The model and pool descriptors the Python side fills (slimlm/kernels/fused_decode.py mirrors them). */
#pragma once
#include <stdint.h>

typedef uint16_t bf16;

#define MAX_HEAD_DIM 512 /* the quantized pools' turn works on the stack */

typedef uint16_t bf16;

#define MAX_HEAD_DIM 512 /* the quantized pools' turn works on the stack */

typedef struct {
    const bf16 *qkv_w;     /* [(H + 2 KVH) * D, hidden]: q, k, v rows stacked */
    const bf16 *qkv_b;     /* [(H + 2 KVH) * D] or NULL (Qwen2 has a q/k/v bias) */
    const bf16 *o_w;       /* [hidden, H * D] */
    const bf16 *gate_up_w; /* [2 * inter, hidden]: gate rows, then up rows */
    const bf16 *down_w;    /* [hidden, inter] */
    const bf16 *in_norm;   /* [hidden] */
    const bf16 *post_norm; /* [hidden] */
    void *k_cache;         /* this layer's K pool: bf16 [KVH, blocks, block_size, D], or quantized codes */
    void *v_cache;         /* [blocks, block_size, KVH, D * bits / 8] (slimlm/kv/quantized.py) */
    uint16_t *k_scale;     /* quantized pools: fp16 [blocks, block_size, KVH, groups]; else NULL */
    uint16_t *v_scale;
    uint8_t *k_zero;       /* quantized pools: uint8 [blocks, block_size, KVH, groups]; else NULL */
    uint8_t *v_zero;
    bf16 *k_stage;         /* the int4 pool (slimlm/kv/kivi.py): bf16 [slots, block_size, KVH, D]; else NULL */
    bf16 *v_stage;
} slim_layer;

typedef struct {
    int64_t hidden, inter, heads, kv_heads, head_dim, layers, vocab;
    int64_t block_size, num_blocks, window, max_ctx, threads;
    int64_t kv_bits;        /* 16: the bf16 pool; 8 or 4: the quantized pools */
    int64_t k_bits, v_bits, k_group, v_group; /* quantized pools: bits and channels per scale (0: head) */
    int64_t key_channels;   /* 1: keys scaled per channel per block, unfinished blocks staged (int4) */
    int32_t *stage_of;      /* key_channels: [blocks] staging slot of each unfinished block, else -1 */
    float eps, scale;
    const float *rotation;  /* quantized pools: the orthogonal [D, D] K/V are stored turned by; else NULL */
    const bf16 *embed;      /* [vocab, hidden] */
    const bf16 *final_norm; /* [hidden] */
    const bf16 *lm_head;    /* [vocab, hidden] (the embedding itself when tied) */
    const slim_layer *layer;
    float *work; /* scratch, slim_work_floats() floats */
} slim_model;
