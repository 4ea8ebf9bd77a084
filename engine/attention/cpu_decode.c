/* Fused paged decode attention for CPU, fp32: one new query token per request attends over its
 * cached K/V, read through its block table where the blocks lie (no gather copy).
 *
 * Built and loaded with ctypes by engine/attention/cpu_kernel.py (gcc -O3 -march=native
 * -fopenmp, no -ffast-math: results must match the PyTorch path to ~1e-5).
 *
 * Work is split over (request, kv head) items, optionally cut along the context into splits
 * (flash-decoding) when there are too few items to keep every thread busy. An item handles the
 * G = H / Hk query heads of its kv head together, so each K/V row is loaded once and reused
 * from L1 by G dot products / axpys. Softmax is online per block: the running max and sum are
 * rescaled once per block, not per token.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* gcc left the per-block helpers out of line when merely `inline`: ~10 % slower, measured */
#define INLINE static inline __attribute__((always_inline))

/* Vectorisation without -ffast-math: the axpys vectorise given restrict; the dot product is a
 * reduction, which gcc may only reorder under `omp simd reduction` (the same reordering SDPA's
 * kernels do). -ffp-contract=fast lets the axpys use FMA (ISO C mode turns contraction off).
 * The kernel is bound by memory latency, not arithmetic (perf), so no more is attempted. */
static inline void scale_row(float *restrict y, float a, int n) {
    for (int i = 0; i < n; i++) y[i] *= a;
}

typedef struct {
    const float *k, *v;    /* (Hk, num_blocks, bs, D) */
    const int64_t *tables; /* (B, max_blocks) */
    int64_t null_block;    /* a block given back mid-request: skipped, never read */
    int num_blocks, bs, max_blocks, D;
} Cache;

