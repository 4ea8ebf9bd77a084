/* The worker pool of the CPU kernels (pool.h): help-first work claiming, shared by all calls.
 *
 * A call is cut into items claimed one at a time. The calling thread claims items itself and
 * helper threads join if they are awake in time ("help first"): the call waits only for items
 * a helper has actually claimed, never for a helper to arrive. With OpenMP's fork/join, every
 * call (one per layer per decode step) ended in a barrier that waited for every thread; when
 * another process held the second core, that thread was descheduled and each barrier cost a
 * scheduler time slice, which made the decode kernel 2.7-2.9x slower than SDPA on a busy 2-core
 * machine (bench/paged_attention.py --busy).
 *
 * Claims are tagged with the job's generation (one 64-bit atomic: generation << 32 | next
 * item), so a helper that wakes late cannot claim an item of a later job with a stale view.
 * Calls are serialised by a mutex: concurrent engines in one process share the helpers. */
#include "pool.h"

#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#define MAX_HELPERS 64
#define SPIN_POLLS 2000 /* polls of the caller before it yields its core to a helper */
/* A helper stays awake this long after a job, yielding between polls, before it sleeps. A
 * decode step calls several times per layer, a fraction of a millisecond apart; a helper that
 * slept in between woke too late to take a share of the next call (the idle vCPU halts, and
 * waking it costs more than the call), which made the decode kernel up to 2x slower on a quiet
 * machine. The yield leaves the core to any other runnable thread (torch's own) while it
 * waits. */
#define HELPER_AWAKE_NS 300000

typedef struct {
    pool_item_fn run;
    const void *ctx; /* the caller's arguments: valid until every claimed item is done */
    int items;
    size_t scratch;
} Job;

static struct {
    pthread_mutex_t call;         /* one call at a time */
    pthread_mutex_t mu;           /* guards job, generation and the helpers' wake-up */
    pthread_cond_t wake;
    Job job;                      /* the current call's job (written under mu) */
    uint32_t generation;
    _Atomic uint32_t published;   /* = generation, readable without mu by a helper awake */
    _Atomic uint64_t claim;       /* generation << 32 | next item */
    atomic_int done;              /* items of the current generation finished */
    atomic_int status;
    int helpers;
    pthread_t threads[MAX_HELPERS];
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};

/* Claim one item of generation `gen`, or -1 when it has none left (or a newer job began). */
static int claim(uint32_t gen, int items) {
    uint64_t v = atomic_load(&pool.claim);
    for (;;) {
        if ((uint32_t)(v >> 32) != gen || (int)(uint32_t)v >= items) return -1;
        if (atomic_compare_exchange_weak(&pool.claim, &v, v + 1)) return (int)(uint32_t)v;
    }
}

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static void *helper_main(void *arg) {
    (void)arg;
    float *scratch = NULL;
    size_t have = 0;
    uint32_t seen = 0;
    for (;;) {
        for (const int64_t until = now_ns() + HELPER_AWAKE_NS;
             atomic_load(&pool.published) == seen && now_ns() < until;)
            sched_yield();
        pthread_mutex_lock(&pool.mu);
        while (pool.generation == seen) pthread_cond_wait(&pool.wake, &pool.mu);
        const Job job = pool.job; /* a snapshot: valid for the generation it was read in */
        const uint32_t gen = seen = pool.generation;
        pthread_mutex_unlock(&pool.mu);
        if (!scratch || job.scratch > have) {
            free(scratch);
            have = job.scratch > 0 ? job.scratch : 1;
            if (!(scratch = malloc(sizeof(float) * have))) have = 0;
        }
        if (!scratch) continue; /* out of memory: leave the items to the caller */
        for (int w; (w = claim(gen, job.items)) >= 0;) {
            job.run(job.ctx, w, scratch, &pool.status);
            atomic_fetch_add(&pool.done, 1);
        }
    }
    return NULL;
}

static void start_helpers(int wanted) {
    if (wanted > MAX_HELPERS) wanted = MAX_HELPERS;
    while (pool.helpers < wanted) {
        if (pthread_create(&pool.threads[pool.helpers], NULL, helper_main, NULL) != 0) break;
        pthread_detach(pool.threads[pool.helpers]);
        pool.helpers++;
    }
}

int pool_run(pool_item_fn run, const void *ctx, int items, size_t scratch_floats, int nthreads) {
    float *mine = malloc(sizeof(float) * (scratch_floats > 0 ? scratch_floats : 1));
    if (!mine) return -1;
    pthread_mutex_lock(&pool.call);
    atomic_store(&pool.status, 0);
    atomic_store(&pool.done, 0);
    const int helpers = items > 1 ? nthreads - 1 : 0;
    pthread_mutex_lock(&pool.mu);
    pool.job = (Job){run, ctx, items, scratch_floats};
    const uint32_t gen = ++pool.generation;
    atomic_store(&pool.claim, (uint64_t)gen << 32);
    atomic_store(&pool.published, gen);
    if (helpers > 0) {
        start_helpers(helpers);
        pthread_cond_broadcast(&pool.wake);
    }
    pthread_mutex_unlock(&pool.mu);
    int finished = 0;
    for (int w; (w = claim(gen, items)) >= 0; finished++) run(ctx, w, mine, &pool.status);
    atomic_fetch_add(&pool.done, finished);
    /* only items a helper claimed are waited for; yield so a descheduled helper can run */
    for (int spins = 0; atomic_load(&pool.done) < items; spins++)
        if (spins > SPIN_POLLS) sched_yield();
    const int status = atomic_load(&pool.status);
    pthread_mutex_unlock(&pool.call);
    free(mine);
    return status;
}
