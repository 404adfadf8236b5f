/* BPE merging of one pre-tokenized word, the lookup tables it uses, and the
 * per-thread scratch + word cache that make encode lock-free across threads.
 *
 * Merging follows `tokenizers`: repeatedly apply the lowest-rank merge among adjacent
 * symbol pairs, leftmost first on ties. The heap version is O(n log n) per word: a
 * min-heap of (rank, left position) entries, validated lazily when popped (an entry is
 * stale when its left symbol died or the pair at that position no longer has that
 * rank). The naive O(n^2) version rescans all pairs after every merge; it is kept as
 * the reference the tests and the benchmark compare against. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "tokenizer/tokenizer_impl.h"

/* ---- byte-level alphabet -------------------------------------------------------- */

static uint32_t g_b2cp[256];
static int16_t g_cp2b[324];
static pthread_once_t g_bl_once = PTHREAD_ONCE_INIT;

/* Printable Latin-1 bytes stand for themselves; the other 68 are shifted to 256+k in
 * byte order, so every byte is one visible code point. */
static void bytelevel_init(void) {
    int k = 0;
    for (int i = 0; i < 324; i++) g_cp2b[i] = -1;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
        g_b2cp[b] = printable ? (uint32_t)b : (uint32_t)(256 + k++);
        g_cp2b[g_b2cp[b]] = (int16_t)b;
    }
}

uint32_t dsi__bytelevel_cp(unsigned b) {
    pthread_once(&g_bl_once, bytelevel_init);
    return g_b2cp[b & 255];
}

int dsi__bytelevel_byte(uint32_t cp) {
    pthread_once(&g_bl_once, bytelevel_init);
    return cp < 324 ? g_cp2b[cp] : -1;
}

/* ---- hashing and lookups ----------------------------------------------------------- */

uint64_t dsi__mix64(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    x ^= x >> 33;
    return x;
}

uint64_t dsi__hash_bytes(const char *s, size_t n) {
    uint64_t h = 0x9E3779B97F4A7C15ull ^ (n * 0x100000001b3ull);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, s + i, 8);
        h = (h ^ w) * 0x9E3779B97F4A7C15ull;
        h ^= h >> 29;
    }
    uint64_t t = 0;
    memcpy(&t, s + i, n - i);
    h = (h ^ t) * 0x9E3779B97F4A7C15ull;
    return dsi__mix64(h);
}

int32_t dsi__vocab_find(const dsi_tokenizer *tok, const char *s, size_t n) {
    if (!tok->vmap) return -1;
    uint32_t i = (uint32_t)dsi__hash_bytes(s, n) & tok->vmap_mask;
    for (;;) {
        int32_t id = tok->vmap[i];
        if (id < 0) return -1;
        uint32_t a = tok->str_off[id], b = tok->str_off[id + 1];
        if (b - a == n && memcmp(tok->str_blob + a, s, n) == 0) return id;
        i = (i + 1) & tok->vmap_mask;
    }
}

