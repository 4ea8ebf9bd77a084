/* A Llama decoder layer's work outside attention, for the few bf16 rows of a decode step, as
 * two C calls: everything before attention (norm, fused q/k/v projection, RoPE) and everything
 * after it (output projection, residual, norm, gate/up, SwiGLU, down, residual).
 *
 * Why: each op here already had its own C kernel, but called one by one from Python a layer
 * cost ~10 calls, each with its argument checks, ctypes marshalling, output allocation and a
 * wake of the pool's helper, and the memory bus sat idle between them: ~3 ms of a ~15 ms
 * SmolLM2 step at batch 1 (timed per call). Chained here, the matmuls stream their weights
 * back to back.
 *
 * The results are bit for bit those of the op-by-op path: the same kernels in the same order,
 * and the final residual add rounds its fp32 sum to bf16 as PyTorch's bf16 add does. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "kernels.h"

/* qkv (M, heads_total, D) = rope(rms_norm(x) @ w_qkv.T) for x (M, C), with the first
 * `rotated` heads (q then k) rotated by cos, sin (M, D). Returns 0 or a kernel's status. */
int llama_attention_in_bf16(const uint16_t *x, const uint16_t *norm_w, float eps,
                            const uint16_t *w_qkv, const uint16_t *cos, const uint16_t *sin,
                            uint16_t *qkv, int M, int C, int rotated, int heads_total, int D,
                            int nthreads) {
    uint16_t *normed = malloc(sizeof(uint16_t) * (size_t)M * C);
    if (!normed) return -1;
    int status = rms_norm_bf16(x, NULL, NULL, norm_w, normed, M, C, eps);
    if (status == 0) status = linear_bf16(normed, w_qkv, qkv, M, heads_total * D, C, nthreads);
    if (status == 0) rope_bf16(qkv, cos, sin, M, rotated, heads_total, D);
    free(normed);
    return status;
}

/* out (M, C) = s + down(silu(gate) * up) with [gate, up] = rms_norm(s) @ w_gate_up.T and
 * s = x + attn @ w_o.T, for attn (M, HD) and x (M, C) the layer's input. I is the MLP width.
 * Returns 0 or a kernel's status. */
int llama_mlp_out_bf16(const uint16_t *attn, const uint16_t *x, const uint16_t *w_o,
                       const uint16_t *norm_w, float eps, const uint16_t *w_gate_up,
                       const uint16_t *w_down, uint16_t *out, int M, int C, int HD, int I,
                       int nthreads) {
    const size_t rows = (size_t)M;
    /* o-projection, residual sum, normed sum, gate/up, activation, down: one allocation */
    uint16_t *h = malloc(sizeof(uint16_t) * rows * (4 * (size_t)C + 3 * (size_t)I));
    if (!h) return -1;
    uint16_t *sum = h + rows * C, *normed = sum + rows * C, *gate_up = normed + rows * C;
    uint16_t *act = gate_up + rows * 2 * I, *down = act + rows * I;
    int status = linear_bf16(attn, w_o, h, M, C, HD, nthreads);
    if (status == 0) status = rms_norm_bf16(h, x, sum, norm_w, normed, M, C, eps);
    if (status == 0) status = linear_bf16(normed, w_gate_up, gate_up, M, 2 * I, C, nthreads);
    if (status == 0) {
        silu_mul_bf16(gate_up, act, M, I);
        status = linear_bf16(act, w_down, down, M, C, I, nthreads);
    }
    if (status == 0)
        for (size_t i = 0; i < rows * C; i++)
            out[i] = to_bf16(from_bf16(sum[i]) + from_bf16(down[i]));
    free(h);
    return status;
}

enum { CACHE_F32 = 0, CACHE_BF16 = 4 }; /* paged_decode.c's format numbers */
enum { NORM_IN, W_QKV, W_O, NORM_MLP, W_GATE_UP, W_DOWN, K_CACHE, V_CACHE, LAYER_PTRS };

/* Store the new k and v rows of qkv (M, H + 2 Hk, D) at their slots of one layer's caches
 * (Hk, num_blocks, bs, D), as the PyTorch path's index_copy_ does (widened for fp32 caches).
 * Returns -3 for a slot outside the cache. */
