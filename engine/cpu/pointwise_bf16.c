/* The decode step's pointwise ops on bf16 activations, each one C pass in fp32 arithmetic
 * with one rounding to bf16 at the end: SwiGLU's silu(gate) * up, and RoPE in place.
 *
 * Why: at decode sizes each PyTorch op costs its dispatch and allocation, not its arithmetic;
 * silu * up was three ops a layer (chunk, silu, mul) and RoPE six (chunk, neg, cat, two
 * multiplies, add), ~1.5 ms of a ~17 ms SmolLM2 step at batch 1. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

/* gate_up (rows, 2 * I): gate then up, as the fused projection writes them; out (rows, I). */
void silu_mul_bf16(const uint16_t *gate_up, uint16_t *out, int rows, int inter) {
    for (int r = 0; r < rows; r++) {
        const uint16_t *g = gate_up + (int64_t)r * 2 * inter, *u = g + inter;
        uint16_t *o = out + (int64_t)r * inter;
        for (int i = 0; i < inter; i++) {
            const float x = from_bf16(g[i]);
            o[i] = to_bf16(x / (1.0f + expf(-x)) * from_bf16(u[i]));
        }
    }
}

/* x (rows, heads_total, D) in place: the first `heads` heads of each row rotated by that row's
 * cos, sin (rows, D), HF's rotate_half layout: out = x * cos + cat(-x2, x1) * sin. */
void rope_bf16(uint16_t *x, const uint16_t *cos, const uint16_t *sin, int rows, int heads,
               int heads_total, int D) {
    const int half = D / 2;
    for (int r = 0; r < rows; r++) {
        const uint16_t *c = cos + (int64_t)r * D, *s = sin + (int64_t)r * D;
        for (int h = 0; h < heads; h++) {
            uint16_t *v = x + ((int64_t)r * heads_total + h) * D;
            for (int i = 0; i < half; i++) {
                const float x1 = from_bf16(v[i]), x2 = from_bf16(v[i + half]);
                v[i] = to_bf16(x1 * from_bf16(c[i]) - x2 * from_bf16(s[i]));
                v[i + half] = to_bf16(x2 * from_bf16(c[i + half]) + x1 * from_bf16(s[i + half]));
            }
        }
    }
}
