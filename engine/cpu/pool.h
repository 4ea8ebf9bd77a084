/* The worker pool every CPU kernel of the lab shares (engine/cpu/pool.c).
 *
 * A call is cut into `items` claimed one at a time; the calling thread works too, and helper
 * threads join when they are awake in time. One pool for all kernels: a decode step alternates
 * attention and matmuls within a millisecond, and two pools' helpers, each staying awake for
 * the next call, would fight over the same two cores. */
#pragma once
#include <stdatomic.h>
#include <stddef.h>

/* Run item `item` of the call whose arguments are `ctx`, with `scratch` floats of per-thread
 * scratch; an item that fails stores a negative value in *status. */
typedef void (*pool_item_fn)(const void *ctx, int item, float *scratch, atomic_int *status);

/* Run items [0, items) with up to `nthreads` threads (the caller included), each with
 * `scratch_floats` floats of scratch. Returns 0, the first negative status an item stored, or
 * -1 when scratch could not be allocated. Calls are serialised. */
int pool_run(pool_item_fn run, const void *ctx, int items, size_t scratch_floats, int nthreads);
