#include "core/threadpool.h"
#include "dsinfer/common.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <unistd.h>

/* Jobs are split into more chunks than threads and claimed from a shared
 * counter, so a thread that the OS deschedules (the machine is shared with
 * HTTP threads, other processes) delays at most the chunk it holds: the
 * others take the rest. The counter packs (job generation << 32 | next
 * chunk); a worker claims with a CAS that fails once a newer job starts, so a
 * late worker can never run a chunk of the wrong job. */
struct dsi_pool {
    int n;                      /* threads including the caller */
    pthread_t *threads;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    _Atomic uint64_t claim;     /* generation << 32 | next chunk index */
    atomic_int done;            /* chunks finished in the current job */
    atomic_int sleepers;
    atomic_int quit;
    /* current job (written before `claim` is published) */
    dsi_pool_fn fn;
    void *ctx;
    int64_t n_items, grain;
    int n_chunks;
};

#define CHUNKS_PER_THREAD 4

static void chunk_range(const dsi_pool *p, int c, int64_t *b, int64_t *e) {
    int64_t units = DSI_CEIL_DIV(p->n_items, p->grain);
    int64_t per = units / p->n_chunks, rem = units % p->n_chunks;
    int64_t ub = c * per + (c < rem ? c : rem);
    int64_t ue = ub + per + (c < rem ? 1 : 0);
    *b = DSI_MIN(ub * p->grain, p->n_items);
    *e = DSI_MIN(ue * p->grain, p->n_items);
}

/* Claims and runs chunks of job `gen` until none are left. */
static void run_chunks(dsi_pool *p, uint32_t gen, int tid) {
    for (;;) {
        uint64_t v = atomic_load_explicit(&p->claim, memory_order_acquire);
        if ((uint32_t)(v >> 32) != gen || (int)(uint32_t)v >= p->n_chunks) return;
        if (!atomic_compare_exchange_weak_explicit(&p->claim, &v, v + 1, memory_order_acq_rel, memory_order_acquire))
            continue;
        int64_t b, e;
        chunk_range(p, (int)(uint32_t)v, &b, &e);
        if (b < e) p->fn(p->ctx, b, e, tid);
        atomic_fetch_add_explicit(&p->done, 1, memory_order_acq_rel);
    }
}

struct worker_arg { dsi_pool *p; int index; };

static void *worker_main(void *arg) {
    struct worker_arg *wa = arg;
    dsi_pool *p = wa->p;
    int idx = wa->index;
    free(wa);
    uint32_t seen = 0;
    for (;;) {
        uint32_t g;
        int spins = 0;
        while ((g = (uint32_t)(atomic_load_explicit(&p->claim, memory_order_acquire) >> 32)) == seen &&
               !atomic_load(&p->quit)) {
            if (++spins < 20000) {
                __builtin_ia32_pause();
                continue;
            }
            pthread_mutex_lock(&p->mu);
            atomic_fetch_add(&p->sleepers, 1);
            while ((uint32_t)(atomic_load(&p->claim) >> 32) == seen && !atomic_load(&p->quit))
                pthread_cond_wait(&p->cv, &p->mu);
            atomic_fetch_sub(&p->sleepers, 1);
            pthread_mutex_unlock(&p->mu);
        }
        if (atomic_load(&p->quit)) return NULL;
        seen = g;
        run_chunks(p, g, idx);
    }
}

dsi_pool *dsi_pool_create(int n_threads) {
    if (n_threads <= 0) n_threads = (int)sysconf(_SC_NPROCESSORS_ONLN);
    if (n_threads < 1) n_threads = 1;
    dsi_pool *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->n = n_threads;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    p->threads = calloc(n_threads, sizeof(pthread_t));
    if (!p->threads) { free(p); return NULL; }
    for (int i = 1; i < n_threads; i++) {
        struct worker_arg *wa = malloc(sizeof *wa);
        if (!wa) { p->n = i; dsi_pool_destroy(p); return NULL; }
        wa->p = p;
        wa->index = i;
        if (pthread_create(&p->threads[i], NULL, worker_main, wa) != 0) {
            free(wa);
            p->n = i;
            dsi_pool_destroy(p);
            return NULL;
        }
    }
    return p;
}

void dsi_pool_destroy(dsi_pool *p) {
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    atomic_store(&p->quit, 1);
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    for (int i = 1; i < p->n; i++) pthread_join(p->threads[i], NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv);
    free(p->threads);
    free(p);
}

int dsi_pool_size(const dsi_pool *p) { return p ? p->n : 1; }

void dsi_pool_for(dsi_pool *p, int64_t n, int64_t grain, dsi_pool_fn fn, void *ctx) {
    dsi_pool_for_chunks(p, n, grain, 0, fn, ctx);
}

void dsi_pool_for_chunks(dsi_pool *p, int64_t n, int64_t grain, int min_chunks, dsi_pool_fn fn, void *ctx) {
    if (n <= 0) return;
    if (grain < 1) grain = 1;
    if (!p || p->n == 1 || n <= grain) {
        fn(ctx, 0, n, 0);
        return;
    }
    int64_t units = DSI_CEIL_DIV(n, grain);
    p->fn = fn;
    p->ctx = ctx;
    p->n_items = n;
    p->grain = grain;
    p->n_chunks = (int)DSI_MIN(units, DSI_MAX((int64_t)p->n * CHUNKS_PER_THREAD, (int64_t)min_chunks));
    atomic_store_explicit(&p->done, 0, memory_order_relaxed);
    uint32_t gen = (uint32_t)(atomic_load(&p->claim) >> 32) + 1;
    atomic_store(&p->claim, (uint64_t)gen << 32); /* seq_cst: pairs with the sleepers check below */
    if (atomic_load(&p->sleepers) > 0) {
        pthread_mutex_lock(&p->mu);
        pthread_cond_broadcast(&p->cv);
        pthread_mutex_unlock(&p->mu);
    }
    run_chunks(p, gen, 0);
    /* a chunk claimed by a descheduled worker: spin briefly, then yield */
    for (int spins = 0; atomic_load_explicit(&p->done, memory_order_acquire) < p->n_chunks; spins++) {
        if (spins < 20000) __builtin_ia32_pause();
        else sched_yield();
    }
}
