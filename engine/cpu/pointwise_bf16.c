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
#include "kernels.h"

#ifdef __AVX512F__
#include <immintrin.h>

/* e^x for 16 floats to a few ulp: x = n ln2 + r, |r| <= ln2 / 2, e^r by its degree-6 Taylor
 * polynomial, 2^n by the exponent bits. Why not expf: gcc calls it once an element (no vector
 * libm without -ffast-math), and SwiGLU's 1536 a row were ~15 us of each layer at batch 1,
 * ~60 us at batch 8, more than the layer's norms and RoPE together. */
static inline __m512 exp16(__m512 x) {
    /* past 89 the result overflows to inf, below -104 it is 0, as expf's; the clamp keeps r
     * small for any finite x (NaN stays NaN) */
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(89.0f)), _mm512_set1_ps(-104.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x); /* ln2, split */
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n); /* p * 2^n */
}

static inline __m512 load_bf16(const uint16_t *p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
#endif

/* gate_up (rows, 2 * I): gate then up, as the fused projection writes them; out (rows, I). */
void silu_mul_bf16(const uint16_t *gate_up, uint16_t *out, int rows, int inter) {
    for (int r = 0; r < rows; r++) {
        const uint16_t *g = gate_up + (int64_t)r * 2 * inter, *u = g + inter;
        uint16_t *o = out + (int64_t)r * inter;
        int i = 0;
#ifdef __AVX512F__
        float y[16];
        for (; i < inter; i += 16) {
            const int n = inter - i < 16 ? inter - i : 16;
            const __mmask16 m = (__mmask16)((1u << n) - 1);
            const __m512 x = load_bf16(g + i, m);
            const __m512 sig = _mm512_div_ps(
                x, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
            _mm512_storeu_ps(y, _mm512_mul_ps(sig, load_bf16(u + i, m)));
            for (int j = 0; j < n; j++) o[i + j] = to_bf16(y[j]); /* PyTorch's rounding */
        }
#endif
        for (; i < inter; i++) {
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
