/* A fixed pool of compute threads, sized once at start-up.
 *
 * dsi_pool_for() splits [0, n) into contiguous chunks, one per thread, and
 * runs fn on each (the calling thread takes chunk 0). It returns when all
 * chunks are done. Workers spin briefly between jobs (decode issues many
 * small jobs per step) and then sleep on a condition variable.
 *
 * Not reentrant: one dsi_pool_for at a time per pool (callers serialise). */
#ifndef DSI_CORE_THREADPOOL_H
#define DSI_CORE_THREADPOOL_H

#include <stdint.h>

typedef struct dsi_pool dsi_pool;

/* fn(ctx, begin, end, thread_index) processes items [begin, end). */
typedef void (*dsi_pool_fn)(void *ctx, int64_t begin, int64_t end, int thread_index);

/* n_threads <= 0 means "all online CPUs". Returns NULL on failure. */
dsi_pool *dsi_pool_create(int n_threads);
void dsi_pool_destroy(dsi_pool *p); /* NULL is a no-op */
int dsi_pool_size(const dsi_pool *p);

/* Runs fn over [0, n) in chunks aligned to `grain` items. p may be NULL
 * (runs inline on the caller). */
void dsi_pool_for(dsi_pool *p, int64_t n, int64_t grain, dsi_pool_fn fn, void *ctx);
/* Same with at least `min_chunks` chunks (dsi_pool_for takes 4 per thread):
 * for a big job, smaller chunks keep the threads' finishing times close. */
void dsi_pool_for_chunks(dsi_pool *p, int64_t n, int64_t grain, int min_chunks, dsi_pool_fn fn, void *ctx);

#endif
