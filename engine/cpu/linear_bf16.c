/* y = x @ w.T for bf16 x (M, K), w (N, K) and y (M, N), with fp32 accumulation: the decode
 * step's matmuls on CPUs with AVX512-BF16.
 *
 * Why a kernel: a decode step at small batch is a row of GEMVs whose time is reading the
 * weights once. PyTorch's CPU bf16 matmul (oneDNN) read SmolLM2's weights at 13-19 GB/s on the
 * 2-core EPYC VMs, against ~50 GB/s for a plain read (bench/roofline.py). Here each item
 * streams a run of weight rows once, with VDPBF16PS (32 bf16 products a 512-bit instruction
 * into 16 fp32 sums); the few activation rows stay in L1 and are reused for every weight row.
 * From 8 activation rows on, the arithmetic, not memory, is the limit, and 4x4 tiles of
 * weight rows by activation rows load each operand once for four products.
 *
 * Items are runs of output rows for the shared worker pool (pool.c). Results
 * are rounded to bf16 nearest-even, as PyTorch rounds its fp32 accumulators; only the order of
 * the additions differs, so a result may differ from F.linear's in its last bf16 bit.
 *
 * On a CPU without AVX512-BF16 (the code is built -march=native) `linear_bf16` returns -2 and
 * the caller keeps F.linear. */
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "kernels.h"
#include "pool.h"

#ifdef __AVX512BF16__
#include <immintrin.h>

/* activation rows sharing one pass over a weight row: two accumulators each (even and odd
 * 32-wide chunks, so a row's sum is two dependency chains, not one), 2 * XS + 2 registers */
#define XS 4

typedef struct {
    const uint16_t *x, *w;
    uint16_t *y;
    int M, N, K, rows_per_item;
} Linear;

#define LOAD(p) ((__m512bh)_mm512_loadu_si512(p))
#define LOAD_TAIL(mask, p) ((__m512bh)_mm512_maskz_loadu_epi16(mask, p))

/* One weight row against activation rows [m0, m0 + xs): the row is read from memory once
 * (for the first group; from L1 after) in order. Reading one row at a time, start to end, is
 * what keeps the hardware prefetcher ahead: interleaving four rows' chunks measured 20 GB/s
 * where this reads 26, the same as a plain sum over the weights. */
static void row_dot(const Linear *a, const uint16_t *w, int n, int m0, int xs) {
    const int K = a->K, K64 = K & ~63, K32 = K & ~31;
    const __mmask32 tail = (__mmask32)((1ull << (K - K32)) - 1);
    __m512 even[XS], odd[XS];
    for (int j = 0; j < xs; j++) even[j] = odd[j] = _mm512_setzero_ps();
    const uint16_t *x = a->x + (int64_t)m0 * K;
    int k = 0;
    for (; k < K64; k += 64) {
        const __m512bh w0 = LOAD(w + k), w1 = LOAD(w + k + 32);
        for (int j = 0; j < xs; j++) {
            even[j] = _mm512_dpbf16_ps(even[j], w0, LOAD(x + (int64_t)j * K + k));
            odd[j] = _mm512_dpbf16_ps(odd[j], w1, LOAD(x + (int64_t)j * K + k + 32));
        }
    }
    if (k < K32) {
        const __m512bh w0 = LOAD(w + k);
        for (int j = 0; j < xs; j++)
            even[j] = _mm512_dpbf16_ps(even[j], w0, LOAD(x + (int64_t)j * K + k));
        k += 32;
    }
    if (tail) {
        const __m512bh w0 = LOAD_TAIL(tail, w + k);
        for (int j = 0; j < xs; j++)
            odd[j] = _mm512_dpbf16_ps(odd[j], w0, LOAD_TAIL(tail, x + (int64_t)j * K + k));
    }
    for (int j = 0; j < xs; j++) {
        const float sum = _mm512_reduce_add_ps(_mm512_add_ps(even[j], odd[j]));
        a->y[(int64_t)(m0 + j) * a->N + n] = to_bf16(sum);
    }
}

/* Four weight rows [n, n + 4) against four activation rows [m0, m0 + 4), one accumulator a
 * pair: each 32-wide chunk loaded (4 weight + 4 activation loads) feeds 16 VDPBF16PS, where
 * row_dot's 4-row pass needs 10 loads for 8. From 4 token rows up the step is bound by loads
 * and reductions, not memory: all of SmolLM2's matmuls at 8 rows took 2.7x their 1-row time.
 * The next four weight rows are prefetched a line a chunk, as the hardware prefetcher follows
 * one stream far better than the four read here. 21 of the 32 vector registers. */
