/* Prefix cache: a hash -> block map over the KV pool, refcounted sharing, and
 * an LRU list of idle cached blocks evicted only when the free list is empty. */
#include "dsinfer/prefix_cache.h"

#include <stdlib.h>
#include <string.h>
#define XXH_STATIC_LINKING_ONLY /* XXH3_state_t on the stack */
#include <xxhash.h>

struct dsi_prefix_cache {
    dsi_kv_pool *kv;
    uint64_t fingerprint;
    int n_blocks, bt;
    /* per block [n_blocks] */
    uint8_t *cached;
    uint64_t *hash, *parent;
    int32_t *tokens;       /* [n_blocks][bt], valid while cached */
    int *lru_prev, *lru_next;
    int lru_head, lru_tail, n_idle, n_cached;
    /* open addressing, linear probing; slots hold block ids, -1 empty */
    int *slots;
    size_t mask;
    uint64_t hit_blocks, evictions, inserts;
};

uint64_t dsi_prefix_block_hash(uint64_t parent, uint64_t fp, const int32_t *tokens, int bt) {
    XXH3_state_t st;
    XXH3_64bits_reset(&st);
    XXH3_64bits_update(&st, &parent, sizeof parent);
    XXH3_64bits_update(&st, &fp, sizeof fp);
    XXH3_64bits_update(&st, tokens, sizeof(int32_t) * (size_t)bt);
    return XXH3_64bits_digest(&st);
}

int dsi_prefix_cache_create(dsi_kv_pool *kv, uint64_t fp, dsi_prefix_cache **out) {
    *out = NULL;
    dsi_prefix_cache *pc = calloc(1, sizeof *pc);
    if (!pc) return dsi_error(DSI_ENOMEM, "out of memory");
    pc->kv = kv;
    pc->fingerprint = fp;
    pc->n_blocks = dsi_kv_n_blocks(kv);
    pc->bt = dsi_kv_block_tokens(kv);
    size_t cap = 16;
    while (cap < (size_t)pc->n_blocks * 2) cap *= 2;
    pc->mask = cap - 1;
    pc->cached = calloc(pc->n_blocks, 1);
    pc->hash = calloc(pc->n_blocks, sizeof(uint64_t));
    pc->parent = calloc(pc->n_blocks, sizeof(uint64_t));
    pc->tokens = malloc(sizeof(int32_t) * (size_t)pc->n_blocks * pc->bt);
    pc->lru_prev = malloc(sizeof(int) * pc->n_blocks);
    pc->lru_next = malloc(sizeof(int) * pc->n_blocks);
    pc->slots = malloc(sizeof(int) * cap);
    if (!pc->cached || !pc->hash || !pc->parent || !pc->tokens || !pc->lru_prev || !pc->lru_next || !pc->slots) {
        dsi_prefix_cache_destroy(pc);
        return dsi_error(DSI_ENOMEM, "prefix cache: out of memory for %d blocks", dsi_kv_n_blocks(kv));
    }
    for (size_t i = 0; i < cap; i++) pc->slots[i] = -1;
    pc->lru_head = pc->lru_tail = -1;
    *out = pc;
    return DSI_OK;
}

/* ---------------------------------------------------------------- LRU list */

static void lru_remove(dsi_prefix_cache *pc, int b) {
    int p = pc->lru_prev[b], n = pc->lru_next[b];
    if (p >= 0) pc->lru_next[p] = n; else pc->lru_head = n;
    if (n >= 0) pc->lru_prev[n] = p; else pc->lru_tail = p;
    pc->n_idle--;
}

static void lru_push_tail(dsi_prefix_cache *pc, int b) {
    pc->lru_prev[b] = pc->lru_tail;
    pc->lru_next[b] = -1;
    if (pc->lru_tail >= 0) pc->lru_next[pc->lru_tail] = b; else pc->lru_head = b;
    pc->lru_tail = b;
    pc->n_idle++;
}

/* ---------------------------------------------------------------- hash map */

static size_t slot_of(const dsi_prefix_cache *pc, uint64_t h) { return (size_t)(h ^ (h >> 29)) & pc->mask; }

/* The cached block equal to (parent, tokens) with chain hash h, or -1. */
static int map_find(const dsi_prefix_cache *pc, uint64_t h, uint64_t parent, const int32_t *tokens) {
    for (size_t i = slot_of(pc, h);; i = (i + 1) & pc->mask) {
        int b = pc->slots[i];
        if (b < 0) return -1;
        if (pc->hash[b] == h && pc->parent[b] == parent &&
            !memcmp(pc->tokens + (size_t)b * pc->bt, tokens, sizeof(int32_t) * pc->bt))
            return b;
    }
}

static void map_put(dsi_prefix_cache *pc, int b) {
    size_t i = slot_of(pc, pc->hash[b]);
    while (pc->slots[i] >= 0) i = (i + 1) & pc->mask;
    pc->slots[i] = b;
}