int32_t dsi__merge_find(const dsi_tokenizer *tok, int32_t a, int32_t b, int32_t *merged) {
    if (!tok->merges) return -1;
    uint64_t key = (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
    uint32_t i = (uint32_t)dsi__mix64(key) & tok->mmask;
    for (;;) {
        const dsi__merge *e = &tok->merges[i];
        if (e->key == key) {
            *merged = e->merged;
            return e->rank;
        }
        uint64_t k = e->key;
        if (k == UINT64_MAX) return -1;
        i = (i + 1) & tok->mmask;
    }
}

int dsi__ids_push(dsi__ids *a, const int32_t *ids, size_t n) {
    if (n == 0) return DSI_OK;
    if (a->n + n > a->cap) {
        size_t cap = a->cap ? a->cap : 64;
        while (cap < a->n + n) cap *= 2;
        int32_t *v = realloc(a->v, cap * sizeof *v);
        if (!v) return dsi_error(DSI_ENOMEM, "tokenizer: out of memory (%zu ids)", cap);
        a->v = v;
        a->cap = cap;
    }
    memcpy(a->v + a->n, ids, n * sizeof *ids);
    a->n += n;
    return DSI_OK;
}

/* ---- per-thread state ------------------------------------------------------------------ */

enum { CACHE_SLOTS = 65536, CACHE_WORD = 24, CACHE_IDS = 8 };

/* 2-way set-associative cache of recent words (up to 24 bytes and 8 ids: one 64-byte
 * line per slot, 4 MB per thread, committed only as slots are used); len 0 marks an
 * empty slot. Sized on bench_tokenizer: 16k direct-mapped slots hit 83% of English
 * words, 64k 2-way ones about 91%, worth about 1.5x English throughput. */
typedef struct cache_slot {
    uint32_t hash;
    uint8_t len, n_ids;
    char bytes[CACHE_WORD];
    int32_t ids[CACHE_IDS];
} __attribute__((aligned(64))) cache_slot;

struct dsi__tls {
    uint64_t serial; /* tokenizer the contents belong to; 0 = none */
    cache_slot *cache; /* 64-byte aligned inside cache_mem */
    void *cache_mem;
    int32_t *sym_id, *sym_prev, *sym_next;
    size_t sym_cap;
    uint64_t *heap;
    char *mapped; /* byte-level spelling of a word (ignore_merges) */
#ifdef DSI_HAVE_PCRE2
    pcre2_match_data **md;
    int n_md;
    pcre2_match_context *mctx;
    pcre2_jit_stack *jstack;
#endif
};

static pthread_key_t g_tls_key;
static pthread_once_t g_tls_once = PTHREAD_ONCE_INIT;

static void tls_clear_regex(dsi__tls *t) {
#ifdef DSI_HAVE_PCRE2
    for (int i = 0; i < t->n_md; i++) pcre2_match_data_free(t->md[i]);
    free(t->md);
    t->md = NULL;
    t->n_md = 0;
#endif
}

static void tls_free(void *p) {
    dsi__tls *t = p;
    if (!t) return;
    tls_clear_regex(t);
#ifdef DSI_HAVE_PCRE2
    pcre2_match_context_free(t->mctx);
    pcre2_jit_stack_free(t->jstack);
#endif
    free(t->cache_mem);
    free(t->sym_id);
    free(t->sym_prev);
    free(t->sym_next);
    free(t->heap);
    free(t->mapped);
    free(t);
}

static void tls_key_init(void) { pthread_key_create(&g_tls_key, tls_free); }

dsi__tls *dsi__tls_get(const dsi_tokenizer *tok) {
    pthread_once(&g_tls_once, tls_key_init);
    dsi__tls *t = pthread_getspecific(g_tls_key);
    if (!t) {
        t = calloc(1, sizeof *t);
        if (!t) return NULL;
        /* calloc of this size maps fresh zero pages: untouched slots cost no memory */
        t->cache_mem = calloc(CACHE_SLOTS + 1, sizeof *t->cache);
        if (t->cache_mem) t->cache = (cache_slot *)(((uintptr_t)t->cache_mem + 63) & ~(uintptr_t)63);
        if (!t->cache || pthread_setspecific(g_tls_key, t) != 0) {
            tls_free(t);
            return NULL;
        }
    }
    if (t->serial != tok->serial) {
        /* another tokenizer used this thread last: its cached words mean nothing here.
         * Untag first, so that a failure below leaves the block invalid, not stale. */
        if (t->serial != 0)
            for (int i = 0; i < CACHE_SLOTS; i++) t->cache[i].len = 0;
        t->serial = 0;
        tls_clear_regex(t);
#ifdef DSI_HAVE_PCRE2
        if (tok->n_splits > 0) {
            t->md = calloc(tok->n_splits, sizeof *t->md);
            if (!t->md) return NULL;
            t->n_md = tok->n_splits;
            for (int i = 0; i < tok->n_splits; i++) {
                t->md[i] = pcre2_match_data_create_from_pattern(tok->splits[i].re, NULL);
                if (!t->md[i]) return NULL;
            }
        }
        if (!t->mctx) {
            t->mctx = pcre2_match_context_create(NULL);
            t->jstack = pcre2_jit_stack_create(32 * 1024, 8 * 1024 * 1024, NULL);
            if (!t->mctx || !t->jstack) return NULL;
            pcre2_jit_stack_assign(t->mctx, NULL, t->jstack);
        }
#endif
        t->serial = tok->serial;
    }
    return t;
}

#ifdef DSI_HAVE_PCRE2
pcre2_match_data *dsi__tls_match_data(dsi__tls *tls, int split) { return tls->md[split]; }
pcre2_match_context *dsi__tls_match_context(dsi__tls *tls) { return tls->mctx; }
#endif

static int tls_reserve(dsi__tls *t, size_t n) {
    if (n <= t->sym_cap) return DSI_OK;
    size_t cap = t->sym_cap ? t->sym_cap : 256;
    while (cap < n) cap *= 2;
    int32_t *a = realloc(t->sym_id, cap * sizeof *a);
    if (a) t->sym_id = a;
    int32_t *b = realloc(t->sym_prev, cap * sizeof *b);
    if (b) t->sym_prev = b;
    int32_t *c = realloc(t->sym_next, cap * sizeof *c);
    if (c) t->sym_next = c;
    uint64_t *h = realloc(t->heap, 2 * cap * sizeof *h);
    if (h) t->heap = h;
    char *m = realloc(t->mapped, 2 * cap);
    if (m) t->mapped = m;
    if (!a || !b || !c || !h || !m) return dsi_error(DSI_ENOMEM, "tokenizer: out of memory (word of %zu bytes)", n);
    t->sym_cap = cap;
    return DSI_OK;
}

/* ---- merging ------------------------------------------------------------------------------- */

static inline void heap_push(uint64_t *h, size_t *n, uint64_t v) {
    size_t i = (*n)++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (h[p] <= v) break;
        h[i] = h[p];
        i = p;
    }
    h[i] = v;
}

