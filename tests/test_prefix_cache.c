/* Prefix cache: hash chain, exact matching, refcounted sharing, LRU eviction
 * only when the free list is empty, and the hash map against a reference. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <stdlib.h>
#include <string.h>

#include "dsinfer/prefix_cache.h"

#define BT 64
#define FP 0x1234abcdull

static void fill(int32_t *t, int n, int seed) {
    for (int i = 0; i < n; i++) t[i] = (seed * 7919 + i * 31) % 2048;
}

static dsi_kv_pool *pool(int n_blocks) {
    dsi_kv_pool *kv;
    assert_int_equal(dsi_kv_pool_create(1, 8, BT, n_blocks, &kv), DSI_OK);
    return kv;
}

static void test_hash_chain(void **state) {
    int32_t t[BT];
    fill(t, BT, 1);
    uint64_t a = dsi_prefix_block_hash(0, FP, t, BT);
    assert_true(a == dsi_prefix_block_hash(0, FP, t, BT));
    assert_true(a != dsi_prefix_block_hash(1, FP, t, BT));      /* parent matters */
    assert_true(a != dsi_prefix_block_hash(0, FP + 1, t, BT));  /* model matters */
    t[63]++;
    assert_true(a != dsi_prefix_block_hash(0, FP, t, BT));      /* every token matters */
}

/* Publishes the full blocks of tokens[0..n) into fresh blocks, as a sequence
 * would; returns how many; blocks[] stay referenced by the caller. */
static int publish(dsi_prefix_cache *pc, const int32_t *tokens, int n, int32_t *blocks) {
    uint64_t parent = 0;
    int nb = n / BT;
    for (int i = 0; i < nb; i++) {
        blocks[i] = dsi_prefix_cache_alloc(pc);
        assert_true(blocks[i] >= 0);
        uint64_t h;
        dsi_prefix_cache_insert(pc, blocks[i], parent, tokens + i * BT, &h);
        parent = h;
    }
    return nb;
}

static void test_share_and_release(void **state) {
    dsi_kv_pool *kv = pool(8);
    dsi_prefix_cache *pc;
    assert_int_equal(dsi_prefix_cache_create(kv, FP, &pc), DSI_OK);
    int32_t t[3 * BT], a[3], b[3];
    uint64_t h[3];
    fill(t, 3 * BT, 2);
    assert_int_equal(dsi_prefix_cache_match(pc, t, 3 * BT, 3, b, h), 0);
    assert_int_equal(publish(pc, t, 3 * BT, a), 3);
    for (int i = 0; i < 3; i++) assert_int_equal(dsi_kv_refcount(kv, a[i]), 2); /* user + cache */
    /* a second sequence with the same first two blocks and a different third */
    int32_t u[3 * BT];
    memcpy(u, t, sizeof u);
    u[2 * BT + 5] ^= 1;
    assert_int_equal(dsi_prefix_cache_match(pc, u, 3 * BT, 3, b, h), 2);
    assert_int_equal(b[0], a[0]);
    assert_int_equal(b[1], a[1]);
    assert_int_equal(dsi_kv_refcount(kv, a[0]), 3);
    assert_true(h[1] == dsi_prefix_block_hash(h[0], FP, u + BT, BT));
    /* a match is capped by max_blocks and by the tokens given */
    int32_t c[3];
    assert_int_equal(dsi_prefix_cache_match(pc, t, 2 * BT + 10, 3, c, h), 2);
    for (int i = 0; i < 2; i++) dsi_prefix_cache_release(pc, c[i]);
    assert_int_equal(dsi_prefix_cache_match(pc, t, 3 * BT, 1, c, h), 1);
    dsi_prefix_cache_release(pc, c[0]);
    /* everyone leaves: the blocks stay cached but idle, evictable */
    for (int i = 0; i < 3; i++) dsi_prefix_cache_release(pc, a[i]);
    for (int i = 0; i < 2; i++) dsi_prefix_cache_release(pc, b[i]);
    dsi_prefix_cache_stats st;
    dsi_prefix_cache_get_stats(pc, &st);
    assert_int_equal(st.n_cached, 3);
    assert_int_equal(st.n_idle, 3);
    assert_int_equal(dsi_kv_n_free(kv), 5);
    assert_int_equal(dsi_prefix_cache_n_available(pc), 8);
    /* idle blocks are still found */
    assert_int_equal(dsi_prefix_cache_match(pc, t, 3 * BT, 3, b, h), 3);
    dsi_prefix_cache_get_stats(pc, &st);
    assert_int_equal(st.n_idle, 0);
    for (int i = 0; i < 3; i++) dsi_prefix_cache_release(pc, b[i]);
    dsi_prefix_cache_destroy(pc);
    assert_int_equal(dsi_kv_n_free(kv), 8); /* the cache's references are dropped */
    dsi_kv_pool_destroy(kv);
}

