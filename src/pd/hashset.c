/* The hint set: a bounded FIFO of chain hashes plus an open-addressing index
 * (counts, so a hash added twice survives until both copies age out). */
#include "dsinfer/pd.h"

#include <pthread.h>
#include <stdlib.h>

struct dsi_pd_hashset {
    pthread_mutex_t mu;
    int cap, head, n;
    uint64_t *ring;        /* [cap] insertion order */
    uint64_t *keys;        /* [slots] 0 = empty (hash 0 is remapped to 1) */
    int *counts;           /* [slots] */
    size_t mask;
};

static uint64_t norm(uint64_t h) { return h ? h : 1; }

int dsi_pd_hashset_create(int capacity, dsi_pd_hashset **out) {
    *out = NULL;
    if (capacity <= 0) return dsi_error(DSI_EINVAL, "hash set capacity must be positive");
    dsi_pd_hashset *h = calloc(1, sizeof *h);
    if (!h) return dsi_error(DSI_ENOMEM, "out of memory");
    size_t slots = 16;
    while (slots < (size_t)capacity * 2) slots *= 2;
    h->cap = capacity;
    h->mask = slots - 1;
    h->ring = calloc(capacity, sizeof(uint64_t));
    h->keys = calloc(slots, sizeof(uint64_t));
    h->counts = calloc(slots, sizeof(int));
    if (!h->ring || !h->keys || !h->counts) { dsi_pd_hashset_destroy(h); return dsi_error(DSI_ENOMEM, "out of memory"); }
    pthread_mutex_init(&h->mu, NULL);
    *out = h;
    return DSI_OK;
}

void dsi_pd_hashset_destroy(dsi_pd_hashset *h) {
    if (!h) return;
    if (h->ring && h->keys && h->counts) pthread_mutex_destroy(&h->mu);
    free(h->ring);
    free(h->keys);
    free(h->counts);
    free(h);
}

static size_t find_slot(const dsi_pd_hashset *h, uint64_t k) {
    size_t i = (size_t)(k ^ (k >> 31)) & h->mask;
    while (h->keys[i] && h->keys[i] != k) i = (i + 1) & h->mask;
    return i;
}

/* Backward-shift deletion (as the prefix cache's map). */
static void remove_key(dsi_pd_hashset *h, uint64_t k) {
    size_t i = find_slot(h, k);
    if (!h->keys[i]) return;
    if (--h->counts[i] > 0) return;
    size_t j = i;
    for (;;) {
        j = (j + 1) & h->mask;
        if (!h->keys[j]) break;
        size_t home = (size_t)(h->keys[j] ^ (h->keys[j] >> 31)) & h->mask;
        int home_in = i <= j ? (home > i && home <= j) : (home > i || home <= j);
        if (!home_in) {
            h->keys[i] = h->keys[j];
            h->counts[i] = h->counts[j];
            i = j;
        }
    }
    h->keys[i] = 0;
    h->counts[i] = 0;
}

void dsi_pd_hashset_add(dsi_pd_hashset *h, uint64_t hash) {
    uint64_t k = norm(hash);
    pthread_mutex_lock(&h->mu);
    if (h->n == h->cap) { /* forget the oldest */
        remove_key(h, h->ring[h->head]);
        h->head = (h->head + 1) % h->cap;
        h->n--;
    }
    h->ring[(h->head + h->n) % h->cap] = k;
    h->n++;
    size_t i = find_slot(h, k);
    h->keys[i] = k;
    h->counts[i]++;
    pthread_mutex_unlock(&h->mu);
}

int dsi_pd_hashset_contains(dsi_pd_hashset *h, uint64_t hash) {
    uint64_t k = norm(hash);
    pthread_mutex_lock(&h->mu);
    int yes = h->keys[find_slot(h, k)] != 0;
    pthread_mutex_unlock(&h->mu);
    return yes;
}

int dsi_pd_hashset_leading(dsi_pd_hashset *h, const uint64_t *hashes, int n) {
    int k = 0;
    pthread_mutex_lock(&h->mu);
    while (k < n && h->keys[find_slot(h, norm(hashes[k]))]) k++;
    pthread_mutex_unlock(&h->mu);
    return k;
}
