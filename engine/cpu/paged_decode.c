/* Fused paged decode attention for CPU: one new fp32 query token per request attends over its
 * cached K/V, read through its block table where the blocks lie (no gather copy). Caches are
 * fp32, or quantized (fp8 e4m3, int8, int4 with fp16 scales and minimums, KIVI's layout): a
 * quantized block is dequantized into a small per-thread buffer inside the block loop, and a
 * request's open last block is read from the full-precision residual.
 *
 * Built into the lab's CPU library with the worker pool (engine/cpu/library.py: gcc -O3
 * -march=native -pthread -fopenmp-simd, no -ffast-math: results must match the PyTorch path to
 * ~1e-5) and called through engine/attention/cpu_kernel.py.
 *
 * Work is split over (request, kv head) items, optionally cut along the context into splits
 * (flash-decoding) when there are too few items to keep every thread busy. An item handles the
 * G = H / Hk query heads of its kv head together, so each K/V row is loaded once and reused
 * from L1 by G dot products / axpys. Softmax is online per block: the running max and sum are
 * rescaled once per block, not per token.
 */
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "pool.h"

/* gcc left the per-block helpers out of line when merely `inline`: ~10 % slower, measured */
#define INLINE static inline __attribute__((always_inline))

/* Vectorisation without -ffast-math: the axpys vectorise given restrict; the dot product is a
 * reduction, which gcc may only reorder under `omp simd reduction` (the same reordering SDPA's
 * kernels do). -ffp-contract=fast lets the axpys use FMA (ISO C mode turns contraction off).
 * The kernel is bound by memory latency, not arithmetic (perf), so no more is attempted. */
static inline void scale_row(float *restrict y, float a, int n) {
    for (int i = 0; i < n; i++) y[i] *= a;
}

enum { FMT_F32 = 0, FMT_FP8 = 1, FMT_INT8 = 2, FMT_INT4 = 3, FMT_BF16 = 4, FMT_FP16 = 5 };

typedef struct {
    int format;
    const float *k, *v;        /* FMT_F32: (Hk, num_blocks, bs, D) */
    const uint8_t *kq, *vq;    /* quantized: (Hk, num_blocks, bs, D or D/2) bytes;
                                  bf16/fp16: (Hk, num_blocks, bs, D) 16-bit values */
    const uint16_t *ks, *km;   /* int8/int4 keys: fp16 scale and min (Hk, num_blocks, D) */
    const uint16_t *vs, *vm;   /* int8/int4 values: fp16 (Hk, num_blocks, bs, groups) */
    int groups;                /* value groups per token */
    const float *rk, *rv;      /* residual (Hk, slots, bs, D), fp32 */
    int slots;
    const int64_t *tail_slots; /* (B,): residual slot of the open last block, or -1 */
    float fp8[256];            /* e4m3 byte -> float */
    const int64_t *tables;     /* (B, max_blocks) */
    int64_t null_block;        /* a block given back mid-request: skipped, never read */
    int num_blocks, bs, max_blocks, D;
} Cache;

/* IEEE half -> float, exactly (scales are stored fp16 to keep a block's metadata small) */
static float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    uint32_t bits;
    if (exp == 0) {
        const float sub = ldexpf((float)man, -24); /* zero or subnormal */
        return sign ? -sub : sub;
    }
    bits = exp == 31 ? sign | 0x7f800000u | (man << 13) : sign | ((exp + 112) << 23) | (man << 13);
    float out;
    memcpy(&out, &bits, sizeof out);
    return out;
}

/* float8 e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities, S.1111.111 NaN */
static void fill_fp8_table(float *table) {
    for (int b = 0; b < 256; b++) {
        const int exp = (b >> 3) & 0xf, man = b & 7;
        float v = exp == 0 ? ldexpf((float)man, -9) : ldexpf(1.0f + man / 8.0f, exp - 7);
        if (exp == 15 && man == 7) v = NAN;
        table[b] = (b & 0x80) ? -v : v;
    }
}