/* Backward-shift deletion keeps probe runs intact without tombstones. */
static void map_del(dsi_prefix_cache *pc, int b) {
    size_t i = slot_of(pc, pc->hash[b]);
    while (pc->slots[i] != b) i = (i + 1) & pc->mask;
    size_t j = i;
    for (;;) {
        j = (j + 1) & pc->mask;
        int c = pc->slots[j];
        if (c < 0) break;
        size_t home = slot_of(pc, pc->hash[c]);
        /* c may move into the hole at i unless its home lies cyclically in (i, j] */
        int home_in = i <= j ? (home > i && home <= j) : (home > i || home <= j);
        if (!home_in) {
            pc->slots[i] = c;
            i = j;
        }
    }
    pc->slots[i] = -1;
}

/* ---------------------------------------------------------------- API */

static void evict(dsi_prefix_cache *pc, int b) {
    lru_remove(pc, b);
    map_del(pc, b);
    pc->cached[b] = 0;
    pc->n_cached--;
    pc->evictions++;
    dsi_kv_release(pc->kv, b);
}

void dsi_prefix_cache_destroy(dsi_prefix_cache *pc) {
    if (!pc) return;
    if (pc->cached) {
        for (int b = 0; b < pc->n_blocks; b++)
            if (pc->cached[b]) dsi_kv_release(pc->kv, b);
    }
    free(pc->cached);
    free(pc->hash);
    free(pc->parent);
    free(pc->tokens);
    free(pc->lru_prev);
    free(pc->lru_next);
    free(pc->slots);
    free(pc);
}

int dsi_prefix_cache_match(dsi_prefix_cache *pc, const int32_t *tokens, int n_tokens, int max_blocks, int32_t *blocks,
                           uint64_t *hashes) {
    int n = 0;
    uint64_t parent = 0;
    while (n < max_blocks && (n + 1) * pc->bt <= n_tokens) {
        const int32_t *t = tokens + (size_t)n * pc->bt;
        uint64_t h = dsi_prefix_block_hash(parent, pc->fingerprint, t, pc->bt);
        int b = map_find(pc, h, parent, t);
        if (b < 0) break;
        if (dsi_kv_refcount(pc->kv, b) == 1) lru_remove(pc, b); /* idle -> in use */
        dsi_kv_retain(pc->kv, b);
        blocks[n] = b;
        hashes[n] = h;
        parent = h;
        n++;
    }
    pc->hit_blocks += n;
    return n;
}

int dsi_prefix_cache_alloc(dsi_prefix_cache *pc) {
    int b = dsi_kv_alloc(pc->kv);
    if (b >= 0 || pc->lru_head < 0) return b;
    evict(pc, pc->lru_head);
    return dsi_kv_alloc(pc->kv);
}

void dsi_prefix_cache_retain(dsi_prefix_cache *pc, int b) {
    if (b < 0 || b >= pc->n_blocks || dsi_kv_refcount(pc->kv, b) <= 0) return;
    if (pc->cached[b] && dsi_kv_refcount(pc->kv, b) == 1) lru_remove(pc, b); /* idle -> in use */
    dsi_kv_retain(pc->kv, b);
}

void dsi_prefix_cache_release(dsi_prefix_cache *pc, int b) {
    if (b < 0 || b >= pc->n_blocks || dsi_kv_refcount(pc->kv, b) <= 0) return;
    dsi_kv_release(pc->kv, b);
    if (pc->cached[b] && dsi_kv_refcount(pc->kv, b) == 1) lru_push_tail(pc, b);
}

int dsi_prefix_cache_insert(dsi_prefix_cache *pc, int b, uint64_t parent, const int32_t *tokens, uint64_t *hash) {
    uint64_t h = dsi_prefix_block_hash(parent, pc->fingerprint, tokens, pc->bt);
    if (hash) *hash = h;
    if (b < 0 || b >= pc->n_blocks || dsi_kv_refcount(pc->kv, b) <= 0 || pc->cached[b]) return 0;
    if (map_find(pc, h, parent, tokens) >= 0) return 0;
    pc->hash[b] = h;
    pc->parent[b] = parent;
    memcpy(pc->tokens + (size_t)b * pc->bt, tokens, sizeof(int32_t) * pc->bt);
    pc->cached[b] = 1;
    pc->n_cached++;
    pc->inserts++;
    dsi_kv_retain(pc->kv, b);
    map_put(pc, b);
    return 1;
}

int dsi_prefix_cache_n_available(const dsi_prefix_cache *pc) { return dsi_kv_n_free(pc->kv) + pc->n_idle; }

void dsi_prefix_cache_get_stats(const dsi_prefix_cache *pc, dsi_prefix_cache_stats *o) {
    o->n_cached = pc->n_cached;
    o->n_idle = pc->n_idle;
    o->hit_blocks = pc->hit_blocks;
    o->evictions = pc->evictions;
    o->inserts = pc->inserts;
}

int dsi_prefix_cache_evict_all(dsi_prefix_cache *pc) {
    int n = 0;
    while (pc->lru_head >= 0) { evict(pc, pc->lru_head); n++; }
    return n;
}
