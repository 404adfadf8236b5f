/* EPLB: DeepSeek's algorithm reproduced exactly, BEST's guarantees and
 * constraints, max_over_mean, JSON files, the stats window and the
 * rebalance decision. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "dsinfer/eplb.h"

static uint64_t rng_state = 88172645463325252ull;
static uint64_t rng(void) {
    rng_state ^= rng_state << 13, rng_state ^= rng_state >> 7, rng_state ^= rng_state << 17;
    return rng_state;
}

/* One layer of Zipf(s) loads over a random permutation of the experts. */
static void zipf_layer(double *load, int E, double s) {
    int perm[1024];
    for (int i = 0; i < E; i++) perm[i] = i;
    for (int i = E - 1; i > 0; i--) {
        int j = (int)(rng() % (uint64_t)(i + 1)), t = perm[i];
        perm[i] = perm[j], perm[j] = t;
    }
    double h = 0;
    for (int r = 1; r <= E; r++) h += pow(r, -s);
    for (int e = 0; e < E; e++) load[e] = round(1e6 * pow(perm[e] + 1, -s) / h);
}

static const double README_LOAD[2][12] = {{90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86},
                                          {20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27}};

static void test_readme_example_exact(void **state) {
    const int32_t want[2][16] = {{5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1},
                                 {7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1}};
    dsi_eplb_placement pl = {0};
    assert_int_equal(dsi_eplb_rebalance(&README_LOAD[0][0], 2, 12, 16, 4, 2, 8, DSI_EPLB_DEEPSEEK, &pl), DSI_OK);
    assert_int_equal(pl.n_layers, 2);
    assert_int_equal(pl.max_replicas, 2);
    assert_memory_equal(pl.phy2log, want, sizeof want);
    /* log2phy lists replicas in creation order (rank 0 = the original). */
    const int32_t l2p0[12][2] = {{12, -1}, {15, 13}, {11, -1}, {6, -1}, {7, 5}, {0, 2},
                                 {1, -1},  {3, -1},  {4, -1},  {9, -1}, {8, 10}, {14, -1}};
    assert_memory_equal(pl.log2phy, l2p0, sizeof l2p0);
    const int32_t cnt1[12] = {1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1};
    assert_memory_equal(pl.logcnt + 12, cnt1, sizeof cnt1);
    assert_int_equal(dsi_eplb_placement_validate(&pl, 4, 2, 0), DSI_OK);
    dsi_eplb_placement_free(&pl);
    dsi_eplb_placement_free(&pl); /* freeing twice is a no-op */
    dsi_eplb_placement_free(NULL);
}

/* Flattens a nested JSON array of integers in order; returns the count. */
static int flat_ints(const cJSON *a, int32_t *out, int cap) {
    int n = 0;
    if (cJSON_IsNumber(a)) {
        if (cap > 0) out[0] = (int32_t)a->valuedouble;
        return 1;
    }
    for (const cJSON *c = a ? a->child : NULL; c; c = c->next) n += flat_ints(c, out + n, cap - n);
    return n;
}

/* Outputs of DeepSeek's eplb.py itself (PyTorch 1.13 on CPU) on Zipf and
 * tie-heavy loads in both modes, including the 256-expert settings: placement
 * and replica order must match exactly. */