#define TILE_MIN_ROWS 8

static void tile_4x4(const Linear *a, int n, int m0) {
    const int K = a->K, K32 = K & ~31;
    const __mmask32 tail = (__mmask32)((1ull << (K - K32)) - 1);
    const uint16_t *w = a->w + (int64_t)n * K, *x = a->x + (int64_t)m0 * K;
    /* two tiles ahead, in address order: the tile reads its 4 rows (one contiguous run of
     * memory) in 4 interleaved places, which the hardware prefetcher follows badly */
    const char *ahead = n + 12 <= a->N ? (const char *)(w + 8 * (int64_t)K) : NULL;
    __m512 acc[4][4];
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++) acc[i][j] = _mm512_setzero_ps();
    for (int k = 0; k < K32; k += 32) {
        if (ahead) /* 4 rows of 2K bytes over K/32 chunks: 4 lines a chunk */
            for (int i = 0; i < 4; i++) _mm_prefetch(ahead + (int64_t)k * 8 + 64 * i, _MM_HINT_T0);
        __m512bh wv[4];
        for (int i = 0; i < 4; i++) wv[i] = LOAD(w + (int64_t)i * K + k);
        for (int j = 0; j < 4; j++) {
            const __m512bh xv = LOAD(x + (int64_t)j * K + k);
            for (int i = 0; i < 4; i++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], wv[i], xv);
        }
    }
    if (tail) {
        __m512bh wv[4];
        for (int i = 0; i < 4; i++) wv[i] = LOAD_TAIL(tail, w + (int64_t)i * K + K32);
        for (int j = 0; j < 4; j++) {
            const __m512bh xv = LOAD_TAIL(tail, x + (int64_t)j * K + K32);
            for (int i = 0; i < 4; i++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], wv[i], xv);
        }
    }
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++)
            a->y[(int64_t)(m0 + j) * a->N + n + i] = to_bf16(_mm512_reduce_add_ps(acc[i][j]));
}

static void run_rows(const void *ctx, int item, float *scratch, atomic_int *status) {
    (void)scratch, (void)status;
    const Linear *a = ctx;
    const int n0 = item * a->rows_per_item;
    const int n1 = n0 + a->rows_per_item < a->N ? n0 + a->rows_per_item : a->N;
    /* activation rows the 4x4 tiles cover: from TILE_MIN_ROWS up (below it row_dot's single
     * stream reads memory faster than the tiles compute) */
    const int tiled_m = a->M >= TILE_MIN_ROWS ? a->M & ~3 : 0;
    int n = n0;
    if (tiled_m)
        for (; n + 4 <= n1; n += 4) {
            for (int m0 = 0; m0 < tiled_m; m0 += 4) tile_4x4(a, n, m0);
            for (int i = 0; i < 4; i++) /* the rows past the last tile: from L1 now */
                for (int m0 = tiled_m; m0 < a->M; m0 += XS)
                    row_dot(a, a->w + (int64_t)(n + i) * a->K, n + i, m0,
                            a->M - m0 < XS ? a->M - m0 : XS);
        }
    for (; n < n1; n++)
        for (int m0 = 0; m0 < a->M; m0 += XS)
            row_dot(a, a->w + (int64_t)n * a->K, n, m0, a->M - m0 < XS ? a->M - m0 : XS);
}

/* x (M, K), w (N, K), y (M, N), all contiguous bf16 bit patterns. Returns 0, or -1 when the
 * pool could not allocate. */
int linear_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, int M, int N, int K,
                int nthreads) {
    /* ~8 items a thread so an item left to a descheduled helper costs little, but no item
     * under 64 rows: each item sets up its own accumulators and claim */
    int per = (N + 8 * nthreads - 1) / (8 * nthreads);
    per = per < 64 ? 64 : per;
    const Linear a = {x, w, y, M, N, K, per};
    return pool_run(run_rows, &a, (N + per - 1) / per, 0, nthreads);
}

#else

int linear_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, int M, int N, int K,
                int nthreads) {
    (void)x, (void)w, (void)y, (void)M, (void)N, (void)K, (void)nthreads;
    return -2; /* built for a CPU without AVX512-BF16 */
}

#endif