static inline uint64_t heap_pop(uint64_t *h, size_t *n) {
    uint64_t top = h[0], v = h[--*n];
    size_t i = 0, m = *n;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= m) break;
        if (c + 1 < m && h[c + 1] < h[c]) c++;
        if (v <= h[c]) break;
        h[i] = h[c];
        i = c;
    }
    h[i] = v;
    return top;
}

static inline void merge_at(int32_t *id, int32_t *prev, int32_t *next, int32_t pos, int32_t merged) {
    int32_t nx = next[pos];
    id[pos] = merged;
    id[nx] = -1;
    next[pos] = next[nx];
    if (next[nx] >= 0) prev[next[nx]] = pos;
}

static void bpe_heap(const dsi_tokenizer *tok, dsi__tls *t, int32_t n) {
    int32_t *id = t->sym_id, *prev = t->sym_prev, *next = t->sym_next, m;
    uint64_t *heap = t->heap;
    size_t hn = 0;
    for (int32_t i = 0; i + 1 < n; i++) {
        int32_t r = dsi__merge_find(tok, id[i], id[i + 1], &m);
        if (r >= 0) heap_push(heap, &hn, (uint64_t)r << 32 | (uint32_t)i);
    }
    while (hn > 0) {
        uint64_t e = heap_pop(heap, &hn);
        int32_t pos = (int32_t)(uint32_t)e, rank = (int32_t)(e >> 32);
        if (id[pos] < 0 || next[pos] < 0) continue;
        const dsi__rank *rk = &tok->ranks[rank];
        if (id[pos] != rk->left || id[next[pos]] != rk->right) continue; /* stale */
        merge_at(id, prev, next, pos, rk->merged);
        /* each merge adds at most 2 entries and removes one: the heap stays under 2n */
        if (prev[pos] >= 0) {
            int32_t r = dsi__merge_find(tok, id[prev[pos]], id[pos], &m);
            if (r >= 0) heap_push(heap, &hn, (uint64_t)r << 32 | (uint32_t)prev[pos]);
        }
        if (next[pos] >= 0) {
            int32_t r = dsi__merge_find(tok, id[pos], id[next[pos]], &m);
            if (r >= 0) heap_push(heap, &hn, (uint64_t)r << 32 | (uint32_t)pos);
        }
    }
}

static void bpe_naive(const dsi_tokenizer *tok, dsi__tls *t, int32_t n) {
    int32_t *id = t->sym_id, *prev = t->sym_prev, *next = t->sym_next;
    for (;;) {
        int32_t best = -1, best_rank = INT32_MAX, best_new = -1, m;
        for (int32_t i = 0; i >= 0 && next[i] >= 0; i = next[i]) {
            int32_t r = dsi__merge_find(tok, id[i], id[next[i]], &m);
            if (r >= 0 && r < best_rank) {
                best = i;
                best_rank = r;
                best_new = m;
            }
        }
        if (best < 0) return;
        merge_at(id, prev, next, best, best_new);
    }
}