static void test_deepseek_golden(void **state) {
    FILE *f = fopen(DSI_TEST_DATA "/eplb/deepseek_golden.json", "rb");
    assert_non_null(f);
    static char buf[1 << 18];
    size_t len = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[len] = 0;
    cJSON *root = cJSON_Parse(buf);
    assert_non_null(root);
    int ncase = 0;
    static int32_t want[1 << 16], got_buf[1 << 16];
    static double load[1 << 12];
    for (const cJSON *c = cJSON_GetObjectItem(root, "cases")->child; c; c = c->next, ncase++) {
        int E = cJSON_GetObjectItem(c, "experts")->valueint, R = cJSON_GetObjectItem(c, "slots")->valueint;
        int G = cJSON_GetObjectItem(c, "groups")->valueint, N = cJSON_GetObjectItem(c, "nodes")->valueint;
        int P = cJSON_GetObjectItem(c, "gpus")->valueint;
        const cJSON *ld = cJSON_GetObjectItem(c, "load");
        int L = cJSON_GetArraySize(ld), n = 0;
        for (const cJSON *row = ld->child; row; row = row->next)
            for (const cJSON *v = row->child; v; v = v->next) load[n++] = v->valuedouble;
        assert_int_equal(n, L * E);
        dsi_eplb_placement pl = {0};
        assert_int_equal(dsi_eplb_rebalance(load, L, E, R, G, N, P, DSI_EPLB_DEEPSEEK, &pl), DSI_OK);
        n = flat_ints(cJSON_GetObjectItem(c, "phy2log"), want, 1 << 16);
        assert_int_equal(n, L * R);
        assert_memory_equal(pl.phy2log, want, sizeof(int32_t) * n);
        n = flat_ints(cJSON_GetObjectItem(c, "logcnt"), want, 1 << 16);
        assert_memory_equal(pl.logcnt, want, sizeof(int32_t) * n);
        n = flat_ints(cJSON_GetObjectItem(c, "log2phy"), want, 1 << 16);
        assert_int_equal(n, L * E * pl.max_replicas);
        memcpy(got_buf, pl.log2phy, sizeof(int32_t) * n);
        assert_memory_equal(got_buf, want, sizeof(int32_t) * n);
        dsi_eplb_placement_free(&pl);
    }
    assert_true(ncase >= 9);
    cJSON_Delete(root);
}

static void test_max_over_mean_by_hand(void **state) {
    /* 3 experts, 4 slots on 2 gpus: gpu0 {0, 1}, gpu1 {0, 2}. Expert 0 has two
     * replicas of 30 each; gpu0 = 30 + 20 = 50, gpu1 = 30 + 10 = 40, mean 45. */
    const int32_t p2l[4] = {0, 1, 0, 2};
    const double load[3] = {60, 20, 10};
    double m;
    assert_int_equal(dsi_eplb_layer_max_over_mean(p2l, load, 3, 4, 2, &m), DSI_OK);
    assert_true(fabs(m - 50.0 / 45.0) < 1e-12);
    const double zero[3] = {0, 0, 0};
    assert_int_equal(dsi_eplb_layer_max_over_mean(p2l, zero, 3, 4, 2, &m), DSI_OK);
    assert_true(m == 1.0);
    const int32_t bad[4] = {0, 1, 0, 3};
    assert_int_not_equal(dsi_eplb_layer_max_over_mean(bad, load, 3, 4, 2, &m), DSI_OK);
    const int32_t missing[4] = {0, 1, 0, 1}; /* expert 2 has load but no slot */
    assert_int_not_equal(dsi_eplb_layer_max_over_mean(missing, load, 3, 4, 2, &m), DSI_OK);
}

/* Checks BEST against DEEPSEEK on one load matrix; returns how many layers
 * BEST lost (counted only where DeepSeek's placement obeys BEST's rules). */
static int compare_policies(const double *load, int L, int E, int R, int G, int N, int P, double *sum_ratio) {
    dsi_eplb_placement ds = {0}, best = {0};
    assert_int_equal(dsi_eplb_rebalance(load, L, E, R, G, N, P, DSI_EPLB_DEEPSEEK, &ds), DSI_OK);
    assert_int_equal(dsi_eplb_placement_validate(&ds, G, N, 0), DSI_OK);
    int rc = dsi_eplb_rebalance(load, L, E, R, G, N, P, DSI_EPLB_BEST, &best);
    if (rc != DSI_OK) print_error("E=%d R=%d G=%d N=%d P=%d: %s\n", E, R, G, N, P, dsi_last_error());
    assert_int_equal(rc, DSI_OK);
    rc = dsi_eplb_placement_validate(&best, G, N, 1);
    if (rc != DSI_OK) print_error("%s\n", dsi_last_error());
    assert_int_equal(rc, DSI_OK);
    double *md = malloc(sizeof(double) * L), *mb = malloc(sizeof(double) * L);
    assert_int_equal(dsi_eplb_max_over_mean(&ds, load, md), DSI_OK);
    assert_int_equal(dsi_eplb_max_over_mean(&best, load, mb), DSI_OK);
    int lost = 0, k = R / P;
    for (int l = 0; l < L; l++) {
        double lb;
        assert_int_equal(dsi_eplb_layer_lower_bound(load + (size_t)l * E, E, R, G, N, P, &lb), DSI_OK);
        if (mb[l] < lb * (1 - 1e-9)) print_error("bound %g above best %g: E=%d R=%d G=%d N=%d P=%d layer %d\n", lb, mb[l], E, R, G, N, P, l);
        assert_true(mb[l] >= lb * (1 - 1e-9)); /* the bound is a bound */
        const int32_t *p = ds.phy2log + (size_t)l * R;
        int dup = 0;
        for (int g = 0; g < P; g++)
            for (int a = 0; a < k; a++)
                for (int b = a + 1; b < k; b++) dup |= p[g * k + a] == p[g * k + b];
        if (!dup && mb[l] > md[l] * (1 + 1e-12)) lost++;
        if (sum_ratio) *sum_ratio += mb[l] / md[l];
    }
    free(md), free(mb);
    dsi_eplb_placement_free(&ds);
    dsi_eplb_placement_free(&best);
    return lost;
}

