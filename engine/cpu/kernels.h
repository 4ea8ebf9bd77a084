/* The kernels one C file of the library calls in another (llama_layer_bf16.c chains them);
 * each defining file includes this too, so the compiler checks the two agree. */
#pragma once
#include <stdint.h>

int linear_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, int M, int N, int K,
                int nthreads);
int rms_norm_bf16(const uint16_t *x, const uint16_t *residual, uint16_t *sum_out,
                  const uint16_t *weight, uint16_t *out, int rows, int C, float eps);
void silu_mul_bf16(const uint16_t *gate_up, uint16_t *out, int rows, int inter);
void rope_bf16(uint16_t *x, const uint16_t *cos, const uint16_t *sin, int rows, int heads,
               int heads_total, int D);
int paged_decode_f32(const float *q, const float *k_cache, const float *v_cache,
                     const int64_t *block_tables, const int64_t *context_lens, float *out, int B,
                     int H, int Hk, int D, int num_blocks, int block_size,
                     int max_blocks_per_seq, float scale, int nthreads, int64_t null_block);
int paged_decode_quant(int format, const float *q, const uint8_t *k_q, const uint8_t *v_q,
                       const uint16_t *k_scale, const uint16_t *k_min, const uint16_t *v_scale,
                       const uint16_t *v_min, int groups, const float *res_k,
                       const float *res_v, int slots, const int64_t *tail_slots,
                       const int64_t *block_tables, const int64_t *context_lens, float *out,
                       int B, int H, int Hk, int D, int num_blocks, int block_size,
                       int max_blocks_per_seq, float scale, int nthreads, int64_t null_block);
