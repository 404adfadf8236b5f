#include "core/threadpool.h"
#include "dsinfer/common.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <unistd.h>

struct dsi_pool {
    int n;                      /* threads including the caller */
    pthread_t *threads;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    atomic_uint_fast64_t generation; /* bumped per job */
    atomic_int pending;         /* worker chunks not yet finished */
    atomic_int quit;
    /* current job */
    dsi_pool_fn fn;
    void *ctx;
    int64_t n_items, grain;
};

struct worker_arg { dsi_pool *p; int index; };

static void chunk_of(const dsi_pool *p, int idx, int64_t *b, int64_t *e) {
    int64_t units = DSI_CEIL_DIV(p->n_items, p->grain);
    int64_t per = units / p->n, rem = units % p->n;
    int64_t ub = idx * per + (idx < rem ? idx : rem);
    int64_t ue = ub + per + (idx < rem ? 1 : 0);
    *b = DSI_MIN(ub * p->grain, p->n_items);
    *e = DSI_MIN(ue * p->grain, p->n_items);
}

static void *worker_main(void *arg) {
    struct worker_arg *wa = arg;
    dsi_pool *p = wa->p;
    int idx = wa->index;
    free(wa);
    uint64_t seen = 0;
    for (;;) {
        uint64_t g;
        int spins = 0;
        while ((g = atomic_load_explicit(&p->generation, memory_order_acquire)) == seen &&
               !atomic_load(&p->quit)) {
            if (++spins < 20000) {
                __builtin_ia32_pause();
                continue;
            }
            pthread_mutex_lock(&p->mu);
            while (atomic_load(&p->generation) == seen && !atomic_load(&p->quit))
                pthread_cond_wait(&p->cv, &p->mu);
            pthread_mutex_unlock(&p->mu);
        }
        if (atomic_load(&p->quit)) return NULL;
        seen = g;
        int64_t b, e;
        chunk_of(p, idx, &b, &e);
        if (b < e) p->fn(p->ctx, b, e, idx);
        atomic_fetch_sub_explicit(&p->pending, 1, memory_order_acq_rel);
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
    if (n <= 0) return;
    if (grain < 1) grain = 1;
    if (!p || p->n == 1 || n <= grain) {
        fn(ctx, 0, n, 0);
        return;
    }
    p->fn = fn;
    p->ctx = ctx;
    p->n_items = n;
    p->grain = grain;
    atomic_store(&p->pending, p->n - 1);
    pthread_mutex_lock(&p->mu);
    atomic_fetch_add_explicit(&p->generation, 1, memory_order_release);
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    int64_t b, e;
    chunk_of(p, 0, &b, &e);
    if (b < e) fn(ctx, b, e, 0);
    /* spin (the usual wait is microseconds); yield if a worker was descheduled */
    for (int spins = 0; atomic_load_explicit(&p->pending, memory_order_acquire) > 0; spins++) {
        if (spins < 20000) __builtin_ia32_pause();
        else sched_yield();
    }
}