static void test_best_beats_deepseek_zipf(void **state) {
    /* DeepSeek's two deployments: prefill (hierarchical) and decode (global,
     * 8 groups over 18 nodes). */
    const int settings[2][5] = {{256, 288, 8, 4, 32}, {256, 288, 8, 18, 144}};
    const double exps[4] = {0.6, 0.8, 1.0, 1.2};
    const int L = 3;
    double *load = malloc(sizeof(double) * L * 256);
    for (int si = 0; si < 2; si++) {
        const int *st = settings[si];
        double ratio = 0;
        for (int xi = 0; xi < 4; xi++) {
            for (int l = 0; l < L; l++) zipf_layer(load + l * 256, 256, exps[xi]);
            assert_int_equal(compare_policies(load, L, st[0], st[1], st[2], st[3], st[4], &ratio), 0);
        }
        /* better on average, clearly so where nodes constrain placement */
        assert_true(ratio / (4 * L) < (si == 0 ? 0.97 : 1.0));
    }
    free(load);
}

static void test_constraints_random_shapes(void **state) {
    /* Small random shapes with ties and zero loads, both modes. */
    double load[4 * 96];
    for (int trial = 0; trial < 60; trial++) {
        int N = 1 + (int)(rng() % 4), Pn = 1 + (int)(rng() % 4), P = N * Pn;
        int G = trial % 3 == 0 ? N * (1 + (int)(rng() % 3)) : 1 + (int)(rng() % 8); /* sometimes global */
        int gs = 1 + (int)(rng() % 4), E = G * gs;
        if (E > 96) continue;
        int hier = G % N == 0, e_node = hier ? E / N : E;
        int k = DSI_CEIL_DIV(E, P) + (int)(rng() % 3);
        if (k > e_node) k = e_node;
        int R = P * k;
        if (R < E) continue;
        int L = 4;
        for (int i = 0; i < L * E; i++) {
            uint64_t r = rng() % 10;
            load[i] = r < 2 ? 0 : r < 4 ? 50 : (double)(rng() % 1000);
        }
        assert_int_equal(compare_policies(load, L, E, R, G, N, P, NULL), 0);
    }
}

static void test_many_groups_use_swap_search(void **state) {
    /* 16 groups over 4 nodes: 2.6M splits, too many to enumerate, so BEST
     * searches by swapping groups and the bound relaxes; both must hold. */
    double load[4 * 64];
    for (int l = 0; l < 4; l++) zipf_layer(load + l * 64, 64, 1.0);
    double ratio = 0;
    assert_int_equal(compare_policies(load, 4, 64, 80, 16, 4, 16, &ratio), 0);
    assert_true(ratio / 4 <= 1.0);
    /* 128 groups of one expert: more than a mask holds, DeepSeek's split kept */
    double big[2 * 128];
    for (int l = 0; l < 2; l++) zipf_layer(big + l * 128, 128, 1.0);
    ratio = 0;
    assert_int_equal(compare_policies(big, 2, 128, 160, 128, 4, 32, &ratio), 0);
    assert_true(ratio / 2 <= 1.0);
}

