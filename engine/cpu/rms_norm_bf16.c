/* RMSNorm of bf16 rows, optionally fused with the residual add before it, in fp32 arithmetic.
 *
 * Why a kernel: in bf16, PyTorch's RMSNorm is about a dozen small ops (upcast, square, mean,
 * rsqrt, two multiplies, downcast, each with its allocation and dispatch); at SmolLM2's decode
 * sizes (a few rows of 576) that was ~40 us a call, 61 calls a step, 2.5 ms of a 25 ms step
 * (torch profiler, batch 1). One pass here takes a microsecond or two.
 *
 * Rounding: the sum x + residual is rounded to bf16, as PyTorch's bf16 add rounds it; the norm
 * is computed from that sum in fp32 and rounded once at the end (nearest-even). */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "kernels.h"

/* x, out (rows, C); weight (C,). With sum_out not NULL, the row normed is x + residual (both
 * (rows, C)), and that sum is written to sum_out. C <= 8192. Returns 0, or -2 for a C too
 * wide for the stack buffer. */
int rms_norm_bf16(const uint16_t *x, const uint16_t *residual, uint16_t *sum_out,
                  const uint16_t *weight, uint16_t *out, int rows, int C, float eps) {
    if (C > 8192) return -2;
    float row[8192], wf[8192]; /* 64 KiB of stack: fine for any thread */
    for (int c = 0; c < C; c++) wf[c] = from_bf16(weight[c]);
    for (int r = 0; r < rows; r++) {
        const uint16_t *xr = x + (int64_t)r * C;
        if (sum_out) {
            const uint16_t *rr = residual + (int64_t)r * C;
            uint16_t *sr = sum_out + (int64_t)r * C;
            for (int c = 0; c < C; c++) {
                sr[c] = to_bf16(from_bf16(xr[c]) + from_bf16(rr[c]));
                row[c] = from_bf16(sr[c]);
            }
        } else {
            for (int c = 0; c < C; c++) row[c] = from_bf16(xr[c]);
        }
        float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
        for (int c = 0; c < C; c++) squares += row[c] * row[c];
        const float inv = 1.0f / sqrtf(squares / (float)C + eps);
        uint16_t *o = out + (int64_t)r * C;
        for (int c = 0; c < C; c++) o[c] = to_bf16(row[c] * inv * wf[c]);
    }
    return 0;
}
