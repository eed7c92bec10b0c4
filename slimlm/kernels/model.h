/* The model and pool descriptors the Python side fills (slimlm/kernels/fused_decode.py mirrors them). */
#pragma once
#include <stdint.h>

typedef uint16_t bf16;

#define MAX_HEAD_DIM 512 /* the quantized pools' turn works on the stack */

/* One weight matrix [rows, k]: bf16 rows, or int4/int8 codes in the tiled layout of gemm_q.h with a
 * scale d and a float minimum m per (row, group): w = d * code + m. */
typedef struct {
    const void *data;     /* bits 16: bf16 [rows, k]; bits 8/4: codes, tiles of 16 rows (gemm_q.h) */
    const void *scales;   /* bits 8/4: per tile and group, 16 d then 16 m, fp16 or fp32; else NULL */
    const int32_t *perm;  /* GPTQ act-order: the GEMM reads x[perm[i]] as its input i; else NULL */
    int64_t rows, k, bits, group, scale_bits;
} slim_weight;

typedef struct {
    slim_weight qkv_w;     /* [(H + 2 KVH) * D, hidden]: q, k, v rows stacked */
    const bf16 *qkv_b;     /* [(H + 2 KVH) * D] or NULL (Qwen2 has a q/k/v bias) */
    slim_weight o_w;       /* [hidden, H * D] */
    slim_weight gate_up_w; /* [2 * inter, hidden]: gate rows, then up rows */
    slim_weight down_w;    /* [hidden, inter] */
    const float *in_norm;   /* [hidden]: the norm before attention (weights as multiplied: Gemma's 1 + w) */
    const float *post_norm; /* [hidden]: the norm before the MLP */
    void *k_cache;         /* this layer's K pool: bf16 [KVH, blocks, block_size, D], or quantized codes */
    void *v_cache;         /* [blocks, block_size, KVH, D * bits / 8] (slimlm/kv/quantized.py) */
    uint16_t *k_scale;     /* quantized pools: fp16 [blocks, block_size, KVH, groups]; else NULL */
    uint16_t *v_scale;
    uint8_t *k_zero;       /* quantized pools: uint8 [blocks, block_size, KVH, groups]; else NULL */
    uint8_t *v_zero;
    bf16 *k_stage;         /* the int4 pool (slimlm/kv/kivi.py): bf16 [slots, block_size, KVH, D]; else NULL */
    bf16 *v_stage;
    /* What the families change in a layer (slimlm/kernels/family.py fills these from the config). */
    const float *q_norm;       /* [head_dim] RMSNorm over each q head before RoPE (Qwen3, Gemma 3); else NULL */
    const float *k_norm;       /* [head_dim] the same over each k head; else NULL */
    const float *attn_out_norm; /* [hidden] Gemma 3: the attention output is normed before the residual; else NULL */
    const float *mlp_out_norm;  /* [hidden] Gemma 3: the MLP output likewise; else NULL */
    int64_t window;            /* keys this layer attends back (sliding window), 0: all */
    int64_t rope;              /* which cos/sin pair this layer turns q/k with (Gemma 3: 0 global, 1 local) */
} slim_layer;

typedef struct {
    int64_t hidden, inter, heads, kv_heads, head_dim, layers, vocab;
    int64_t block_size, num_blocks, max_ctx, threads;
    int64_t kv_bits;        /* 16: the bf16 pool; 8 or 4: the quantized pools */
    int64_t k_bits, v_bits, k_group, v_group; /* quantized pools: bits and channels per scale (0: head) */
    int64_t key_channels;   /* 1: keys scaled per channel per block, unfinished blocks staged (int4) */
    int64_t sink_blocks;    /* key_channels: a sequence's first blocks stay staged (attention sinks) */
    int32_t *stage_of;      /* key_channels: [blocks] staging slot of each unfinished block, else -1 */
    float eps, scale;
    int64_t act;            /* the MLP's gate activation: 0 SiLU, 1 tanh-approximated GELU (GeGLU) */
    int64_t ropes;          /* cos/sin pairs slim_decode receives (1, or 2 for Gemma 3's two bases) */
    float embed_scale;      /* looked-up rows are multiplied by this (Gemma 3: sqrt(hidden)); 1 otherwise */
    float final_softcap;    /* logits -> cap * tanh(logits / cap) where > 0 */
    const float *rotation;  /* quantized pools: the orthogonal [D, D] K/V are stored turned by; else NULL */
    slim_weight embed;      /* [vocab, hidden] */
    const float *embed_div; /* AWQ on a tied head: looked-up rows are divided by this [hidden]; else NULL */
    const float *final_norm; /* [hidden] */
    slim_weight lm_head;    /* [vocab, hidden] (the embedding itself when tied) */
    const slim_layer *layer;
    float *work; /* scratch, slim_work_floats() floats */
} slim_model;