static void test_global_policy_when_groups_do_not_divide(void **state) {
    /* 8 groups on 3 nodes: global policy; placement ignores groups. */
    double load[48];
    for (int e = 0; e < 48; e++) load[e] = 1000.0 / (1 + e % 7) + e;
    dsi_eplb_placement pl = {0};
    assert_int_equal(dsi_eplb_rebalance(load, 1, 48, 60, 8, 3, 6, DSI_EPLB_DEEPSEEK, &pl), DSI_OK);
    assert_int_equal(dsi_eplb_placement_validate(&pl, 8, 3, 0), DSI_OK);
    dsi_eplb_placement_free(&pl);
    assert_int_equal(dsi_eplb_rebalance(load, 1, 48, 60, 8, 3, 6, DSI_EPLB_BEST, &pl), DSI_OK);
    assert_int_equal(dsi_eplb_placement_validate(&pl, 8, 3, 1), DSI_OK);
    dsi_eplb_placement_free(&pl);
}

static void test_bad_shapes_and_loads(void **state) {
    double load[16] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};
    dsi_eplb_placement pl = {0};
    assert_int_equal(dsi_eplb_rebalance(load, 1, 12, 16, 5, 2, 8, DSI_EPLB_BEST, &pl), DSI_EINVAL); /* E % G */
    assert_non_null(strstr(dsi_last_error(), "groups"));
    assert_int_equal(dsi_eplb_rebalance(load, 1, 12, 16, 4, 3, 8, DSI_EPLB_BEST, &pl), DSI_EINVAL); /* P % N */
    assert_int_equal(dsi_eplb_rebalance(load, 1, 12, 18, 4, 2, 8, DSI_EPLB_BEST, &pl), DSI_EINVAL); /* R % P */
    assert_int_equal(dsi_eplb_rebalance(load, 1, 12, 8, 4, 2, 8, DSI_EPLB_BEST, &pl), DSI_EINVAL);  /* R < E */
    assert_int_equal(dsi_eplb_rebalance(load, 1, 12, 0, 4, 2, 8, DSI_EPLB_BEST, &pl), DSI_EINVAL);
    /* 8 slots per gpu but only 6 experts per node: BEST would double up */
    assert_int_equal(dsi_eplb_rebalance(load, 1, 12, 16, 4, 2, 2, DSI_EPLB_BEST, &pl), DSI_EINVAL);
    assert_int_equal(dsi_eplb_rebalance(load, 1, 12, 16, 4, 2, 2, DSI_EPLB_DEEPSEEK, &pl), DSI_OK);
    dsi_eplb_placement_free(&pl);
    load[3] = -1;
    assert_int_equal(dsi_eplb_rebalance(load, 1, 12, 16, 4, 2, 8, DSI_EPLB_BEST, &pl), DSI_EINVAL);
    load[3] = NAN;
    assert_int_equal(dsi_eplb_rebalance(load, 1, 12, 16, 4, 2, 8, DSI_EPLB_DEEPSEEK, &pl), DSI_EINVAL);
    assert_null(pl.phy2log);
}

static void test_load_json(void **state) {
    double *m = NULL;
    int L, E;
    const char *ok = "{\"load\": [[1, 2.5, 0], [3, 4, 5]]}";
    assert_int_equal(dsi_eplb_load_parse(ok, strlen(ok), &m, &L, &E), DSI_OK);
    assert_int_equal(L, 2);
    assert_int_equal(E, 3);
    assert_true(m[1] == 2.5 && m[5] == 5);
    free(m);
    const char *bad[] = {
        "{\"load\": [[1, 2], [3]]}",      /* ragged */
        "{\"load\": [[1, -2]]}",          /* negative */
        "{\"load\": [[1, NaN]]}",         /* not JSON */
        "{\"load\": [[1, 1e999]]}",       /* infinite */
        "{\"load\": [[1, \"2\"]]}",       /* string */
        "{\"load\": []}",                 /* empty */
        "{\"load\": [[]]}",               /* empty rows */
        "{\"lode\": [[1]]}",              /* missing key */
        "[[1, 2]]",                       /* not an object */
        "{\"load\": [[1, 2]]",            /* truncated */
        "",
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        m = (double *)1;
        assert_int_not_equal(dsi_eplb_load_parse(bad[i], strlen(bad[i]), &m, &L, &E), DSI_OK);
        assert_null(m);
        assert_true(strlen(dsi_last_error()) > 0);
    }
    assert_int_equal(dsi_eplb_load_read("/nonexistent/load.json", &m, &L, &E), DSI_EIO);
    assert_int_equal(dsi_eplb_load_read(DSI_TEST_DATA "/eplb/readme_load.json", &m, &L, &E), DSI_OK);
    assert_int_equal(L, 2);
    assert_int_equal(E, 12);
    assert_memory_equal(m, README_LOAD, sizeof README_LOAD);
    free(m);
}