static inline float dot(const float *restrict a, const float *restrict b, int n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

/* Blocks lie at random addresses, so the hardware prefetcher restarts at each one and the
 * loads stall (perf put most cycles on the K and V loads; B=8, ctx 2048, block 16, 1 thread:
 * 8.2 ms without prefetch, 5.4 ms with, SDPA 7.1 ms in the same process). Fetch row i of the
 * next block while row i of this one is used (a partial next block prefetches padding rows:
 * harmless, they are still inside the cache tensor, and prefetches never fault). */
static inline void prefetch_row(const float *nxt, int D) {
    for (int d = 0; d < D; d += 64 / (int)sizeof(float)) __builtin_prefetch(nxt + d, 0, 3);
}

/* s[g * bs + i] = qs[g] . kb[i] for the n rows of one block; kn is the next block or NULL. */
INLINE void block_scores(
    const float *restrict qs, const float *restrict kb, const float *kn, float *restrict s,
    int n, int bs, const int G, const int D) {
    for (int i = 0; i < n; i++) {
        if (kn) prefetch_row(kn + (int64_t)i * D, D);
        for (int g = 0; g < G; g++) s[g * bs + i] = dot(qs + g * D, kb + (int64_t)i * D, D);
    }
}

/* acc[g] += sum_i p[g * bs + i] * vb[i] over the n rows of one block; vn: next block. */
INLINE void block_values(
    const float *restrict p, const float *restrict vb, const float *vn, float *restrict out,
    int n, int bs, const int G, const int D) {
    for (int i = 0; i < n; i++) {
        if (vn) prefetch_row(vn + (int64_t)i * D, D);
        for (int g = 0; g < G; g++) {
            const float pi = p[g * bs + i];
            const float *restrict vr = vb + (int64_t)i * D;
            float *restrict o = out + g * D;
#pragma omp simd
            for (int d = 0; d < D; d++) o[d] += pi * vr[d];
        }
    }
}

/* Online softmax over one block's scores s (G, bs), first n valid: updates the running max m
 * and sum l, rescales acc (G, D) when the max grows, and turns s into exp(s - m). */
INLINE void block_softmax(
    float *restrict s, float *restrict acc, float *restrict m, float *restrict l, int n,
    int bs, const int G, const int D) {
    for (int g = 0; g < G; g++) {
        float *sg = s + g * bs, mx = m[g], sum = 0.0f;
        for (int i = 0; i < n; i++) mx = sg[i] > mx ? sg[i] : mx;
        if (mx > m[g]) { /* new max: rescale what was summed so far (exp(-inf) = 0) */
            const float corr = expf(m[g] - mx);
            l[g] *= corr;
            scale_row(acc + g * D, corr, D);
            m[g] = mx;
        }
        for (int i = 0; i < n; i++) sum += (sg[i] = expf(sg[i] - mx));
        l[g] += sum;
    }
}

/* Attend queries qs (G, D), pre-scaled, over tokens [t0, t1) of one request's kv head `j`.
 * Leaves unnormalised acc (G, D), running max m (G) and sum l (G); s is (G, bs) scratch.
 * Returns 0, or -1 if the table holds a block id outside the cache (that block is skipped). */
INLINE int attend(const Cache *c, const float *restrict qs, int b, int j, int t0, int t1,
                  float *restrict acc, float *restrict m, float *restrict l, float *restrict s,
                  const int G) {
    const int D = c->D, bs = c->bs;
    const int64_t *table = c->tables + (int64_t)b * c->max_blocks;
    const int64_t head = (int64_t)j * c->num_blocks;
    int status = 0;
    for (int g = 0; g < G; g++) m[g] = -INFINITY, l[g] = 0.0f;
    memset(acc, 0, sizeof(float) * (size_t)G * D);
    for (int t = t0; t < t1;) {
        const int off = t % bs, n = (bs - off < t1 - t) ? bs - off : t1 - t;
        const int64_t blk = table[t / bs];
        t += n;
        if (blk == c->null_block) continue; /* its tokens are gone: they get no weight */
        if (blk < 0 || blk >= c->num_blocks) {
            status = -1;
            continue;
        }
        const int64_t row0 = ((head + blk) * bs + off) * (int64_t)D;
        const float *kn = NULL, *vn = NULL;
        if (t < t1) { /* t already points at the next block */
            const int64_t nb = table[t / bs];
            if (nb >= 0 && nb < c->num_blocks && nb != c->null_block) {
                kn = c->k + (head + nb) * bs * (int64_t)D;
                vn = c->v + (head + nb) * bs * (int64_t)D;
            }
        }
        block_scores(qs, c->k + row0, kn, s, n, bs, G, D);
        block_softmax(s, acc, m, l, n, bs, G, D);
        block_values(s, c->v + row0, vn, acc, n, bs, G, D);
    }
    return status;
}

/* Cuts per request so that there are ~8 work items per thread (dynamic scheduling then evens
 * out unequal contexts), but no split shorter than MIN_SPLIT tokens: merging splits costs a
 * pass over (G, D) per split, and shorter runs stop amortising the per-item setup. */
#define MIN_SPLIT 256

static int num_splits(int pairs, int nthreads, int max_ctx) {
    if (nthreads <= 1 || pairs >= 8 * nthreads) return 1;
    int want = (8 * nthreads + pairs - 1) / pairs;
    int most = max_ctx / MIN_SPLIT;
    if (want > most) want = most;
    return want < 1 ? 1 : want;
}

/* q (B, H, D), out (B, H, D); query head h reads kv head h / (H / Hk). context_lens (B,)
 * count valid tokens, so table entries past them are never read; entries equal to null_block
 * are skipped (a request with only null blocks gets zeros). Returns 0, or -1 if a block id
 * was out of range (out is then incomplete) or scratch could not be allocated. */
int paged_decode_f32(const float *q, const float *k_cache, const float *v_cache,
                     const int64_t *block_tables, const int64_t *context_lens, float *out, int B,
                     int H, int Hk, int D, int num_blocks, int block_size,
                     int max_blocks_per_seq, float scale, int nthreads, int64_t null_block) {
    const int G = H / Hk, pairs = B * Hk, cap = max_blocks_per_seq * block_size;
    const Cache c = {k_cache, v_cache, block_tables, null_block, num_blocks, block_size,
                     max_blocks_per_seq, D};
    int max_ctx = 0;
    for (int b = 0; b < B; b++) {
        const int64_t n = context_lens[b];
        if (n > max_ctx) max_ctx = n > cap ? cap : (int)n;
    }
    const int splits = num_splits(pairs, nthreads, max_ctx);
    const int items = pairs * splits;
    const size_t part = (size_t)G * (D + 2); /* acc (G, D), m (G), l (G) of one split */
    float *parts = NULL;
    if (splits > 1 && !(parts = malloc(sizeof(float) * part * items))) return -1;
    int status = 0;
#pragma omp parallel num_threads(nthreads) reduction(min : status)
    {
        /* per-thread scratch: pre-scaled queries, block scores, and a split's state */
        float *qs = malloc(sizeof(float) * ((size_t)G * D + (size_t)G * block_size + part));
        if (!qs) status = -1;
        float *s = qs + (size_t)G * D, *own = s + (size_t)G * block_size;
        /* nowait: with no splits the only barrier is the region's end. Each barrier costs a
         * scheduler time slice when another process keeps both cores busy */
#pragma omp for schedule(dynamic, 1) nowait
        for (int w = 0; w < items; w++) {
            if (!qs) continue;
            const int pair = w / splits, sp = w % splits, b = pair / Hk, j = pair % Hk;
            int64_t ctx = context_lens[b];
            ctx = ctx < 0 ? 0 : (ctx > cap ? cap : ctx);
            /* splits start on block boundaries so each reads whole blocks */
            const int64_t nblk = (ctx + block_size - 1) / block_size;
            const int64_t per = (nblk + splits - 1) / splits * block_size;
            const int t0 = (int)(sp * per < ctx ? sp * per : ctx);
            const int t1 = (int)((sp + 1) * per < ctx ? (sp + 1) * per : ctx);
            const float *qrow = q + ((int64_t)b * H + (int64_t)j * G) * D;
            for (int i = 0; i < G * D; i++) qs[i] = qrow[i] * scale;
            float *acc = splits > 1 ? parts + part * w : own;
            float *m = acc + (size_t)G * D, *l = m + G;
            if (attend(&c, qs, b, j, t0, t1, acc, m, l, s, G) < 0) status = -1;
            if (splits > 1) continue;
            float *o = out + ((int64_t)b * H + (int64_t)j * G) * D;
            for (int g = 0; g < G; g++) { /* an empty context (l = 0) yields zeros, not NaN */
                const float inv = l[g] > 0.0f ? 1.0f / l[g] : 0.0f;
                for (int d = 0; d < D; d++) o[g * D + d] = acc[g * D + d] * inv;
            }
        }
        if (splits > 1) { /* same branch in every thread, so the barrier is legal */
#pragma omp barrier
#pragma omp for schedule(static)
            for (int pair = 0; pair < pairs; pair++) {
                /* merge splits: weights exp(m_s - M) undo each split's own max */
                const float *first = parts + part * pair * splits;
                float *o = out + ((int64_t)(pair / Hk) * H + (int64_t)(pair % Hk) * G) * D;
                for (int g = 0; g < G; g++) {
                    float mx = -INFINITY, total = 0.0f;
                    for (int sp = 0; sp < splits; sp++) {
                        const float ms = first[part * sp + (size_t)G * D + g];
                        mx = ms > mx ? ms : mx;
                    }
                    float *og = o + g * D;
                    memset(og, 0, sizeof(float) * D);
                    for (int sp = 0; sp < splits; sp++) {
                        const float *p = first + part * sp;
                        if (p[(size_t)G * D + G + g] == 0.0f) continue; /* empty split */
                        const float wgt = expf(p[(size_t)G * D + g] - mx);
                        total += wgt * p[(size_t)G * D + G + g];
                        for (int d = 0; d < D; d++) og[d] += wgt * p[g * D + d];
                    }
                    scale_row(og, total > 0.0f ? 1.0f / total : 0.0f, D);
                }
            }
        }
        free(qs);
    }
    free(parts);
    return status;
}