/* Rows [off, off + n) of block `blk`, kv head j, dequantized into kout, vout (n, D). */
static void dequant_rows(const Cache *c, int j, int64_t blk, int off, int n, float *kout,
                         float *vout) {
    const int D = c->D, bs = c->bs, packed = c->format == FMT_INT4 ? D / 2 : D;
    const int64_t page = (int64_t)j * c->num_blocks + blk;
    if (c->format == FMT_BF16) { /* bf16 is a float's upper half: one loop gcc vectorises */
        const uint16_t *restrict k16 = (const uint16_t *)c->kq + (page * bs + off) * D;
        const uint16_t *restrict v16 = (const uint16_t *)c->vq + (page * bs + off) * D;
        uint32_t *restrict kw = (uint32_t *)kout, *restrict vw = (uint32_t *)vout;
        for (int i = 0; i < n * D; i++)
            kw[i] = (uint32_t)k16[i] << 16, vw[i] = (uint32_t)v16[i] << 16;
        return;
    }
    if (c->format == FMT_FP16) {
        const uint16_t *k16 = (const uint16_t *)c->kq + (page * bs + off) * D;
        const uint16_t *v16 = (const uint16_t *)c->vq + (page * bs + off) * D;
        for (int i = 0; i < n * D; i++)
            kout[i] = half_to_float(k16[i]), vout[i] = half_to_float(v16[i]);
        return;
    }
    const uint8_t *kq = c->kq + (page * bs + off) * packed, *vq = c->vq + (page * bs + off) * packed;
    if (c->format == FMT_FP8) {
        for (int i = 0; i < n * D; i++) kout[i] = c->fp8[kq[i]], vout[i] = c->fp8[vq[i]];
        return;
    }
    float ks[512], km[512]; /* per channel; D <= 512 is checked by the caller */
    for (int d = 0; d < D; d++)
        ks[d] = half_to_float(c->ks[page * D + d]), km[d] = half_to_float(c->km[page * D + d]);
    const int group = D / c->groups;
    uint8_t kcodes[512], vcodes[512]; /* one token's codes, unpacked: plain loops vectorise */
    for (int i = 0; i < n; i++) {
        const uint8_t *kr = kq + (int64_t)i * packed, *vr = vq + (int64_t)i * packed;
        const int64_t tok = (page * bs + off + i) * c->groups;
        float *restrict ko = kout + (int64_t)i * D, *restrict vo = vout + (int64_t)i * D;
        if (c->format == FMT_INT4) {
            for (int d = 0; d < D / 2; d++) {
                kcodes[2 * d] = kr[d] & 0xf, kcodes[2 * d + 1] = kr[d] >> 4;
                vcodes[2 * d] = vr[d] & 0xf, vcodes[2 * d + 1] = vr[d] >> 4;
            }
            kr = kcodes, vr = vcodes;
        }
        for (int d = 0; d < D; d++) ko[d] = kr[d] * ks[d] + km[d];
        for (int g = 0; g < c->groups; g++) {
            const float sc = half_to_float(c->vs[tok + g]), mn = half_to_float(c->vm[tok + g]);
            for (int d = g * group; d < (g + 1) * group; d++) vo[d] = vr[d] * sc + mn;
        }
    }
}

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
 * Leaves unnormalised acc (G, D), running max m (G) and sum l (G); s is (G, bs) scratch and
 * kbuf, vbuf (bs, D) scratch for dequantized rows. Returns 0, or -1 if the table holds a block
 * id outside the cache (that block is skipped). */