static char *placement_text(const dsi_eplb_placement *pl, const double *mom) {
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    assert_non_null(f);
    assert_int_equal(dsi_eplb_placement_write(pl, mom, f), DSI_OK);
    fclose(f);
    return buf;
}

static void test_placement_file_roundtrip(void **state) {
    dsi_eplb_placement pl = {0}, back = {0};
    assert_int_equal(dsi_eplb_rebalance(&README_LOAD[0][0], 2, 12, 16, 4, 2, 8, DSI_EPLB_DEEPSEEK, &pl), DSI_OK);
    double mom[2];
    assert_int_equal(dsi_eplb_max_over_mean(&pl, &README_LOAD[0][0], mom), DSI_OK);
    char *txt = placement_text(&pl, mom);
    assert_int_equal(dsi_eplb_placement_parse(txt, strlen(txt), 12, 16, 8, 2, &back), DSI_OK);
    assert_int_equal(back.max_replicas, pl.max_replicas);
    assert_memory_equal(back.phy2log, pl.phy2log, sizeof(int32_t) * 32);
    assert_memory_equal(back.log2phy, pl.log2phy, sizeof(int32_t) * 2 * 12 * pl.max_replicas);
    assert_memory_equal(back.logcnt, pl.logcnt, sizeof(int32_t) * 24);
    dsi_eplb_placement_free(&back);
    /* the runtime's shape must match the file */
    assert_int_not_equal(dsi_eplb_placement_parse(txt, strlen(txt), 13, 16, 8, 0, &back), DSI_OK);
    assert_int_not_equal(dsi_eplb_placement_parse(txt, strlen(txt), 12, 24, 8, 0, &back), DSI_OK);
    assert_int_not_equal(dsi_eplb_placement_parse(txt, strlen(txt), 12, 16, 3, 0, &back), DSI_OK);
    assert_int_not_equal(dsi_eplb_placement_parse(txt, strlen(txt), 12, 16, 8, 3, &back), DSI_OK);
    assert_null(back.phy2log);
    /* phy2log alone is enough: the index is rebuilt */
    const char *only = "{\"phy2log\": [[0,1,2,0]]}";
    assert_int_equal(dsi_eplb_placement_parse(only, strlen(only), 3, 4, 2, 1, &back), DSI_OK);
    assert_int_equal(back.logcnt[0], 2);
    assert_int_equal(back.log2phy[0], 0);
    assert_int_equal(back.log2phy[1], 3);
    assert_int_equal(back.log2phy[2], 1);
    assert_int_equal(back.log2phy[3], -1);
    dsi_eplb_placement_free(&back);
    const char *bad[] = {
        "{\"phy2log\": [[0,1,1,0]]}",                                      /* expert 2 lost */
        "{\"phy2log\": [[0,1,2,3]]}",                                      /* out of range */
        "{\"phy2log\": [[0,1,2,0.5]]}",                                    /* not an integer */
        "{\"phy2log\": [[0,1,2,0]], \"logcnt\": [[1,1,1]]}",               /* count disagrees */
        "{\"phy2log\": [[0,1,2,0]], \"log2phy\": [[[0,1],[1,-1],[2,-1]]]}", /* slot 1 is expert 1 */
        "{\"phy2log\": [[0,1,2,0]], \"log2phy\": [[[0],[1],[2]]]}",        /* too narrow */
        "{\"phy2log\": [[0,1,2]]}",                                        /* wrong slot count */
        "{\"log2phy\": []}",
        "not json",
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        int rc = dsi_eplb_placement_parse(bad[i], strlen(bad[i]), 3, 4, 2, 0, &back);
        if (rc == DSI_OK) print_error("accepted: %s\n", bad[i]);
        assert_int_not_equal(rc, DSI_OK);
        assert_null(back.phy2log);
    }
    /* load from a file */
    char path[] = "/tmp/dsi_eplb_test_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    FILE *f = fdopen(fd, "w");
    fputs(txt, f);
    fclose(f);
    assert_int_equal(dsi_eplb_placement_load(path, 12, 16, 8, 2, &back), DSI_OK);
    assert_memory_equal(back.phy2log, pl.phy2log, sizeof(int32_t) * 32);
    dsi_eplb_placement_free(&back);
    remove(path);
    assert_int_equal(dsi_eplb_placement_load(path, 12, 16, 8, 2, &back), DSI_EIO);
    free(txt);
    dsi_eplb_placement_free(&pl);
}