static void test_lru_eviction_only_when_full(void **state) {
    dsi_kv_pool *kv = pool(4);
    dsi_prefix_cache *pc;
    assert_int_equal(dsi_prefix_cache_create(kv, FP, &pc), DSI_OK);
    int32_t t1[BT], t2[BT], t3[BT], blk[1];
    uint64_t h[1];
    fill(t1, BT, 11);
    fill(t2, BT, 12);
    fill(t3, BT, 13);
    int32_t b1[1], b2[1], b3[1];
    publish(pc, t1, BT, b1);
    publish(pc, t2, BT, b2);
    publish(pc, t3, BT, b3);
    dsi_prefix_cache_release(pc, b1[0]); /* idle order: t1, t3, t2 */
    dsi_prefix_cache_release(pc, b3[0]);
    dsi_prefix_cache_release(pc, b2[0]);
    /* a free block exists: nothing is evicted */
    int f = dsi_prefix_cache_alloc(pc);
    assert_true(f >= 0);
    assert_int_equal(dsi_prefix_cache_match(pc, t1, BT, 1, blk, h), 1);
    dsi_prefix_cache_release(pc, blk[0]); /* t1 is now the most recently used: order t3, t2, t1 */
    /* free list empty: the least recently used idle block (t3) goes */
    int g = dsi_prefix_cache_alloc(pc);
    assert_int_equal(g, b3[0]);
    assert_int_equal(dsi_prefix_cache_match(pc, t3, BT, 1, blk, h), 0);
    assert_int_equal(dsi_prefix_cache_match(pc, t2, BT, 1, blk, h), 1);
    /* t2 is in use now: only t1 can go, then nothing */
    int k = dsi_prefix_cache_alloc(pc);
    assert_int_equal(k, b1[0]);
    assert_int_equal(dsi_prefix_cache_alloc(pc), -1);
    dsi_prefix_cache_stats st;
    dsi_prefix_cache_get_stats(pc, &st);
    assert_int_equal((int)st.evictions, 2);
    dsi_prefix_cache_release(pc, blk[0]);
    dsi_prefix_cache_release(pc, f);
    dsi_prefix_cache_release(pc, g);
    dsi_prefix_cache_release(pc, k);
    assert_int_equal(dsi_prefix_cache_evict_all(pc), 1);
    assert_int_equal(dsi_kv_n_free(kv), 4);
    dsi_prefix_cache_destroy(pc);
    dsi_kv_pool_destroy(kv);
}

/* A block whose equal is already cached stays private; a different parent
 * with the same tokens is a different block. */