static int write_kv(const uint16_t *qkv, const int64_t *slots, void *k_cache, void *v_cache,
                    int format, int M, int H, int Hk, int D, int num_blocks, int bs) {
    const int64_t cap = (int64_t)num_blocks * bs;
    for (int r = 0; r < M; r++) {
        if (slots[r] < 0 || slots[r] >= cap) return -3;
        for (int h = 0; h < Hk; h++) {
            const int64_t at = ((int64_t)h * cap + slots[r]) * D;
            const uint16_t *k = qkv + ((int64_t)r * (H + 2 * Hk) + H + h) * D, *v = k + Hk * D;
            if (format == CACHE_BF16) {
                memcpy((uint16_t *)k_cache + at, k, sizeof(uint16_t) * D);
                memcpy((uint16_t *)v_cache + at, v, sizeof(uint16_t) * D);
            } else {
                for (int i = 0; i < D; i++) {
                    ((float *)k_cache)[at + i] = from_bf16(k[i]);
                    ((float *)v_cache)[at + i] = from_bf16(v[i]);
                }
            }
        }
    }
    return 0;
}

/* Every decoder layer of a decode-only step: x (M, C) in place, one token per request, each
 * layer's pointers in `layers` (LAYER_PTRS a layer, in the enum's order). Attention is the
 * paged decode kernel over fp32 or bf16 caches (`format`) with the step's block tables (M,
 * max_blocks), context lengths (M,) and slots (M,); q is widened to fp32 for it and its output
 * rounded back to bf16, as the op-by-op path does. Returns 0, -1 (allocation), or -3 (a slot or
 * block id outside the cache; x is then partly updated). */
int llama_decode_layers_bf16(uint16_t *x, const uint16_t *cos, const uint16_t *sin,
                             void *const *layers, int num_layers, int M, int C, int H, int Hk,
                             int D, int I, float eps, int format, const int64_t *slots,
                             const int64_t *block_tables, const int64_t *context_lens,
                             int num_blocks, int bs, int max_blocks, float scale,
                             int64_t null_block, int nthreads) {
    const size_t rows = (size_t)M, qkv_n = rows * (H + 2 * Hk) * D, heads_n = rows * H * D;
    uint16_t *qkv = malloc(sizeof(uint16_t) * (qkv_n + heads_n));
    float *q = malloc(sizeof(float) * 2 * heads_n);
    int status = qkv && q ? 0 : -1;
    uint16_t *attn = qkv + qkv_n;
    float *attn_f = q + heads_n;
    for (int l = 0; l < num_layers && status == 0; l++) {
        void *const *p = layers + (size_t)l * LAYER_PTRS;
        status = llama_attention_in_bf16(x, p[NORM_IN], eps, p[W_QKV], cos, sin, qkv, M, C,
                                         H + Hk, H + 2 * Hk, D, nthreads);
        if (status == 0)
            status = write_kv(qkv, slots, p[K_CACHE], p[V_CACHE], format, M, H, Hk, D,
                              num_blocks, bs);
        if (status != 0) break;
        for (int r = 0; r < M; r++)
            for (int i = 0; i < H * D; i++)
                q[(size_t)r * H * D + i] = from_bf16(qkv[(size_t)r * (H + 2 * Hk) * D + i]);
        status = format == CACHE_BF16
                     ? paged_decode_quant(CACHE_BF16, q, p[K_CACHE], p[V_CACHE], NULL, NULL, NULL,
                                          NULL, 1, NULL, NULL, 0, NULL, block_tables,
                                          context_lens, attn_f, M, H, Hk, D, num_blocks, bs,
                                          max_blocks, scale, nthreads, null_block)
                     : paged_decode_f32(q, p[K_CACHE], p[V_CACHE], block_tables, context_lens,
                                        attn_f, M, H, Hk, D, num_blocks, bs, max_blocks, scale,
                                        nthreads, null_block);
        if (status != 0) {
            status = -3;
            break;
        }
        for (size_t i = 0; i < heads_n; i++) attn[i] = to_bf16(attn_f[i]);
        status = llama_mlp_out_bf16(attn, x, p[W_O], p[NORM_MLP], eps, p[W_GATE_UP], p[W_DOWN],
                                    x, M, C, H * D, I, nthreads);
    }
    free(qkv);
    free(q);
    return status;
}