static void test_pick_replica_spreads_evenly(void **state) {
    dsi_eplb_placement pl = {0};
    assert_int_equal(dsi_eplb_rebalance(&README_LOAD[0][0], 2, 12, 16, 4, 2, 8, DSI_EPLB_BEST, &pl), DSI_OK);
    for (int l = 0; l < 2; l++)
        for (int e = 0; e < 12; e++) {
            int hits[16] = {0};
            int c = pl.logcnt[l * 12 + e];
            for (uint64_t t = 0; t < 120; t++) {
                int s = dsi_eplb_pick_replica(&pl, l, e, t);
                assert_true(s >= 0 && s < 16);
                assert_int_equal(pl.phy2log[l * 16 + s], e);
                hits[s]++;
            }
            for (int s = 0; s < 16; s++)
                if (hits[s]) assert_int_equal(hits[s], 120 / c);
        }
    dsi_eplb_placement_free(&pl);
}

static void test_align_undoes_relabeling(void **state) {
    /* Shuffle nodes, GPUs within nodes and slots within GPUs: align must find
     * the original placement again, moving nothing. */
    const int L = 3, E = 64, R = 96, G = 8, N = 4, P = 16, k = R / P, Sn = R / N, Pn = P / N;
    double load[3 * 64];
    for (int l = 0; l < L; l++) zipf_layer(load + l * E, E, 1.0);
    dsi_eplb_placement cur = {0}, next = {0};
    assert_int_equal(dsi_eplb_rebalance(load, L, E, R, G, N, P, DSI_EPLB_BEST, &cur), DSI_OK);
    assert_int_equal(dsi_eplb_rebalance(load, L, E, R, G, N, P, DSI_EPLB_BEST, &next), DSI_OK);
    int32_t tmp[96];
    for (int l = 0; l < L; l++) {
        int32_t *p = next.phy2log + l * R;
        const int nperm[4] = {2, 0, 3, 1};
        for (int n = 0; n < N; n++)
            for (int g = 0; g < Pn; g++)
                for (int j = 0; j < k; j++)
                    tmp[nperm[n] * Sn + ((g + 1) % Pn) * k + (j + l + 1) % k] = p[n * Sn + g * k + j];
        memcpy(p, tmp, sizeof tmp);
    }
    double m0[3], m1[3];
    assert_int_equal(dsi_eplb_max_over_mean(&next, load, m0), DSI_OK);
    assert_memory_not_equal(next.phy2log, cur.phy2log, sizeof(int32_t) * L * R);
    int moved = -1;
    assert_int_equal(dsi_eplb_align(&cur, &next, N, &moved), DSI_OK);
    assert_int_equal(moved, 0);
    assert_memory_equal(next.phy2log, cur.phy2log, sizeof(int32_t) * L * R);
    assert_int_equal(dsi_eplb_placement_validate(&next, G, N, 1), DSI_OK);
    assert_int_equal(dsi_eplb_max_over_mean(&next, load, m1), DSI_OK);
    for (int l = 0; l < L; l++) assert_true(fabs(m0[l] - m1[l]) < 1e-12);
    dsi_eplb_placement_free(&next);
    assert_int_equal(dsi_eplb_rebalance(load, 1, E, 2 * E, G, N, P, DSI_EPLB_BEST, &next), DSI_OK);
    assert_int_not_equal(dsi_eplb_align(&cur, &next, N, NULL), DSI_OK); /* shapes differ */
    dsi_eplb_placement_free(&next);
    dsi_eplb_placement_free(&cur);
}