INLINE int attend(const Cache *c, const float *restrict qs, int b, int j, int t0, int t1,
                  int64_t ctx, float *restrict acc, float *restrict m, float *restrict l,
                  float *restrict s, float *kbuf, float *vbuf, const int G) {
    const int D = c->D, bs = c->bs;
    const int64_t *table = c->tables + (int64_t)b * c->max_blocks;
    const int64_t head = (int64_t)j * c->num_blocks;
    const int64_t tail = c->tail_slots ? c->tail_slots[b] : -1, last = (ctx - 1) / bs;
    int status = 0;
    for (int g = 0; g < G; g++) m[g] = -INFINITY, l[g] = 0.0f;
    memset(acc, 0, sizeof(float) * (size_t)G * D);
    for (int t = t0; t < t1;) {
        const int off = t % bs, n = (bs - off < t1 - t) ? bs - off : t1 - t;
        const int64_t index = t / bs, blk = table[index];
        t += n;
        if (blk == c->null_block) continue; /* its tokens are gone: they get no weight */
        if (blk < 0 || blk >= c->num_blocks) {
            status = -1;
            continue;
        }
        const float *kb, *vb, *kn = NULL, *vn = NULL;
        if (index == last && tail >= 0) { /* the open block: as computed, from the residual */
            const int64_t row0 = (((int64_t)j * c->slots + tail) * bs + off) * (int64_t)D;
            kb = c->rk + row0, vb = c->rv + row0;
        } else if (c->format != FMT_F32) {
            dequant_rows(c, j, blk, off, n, kbuf, vbuf);
            kb = kbuf, vb = vbuf;
        } else {
            const int64_t row0 = ((head + blk) * bs + off) * (int64_t)D;
            kb = c->k + row0, vb = c->v + row0;
            if (t < t1) { /* t already points at the next block */
                const int64_t nb = table[t / bs];
                if (nb >= 0 && nb < c->num_blocks && nb != c->null_block) {
                    kn = c->k + (head + nb) * bs * (int64_t)D;
                    vn = c->v + (head + nb) * bs * (int64_t)D;
                }
            }
        }
        block_scores(qs, kb, kn, s, n, bs, G, D);
        block_softmax(s, acc, m, l, n, bs, G, D);
        block_values(s, vb, vn, acc, n, bs, G, D);
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

/* ---- Work items ---------------------------------------------------------------------------
 *
 * A call is cut into items ((request, kv head, context split) triples) that the shared worker
 * pool (engine/cpu/pool.c) runs on the calling thread and its helpers. */

typedef struct {
    const Cache *c;
    const float *q;
    const int64_t *context_lens;
    float *out, *parts;
    int H, Hk, G, splits, items, cap;
    size_t part, scratch;
    float scale;
} Job;

static void run_item(const void *arg, int w, float *scratch, atomic_int *status) {
    const Job *job = arg;
    const Cache *c = job->c;
    const int G = job->G, D = c->D, bs = c->bs, splits = job->splits, Hk = job->Hk, H = job->H;
    float *qs = scratch, *s = qs + (size_t)G * D, *own = s + (size_t)G * bs;
    float *kbuf = own + job->part, *vbuf = kbuf + (size_t)bs * D;
    const int pair = w / splits, sp = w % splits, b = pair / Hk, j = pair % Hk;
    int64_t ctx = job->context_lens[b];
    ctx = ctx < 0 ? 0 : (ctx > job->cap ? job->cap : ctx);
    /* splits start on block boundaries so each reads whole blocks */
    const int64_t nblk = (ctx + bs - 1) / bs, per = (nblk + splits - 1) / splits * bs;
    const int t0 = (int)(sp * per < ctx ? sp * per : ctx);
    const int t1 = (int)((sp + 1) * per < ctx ? (sp + 1) * per : ctx);
    const float *qrow = job->q + ((int64_t)b * H + (int64_t)j * G) * D;
    for (int i = 0; i < G * D; i++) qs[i] = qrow[i] * job->scale;
    float *acc = splits > 1 ? job->parts + job->part * w : own;
    float *m = acc + (size_t)G * D, *l = m + G;
    if (attend(c, qs, b, j, t0, t1, ctx, acc, m, l, s, kbuf, vbuf, G) < 0)
        atomic_store(status, -1);
    if (splits > 1) return;
    float *o = job->out + ((int64_t)b * H + (int64_t)j * G) * D;
    for (int g = 0; g < G; g++) { /* an empty context (l = 0) yields zeros, not NaN */
        const float inv = l[g] > 0.0f ? 1.0f / l[g] : 0.0f;
        for (int d = 0; d < D; d++) o[g * D + d] = acc[g * D + d] * inv;
    }
}

/* Merge each (request, kv head)'s splits: weights exp(m_s - M) undo each split's own max. */
static void merge_splits(const Job *job, int B) {
    const int G = job->G, D = job->c->D, Hk = job->Hk, splits = job->splits;
    const size_t part = job->part;
    for (int pair = 0; pair < B * Hk; pair++) {
        const float *first = job->parts + part * pair * splits;
        float *o = job->out + ((int64_t)(pair / Hk) * job->H + (int64_t)(pair % Hk) * G) * D;
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

/* The decode driver shared by every cache format: q (B, H, D), out (B, H, D); query head h
 * reads kv head h / (H / Hk). context_lens (B,) count valid tokens, so table entries past them
 * are never read. Returns 0, or -1 if a block id was out of range (out is then incomplete) or
 * scratch could not be allocated. */
static int decode(const Cache *c, const float *q, const int64_t *context_lens, float *out,
                  int B, int H, int Hk, float scale, int nthreads) {
    const int G = H / Hk, pairs = B * Hk, D = c->D, bs = c->bs, cap = c->max_blocks * bs;
    int max_ctx = 0;
    for (int b = 0; b < B; b++) {
        const int64_t n = context_lens[b];
        if (n > max_ctx) max_ctx = n > cap ? cap : (int)n;
    }
    Job job = {c, q, context_lens, out, NULL, H, Hk, G, num_splits(pairs, nthreads, max_ctx),
               0, cap, (size_t)G * (D + 2), 0, scale};
    job.items = pairs * job.splits;
    /* per thread: pre-scaled queries, block scores, a split's state, dequantized rows */
    job.scratch = (size_t)G * D + (size_t)G * bs + job.part +
                  (c->format == FMT_F32 ? 0 : 2 * (size_t)bs * D);
    if (job.splits > 1 && !(job.parts = malloc(sizeof(float) * job.part * job.items)))
        return -1;
    const int status = pool_run(run_item, &job, job.items, job.scratch, nthreads);
    if (job.splits > 1) merge_splits(&job, B);
    free(job.parts);
    return status;
}

/* fp32 caches (Hk, num_blocks, bs, D); entries equal to null_block are skipped. */
int paged_decode_f32(const float *q, const float *k_cache, const float *v_cache,
                     const int64_t *block_tables, const int64_t *context_lens, float *out, int B,
                     int H, int Hk, int D, int num_blocks, int block_size,
                     int max_blocks_per_seq, float scale, int nthreads, int64_t null_block) {
    Cache c;
    memset(&c, 0, sizeof c);
    c.format = FMT_F32, c.k = k_cache, c.v = v_cache, c.tables = block_tables;
    c.null_block = null_block, c.num_blocks = num_blocks, c.bs = block_size;
    c.max_blocks = max_blocks_per_seq, c.D = D;
    return decode(&c, q, context_lens, out, B, H, Hk, scale, nthreads);
}

/* Caches other than fp32: format 1 fp8 (k_q, v_q only), 2 int8, 3 int4 (with fp16 k_scale,
 * k_min (Hk, num_blocks, D) and v_scale, v_min (Hk, num_blocks, bs, groups)), 4 bf16 and
 * 5 fp16 (k_q, v_q are the 16-bit caches); residual K/V (Hk, slots, bs, D) fp32 and
 * tail_slots (B,) for each request's open last block (NULL: no residual, float caches). */
int paged_decode_quant(int format, const float *q, const uint8_t *k_q, const uint8_t *v_q,
                       const uint16_t *k_scale, const uint16_t *k_min, const uint16_t *v_scale,
                       const uint16_t *v_min, int groups, const float *res_k,
                       const float *res_v, int slots, const int64_t *tail_slots,
                       const int64_t *block_tables, const int64_t *context_lens, float *out,
                       int B, int H, int Hk, int D, int num_blocks, int block_size,
                       int max_blocks_per_seq, float scale, int nthreads, int64_t null_block) {
    if (D > 512 || format < FMT_FP8 || format > FMT_FP16) return -2;
    Cache c;
    memset(&c, 0, sizeof c);
    c.format = format, c.kq = k_q, c.vq = v_q, c.ks = k_scale, c.km = k_min, c.vs = v_scale;
    c.vm = v_min, c.groups = groups > 0 ? groups : 1, c.rk = res_k, c.rv = res_v;
    c.slots = slots, c.tail_slots = tail_slots, c.tables = block_tables;
    c.null_block = null_block, c.num_blocks = num_blocks, c.bs = block_size;
    c.max_blocks = max_blocks_per_seq, c.D = D;
    fill_fp8_table(c.fp8);
    return decode(&c, q, context_lens, out, B, H, Hk, scale, nthreads);
}