/* Initial symbols: one per byte (byte-level) or per character; characters missing
 * from the vocabulary become unk when the model has one and are dropped otherwise
 * (the `tokenizers` BPE behaviour). Returns the symbol count. */
static int32_t initial_symbols(const dsi_tokenizer *tok, dsi__tls *t, const char *w, size_t n) {
    int32_t k = 0;
    size_t i = 0;
    while (i < n) {
        int32_t sid;
        size_t len = 1;
        if (tok->byte_level) sid = tok->byte_id[(unsigned char)w[i]];
        else {
            len = dsi__utf8_len(w + i, n - i);
            sid = dsi__vocab_find(tok, w + i, len);
        }
        if (sid < 0) sid = tok->unk_id;
        if (sid >= 0) t->sym_id[k++] = sid;
        i += len;
    }
    for (int32_t j = 0; j < k; j++) {
        t->sym_prev[j] = j - 1;
        t->sym_next[j] = j + 1 < k ? j + 1 : -1;
    }
    return k;
}

/* Word spelled in the byte-level alphabet (for ignore_merges lookups). */
static size_t map_bytelevel(const char *w, size_t n, char *out) {
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t cp = dsi__bytelevel_cp((unsigned char)w[i]);
        if (cp < 0x80) out[o++] = (char)cp;
        else {
            out[o++] = (char)(0xC0 | (cp >> 6));
            out[o++] = (char)(0x80 | (cp & 0x3F));
        }
    }
    return o;
}

int dsi__bpe_word(const dsi_tokenizer *tok, dsi__tls *t, const char *w, size_t n, int algo, int use_cache,
                  dsi__ids *out) {
    if (n == 0) return DSI_OK;
    if (n == 1 && tok->byte_level && tok->byte_id[(unsigned char)w[0]] >= 0)
        return dsi__ids_push(out, &tok->byte_id[(unsigned char)w[0]], 1);
    if (n > INT32_MAX / 4) return dsi_error(DSI_ERANGE, "tokenizer: word of %zu bytes is too long", n);

    cache_slot *set = NULL;
    uint32_t h = 0;
    if (use_cache && n <= CACHE_WORD) {
        h = (uint32_t)dsi__hash_bytes(w, n);
        set = &t->cache[(h & (CACHE_SLOTS / 2 - 1)) * 2];
        for (int way = 0; way < 2; way++)
            if (set[way].len == n && set[way].hash == h && memcmp(set[way].bytes, w, n) == 0)
                return dsi__ids_push(out, set[way].ids, set[way].n_ids);
    }
    int rc = tls_reserve(t, n + 1);
    if (rc) return rc;
    if (tok->ignore_merges) {
        int32_t whole = tok->byte_level ? dsi__vocab_find(tok, t->mapped, map_bytelevel(w, n, t->mapped))
                                        : dsi__vocab_find(tok, w, n);
        if (whole >= 0) return dsi__ids_push(out, &whole, 1);
    }
    int32_t k = initial_symbols(tok, t, w, n);
    if (k > 1) {
        if (algo == DSI__BPE_NAIVE) bpe_naive(tok, t, k);
        else bpe_heap(tok, t, k);
    }
    size_t start = out->n;
    for (int32_t i = 0; i < k && i >= 0; i = t->sym_next[i])
        if ((rc = dsi__ids_push(out, &t->sym_id[i], 1))) return rc;
    size_t n_ids = out->n - start;
    if (set && n_ids > 0 && n_ids <= CACHE_IDS) { /* way 0 holds the newer entry */
        set[1] = set[0];
        cache_slot *slot = &set[0];
        slot->hash = h;
        slot->len = (uint8_t)n;
        slot->n_ids = (uint8_t)n_ids;
        memcpy(slot->bytes, w, n);
        memcpy(slot->ids, out->v + start, n_ids * sizeof(int32_t));
    }
    return DSI_OK;
}