static void test_stats_window(void **state) {
    assert_null(dsi_eplb_stats_create(0, 4, 2));
    assert_null(dsi_eplb_stats_create(2, 4, 0));
    dsi_eplb_stats_destroy(NULL);
    dsi_eplb_stats *s = dsi_eplb_stats_create(2, 4, 3);
    assert_non_null(s);
    double snap[8];
    const int32_t a[] = {0, 1, 1, 3}, b[] = {2, 2};
    /* step 1 */
    assert_int_equal(dsi_eplb_stats_record(s, 0, a, 4), DSI_OK);
    assert_int_equal(dsi_eplb_stats_record(s, 1, b, 2), DSI_OK);
    dsi_eplb_stats_snapshot(s, snap);
    const double want1[8] = {1, 2, 0, 1, 0, 0, 2, 0};
    assert_memory_equal(snap, want1, sizeof want1);
    dsi_eplb_stats_step(s);
    /* steps 2 and 3 add expert 3 of layer 0 once each */
    for (int i = 0; i < 2; i++) {
        assert_int_equal(dsi_eplb_stats_record(s, 0, a + 3, 1), DSI_OK);
        dsi_eplb_stats_step(s);
    }
    assert_int_equal(dsi_eplb_stats_steps(s), 3);
    /* the window holds steps 2, 3 and the open step 4: step 1 is gone */
    dsi_eplb_stats_snapshot(s, snap);
    const double want2[8] = {0, 0, 0, 2, 0, 0, 0, 0};
    assert_memory_equal(snap, want2, sizeof want2);
    dsi_eplb_stats_step(s);
    dsi_eplb_stats_step(s);
    dsi_eplb_stats_snapshot(s, snap);
    const double zero[8] = {0};
    assert_memory_equal(snap, zero, sizeof zero);
    /* bad ids count nothing */
    const int32_t bad[] = {1, 4};
    assert_int_equal(dsi_eplb_stats_record(s, 0, bad, 2), DSI_ERANGE);
    assert_int_equal(dsi_eplb_stats_record(s, 2, a, 1), DSI_ERANGE);
    const int32_t neg[] = {-1};
    assert_int_equal(dsi_eplb_stats_record(s, 0, neg, 1), DSI_ERANGE);
    dsi_eplb_stats_snapshot(s, snap);
    assert_memory_equal(snap, zero, sizeof zero);
    dsi_eplb_stats_destroy(s);
}

static void test_should_rebalance(void **state) {
    /* Tokens routed with Zipf skew into a stats window; the current placement
     * was made for uniform load. */
    const int L = 2, E = 64, R = 72, G = 8, N = 2, P = 8;
    dsi_eplb_config cfg = {.n_slots = R, .n_groups = G, .n_nodes = N, .n_gpus = P, .policy = DSI_EPLB_BEST};
    double uniform[2 * 64];
    for (int i = 0; i < L * E; i++) uniform[i] = 100;
    dsi_eplb_placement cur = {0}, prop = {0};
    assert_int_equal(dsi_eplb_rebalance(uniform, L, E, R, G, N, P, DSI_EPLB_BEST, &cur), DSI_OK);
    dsi_eplb_stats *s = dsi_eplb_stats_create(L, E, 4);
    double skew[64];
    int32_t ids[4096];
    for (int step = 0; step < 6; step++) {
        for (int l = 0; l < L; l++) {
            zipf_layer(skew, E, 1.0);
            int n = 0;
            for (int e = 0; e < E; e++)
                for (int t = 0; t < (int)(skew[e] / 1e6 * 4000); t++) ids[n++] = e;
            assert_int_equal(dsi_eplb_stats_record(s, l, ids, n), DSI_OK);
        }
        dsi_eplb_stats_step(s);
    }
    double before[2], after[2];
    dsi_eplb_decision dec = {.mom_before = before, .mom_after = after};
    assert_int_equal(dsi_eplb_stats_should_rebalance(s, &cur, &cfg, 0.05, &dec, &prop), DSI_OK);
    assert_true(dec.rebalance);
    assert_true(dec.gain > 0.05 && dec.gain < 1);
    assert_true(dec.moved_slots > 0 && dec.moved_slots < L * R);
    for (int l = 0; l < L; l++) assert_true(after[l] < before[l]);
    assert_int_equal(dsi_eplb_placement_validate(&prop, G, N, 1), DSI_OK);
    /* Once switched, the same load predicts no gain. */
    dsi_eplb_decision again = {0};
    assert_int_equal(dsi_eplb_stats_should_rebalance(s, &prop, &cfg, 0.05, &again, NULL), DSI_OK);
    assert_false(again.rebalance);
    assert_true(fabs(again.gain) < 1e-9);
    /* Shapes must match. */
    dsi_eplb_config other = cfg;
    other.n_slots = 80;
    assert_int_not_equal(dsi_eplb_stats_should_rebalance(s, &prop, &other, 0.05, &again, NULL), DSI_OK);
    dsi_eplb_placement_free(&prop);
    dsi_eplb_placement_free(&cur);
    dsi_eplb_stats_destroy(s);
}