static void test_duplicates_and_parents(void **state) {
    dsi_kv_pool *kv = pool(6);
    dsi_prefix_cache *pc;
    assert_int_equal(dsi_prefix_cache_create(kv, FP, &pc), DSI_OK);
    int32_t t[BT];
    fill(t, BT, 5);
    int a = dsi_prefix_cache_alloc(pc), b = dsi_prefix_cache_alloc(pc), c = dsi_prefix_cache_alloc(pc);
    uint64_t ha, hb, hc;
    assert_int_equal(dsi_prefix_cache_insert(pc, a, 0, t, &ha), 1);
    assert_int_equal(dsi_prefix_cache_insert(pc, b, 0, t, &hb), 0);
    assert_true(ha == hb);
    assert_int_equal(dsi_kv_refcount(kv, b), 1);
    assert_int_equal(dsi_prefix_cache_insert(pc, c, 77, t, &hc), 1);
    assert_true(hc != ha);
    dsi_prefix_cache_release(pc, b);
    assert_int_equal(dsi_kv_refcount(kv, b), 0); /* private block: freed at once */
    dsi_prefix_cache_release(pc, a);
    dsi_prefix_cache_release(pc, c);
    dsi_prefix_cache_destroy(pc);
    dsi_kv_pool_destroy(kv);
}

/* Random publish / match / release / alloc against a reference model of what
 * must be findable, exercising the map's deletion (backward shift). */
static void test_random_against_reference(void **state) {
    enum { NB = 37, NT = 60 };
    dsi_kv_pool *kv = pool(NB);
    dsi_prefix_cache *pc;
    assert_int_equal(dsi_prefix_cache_create(kv, FP, &pc), DSI_OK);
    static int32_t toks[NT][BT];
    int where[NT]; /* block caching token set i, or -1 (reference) */
    for (int i = 0; i < NT; i++) { fill(toks[i], BT, 100 + i); where[i] = -1; }
    int held[NB], n_held = 0;
    uint64_t rng = 42;
    for (int it = 0; it < 20000; it++) {
        rng = rng * 6364136223846793005ull + 1442695040888963407ull;
        int op = (rng >> 33) % 4, i = (rng >> 40) % NT;
        int32_t blk[1];
        uint64_t h;
        if (op == 0) { /* publish token set i in a fresh block */
            int b = dsi_prefix_cache_alloc(pc);
            if (b < 0) continue;
            for (int j = 0; j < NT; j++) if (where[j] == b) where[j] = -1; /* evicted */
            if (dsi_prefix_cache_insert(pc, b, 0, toks[i], &h)) {
                assert_int_equal(where[i], -1);
                where[i] = b;
            }
            held[n_held++] = b;
        } else if (op == 1) { /* match must agree with the reference */
            int m = dsi_prefix_cache_match(pc, toks[i], BT, 1, blk, &h);
            assert_int_equal(m, where[i] >= 0);
            if (m) { assert_int_equal(blk[0], where[i]); held[n_held++] = blk[0]; }
        } else if (n_held > 0) { /* release a random held block */
            int k = (rng >> 20) % n_held;
            dsi_prefix_cache_release(pc, held[k]);
            held[k] = held[--n_held];
        }
        dsi_prefix_cache_stats st;
        dsi_prefix_cache_get_stats(pc, &st);
        assert_int_equal(dsi_prefix_cache_n_available(pc), dsi_kv_n_free(kv) + st.n_idle);
        int refs = 0; /* every reference is a held entry or the cache's own */
        for (int b = 0; b < NB; b++) refs += dsi_kv_refcount(kv, b);
        assert_int_equal(refs, n_held + st.n_cached);
    }
    while (n_held) dsi_prefix_cache_release(pc, held[--n_held]);
    dsi_prefix_cache_evict_all(pc);
    assert_int_equal(dsi_kv_n_free(kv), NB);
    dsi_prefix_cache_destroy(pc);
    dsi_kv_pool_destroy(kv);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_hash_chain),
        cmocka_unit_test(test_share_and_release),
        cmocka_unit_test(test_lru_eviction_only_when_full),
        cmocka_unit_test(test_duplicates_and_parents),
        cmocka_unit_test(test_random_against_reference),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
