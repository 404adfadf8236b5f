/* The latent KV pool: one allocation, a free list, reference counts.
 * Not thread-safe: the scheduler's thread owns it (ARCHITECTURE-SKETCH). */
#include "dsinfer/kv.h"

#include <stdlib.h>

struct dsi_kv_pool {
    int n_layers, kv_dim, block_tokens, n_blocks;
    size_t block_floats;   /* n_layers * block_tokens * kv_dim */
    float *data;           /* [n_blocks][n_layers][block_tokens][kv_dim] */
    int *refcount;         /* [n_blocks] */
    int *free_list;        /* stack of free ids */
    int n_free;
};

int dsi_kv_pool_create(int n_layers, int kv_dim, int block_tokens, int n_blocks, dsi_kv_pool **out) {
    *out = NULL;
    if (n_layers <= 0 || kv_dim <= 0 || block_tokens <= 0 || n_blocks <= 0)
        return dsi_error(DSI_EINVAL, "kv pool: bad geometry (%d layers, dim %d, %d tokens/block, %d blocks)", n_layers,
                         kv_dim, block_tokens, n_blocks);
    dsi_kv_pool *p = calloc(1, sizeof *p);
    if (!p) return dsi_error(DSI_ENOMEM, "out of memory");
    p->n_layers = n_layers;
    p->kv_dim = kv_dim;
    p->block_tokens = block_tokens;
    p->n_blocks = n_blocks;
    p->block_floats = (size_t)n_layers * block_tokens * kv_dim;
    p->data = dsi_alloc(p->block_floats * n_blocks * sizeof(float));
    p->refcount = calloc(n_blocks, sizeof(int));
    p->free_list = malloc(sizeof(int) * n_blocks);
    if (!p->data || !p->refcount || !p->free_list) {
        size_t bytes = p->block_floats * sizeof(float);
        dsi_kv_pool_destroy(p);
        return dsi_error(DSI_ENOMEM, "kv pool: cannot allocate %d blocks of %zu bytes", n_blocks, bytes);
    }
    for (int i = 0; i < n_blocks; i++) p->free_list[i] = n_blocks - 1 - i; /* pop gives 0,1,2... */
    p->n_free = n_blocks;
    *out = p;
    return DSI_OK;
}

void dsi_kv_pool_destroy(dsi_kv_pool *p) {
    if (!p) return;
    dsi_free(p->data);
    free(p->refcount);
    free(p->free_list);
    free(p);
}

int dsi_kv_block_tokens(const dsi_kv_pool *p) { return p->block_tokens; }
int dsi_kv_n_blocks(const dsi_kv_pool *p) { return p->n_blocks; }
int dsi_kv_n_free(const dsi_kv_pool *p) { return p->n_free; }
int dsi_kv_dim(const dsi_kv_pool *p) { return p->kv_dim; }
int dsi_kv_n_layers(const dsi_kv_pool *p) { return p->n_layers; }
size_t dsi_kv_block_bytes(const dsi_kv_pool *p) { return p->block_floats * sizeof(float); }

int dsi_kv_alloc(dsi_kv_pool *p) {
    if (p->n_free == 0) return -1;
    int b = p->free_list[--p->n_free];
    p->refcount[b] = 1;
    return b;
}

void dsi_kv_retain(dsi_kv_pool *p, int b) {
    if (b >= 0 && b < p->n_blocks && p->refcount[b] > 0) p->refcount[b]++;
}

int dsi_kv_release(dsi_kv_pool *p, int b) {
    if (b < 0 || b >= p->n_blocks || p->refcount[b] <= 0) return 0;
    if (--p->refcount[b] == 0) {
        p->free_list[p->n_free++] = b;
        return 1;
    }
    return 0;
}

int dsi_kv_refcount(const dsi_kv_pool *p, int b) { return b >= 0 && b < p->n_blocks ? p->refcount[b] : 0; }

float *dsi_kv_block_layer(dsi_kv_pool *p, int b, int layer) {
    return p->data + (size_t)b * p->block_floats + (size_t)layer * p->block_tokens * p->kv_dim;
}

float *dsi_kv_token(dsi_kv_pool *p, int b, int layer, int t) {
    return dsi_kv_block_layer(p, b, layer) + (size_t)t * p->kv_dim;
}

void *dsi_kv_block_data(dsi_kv_pool *p, int b) { return p->data + (size_t)b * p->block_floats; }