/* The runtime's view: a skewed synthetic router feeds the stats, tokens are
 * dispatched through dsi_eplb_pick_replica, and the busiest rank's expert
 * tokens must drop after switching to the proposed placement. */
static void test_live_rebalance_drops_busiest_rank(void **state) {
    const int L = 2, E = 64, R = 80, G = 8, N = 2, P = 16, k = R / P;
    dsi_eplb_config cfg = {.n_slots = R, .n_groups = G, .n_nodes = N, .n_gpus = P, .policy = DSI_EPLB_BEST};
    double uniform[2 * 64];
    for (int i = 0; i < L * E; i++) uniform[i] = 1;
    dsi_eplb_placement cur = {0}, next = {0};
    assert_int_equal(dsi_eplb_rebalance(uniform, L, E, R, G, N, P, DSI_EPLB_BEST, &cur), DSI_OK);
    /* router: expert = Zipf(1.1) draw over a fixed per-layer permutation */
    double w[2][64];
    for (int l = 0; l < L; l++) zipf_layer(w[l], E, 1.1);
    dsi_eplb_stats *s = dsi_eplb_stats_create(L, E, 8);
    const int T = 2048;
    static int32_t ids[2][8 * 2048];
    for (int l = 0; l < L; l++) {
        double tot = 0;
        for (int e = 0; e < E; e++) tot += w[l][e];
        for (int t = 0; t < 8 * T; t++) {
            double u = (double)(rng() >> 11) / 9007199254740992.0 * tot, acc = 0;
            int e = 0;
            while (e < E - 1 && (acc += w[l][e]) <= u) e++;
            ids[l][t] = e;
        }
    }
    for (int step = 0; step < 4; step++) {
        for (int l = 0; l < L; l++) assert_int_equal(dsi_eplb_stats_record(s, l, ids[l], 8 * T), DSI_OK);
        dsi_eplb_stats_step(s);
    }
    double mom_before[2], mom_after[2];
    dsi_eplb_decision dec = {.mom_before = mom_before, .mom_after = mom_after};
    assert_int_equal(dsi_eplb_stats_should_rebalance(s, &cur, &cfg, 0.1, &dec, &next), DSI_OK);
    assert_true(dec.rebalance);
    for (int l = 0; l < L; l++) {
        long before[16] = {0}, after[16] = {0}, mb = 0, ma = 0;
        uint64_t seen[64] = {0}; /* per-expert running count: exact equal shares */
        for (int t = 0; t < 8 * T; t++) {
            int e = ids[l][t];
            before[dsi_eplb_pick_replica(&cur, l, e, seen[e]) / k]++;
            after[dsi_eplb_pick_replica(&next, l, e, seen[e]++) / k]++;
        }
        for (int g = 0; g < P; g++) mb = before[g] > mb ? before[g] : mb, ma = after[g] > ma ? after[g] : ma;
        assert_true(ma < mb * 0.8);
        /* the prediction holds to within the round-robin split's rounding
         * (a replica gets at most one token more than its share) */
        double mean = 8.0 * T / P;
        assert_true(fabs(ma / mean - mom_after[l]) <= k / mean + 1e-9);
        assert_true(fabs(mb / mean - mom_before[l]) <= k / mean + 1e-9);
    }
    dsi_eplb_placement_free(&cur);
    dsi_eplb_placement_free(&next);
    dsi_eplb_stats_destroy(s);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_readme_example_exact),
        cmocka_unit_test(test_deepseek_golden),
        cmocka_unit_test(test_max_over_mean_by_hand),
        cmocka_unit_test(test_best_beats_deepseek_zipf),
        cmocka_unit_test(test_constraints_random_shapes),
        cmocka_unit_test(test_many_groups_use_swap_search),
        cmocka_unit_test(test_global_policy_when_groups_do_not_divide),
        cmocka_unit_test(test_bad_shapes_and_loads),
        cmocka_unit_test(test_load_json),
        cmocka_unit_test(test_placement_file_roundtrip),
        cmocka_unit_test(test_pick_replica_spreads_evenly),
        cmocka_unit_test(test_align_undoes_relabeling),
        cmocka_unit_test(test_stats_window),
        cmocka_unit_test(test_should_rebalance),
        cmocka_unit_test(test_live_rebalance_drops_busiest_rank),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
