/* DeepSeek's open EPLB algorithm (github deepseek-ai/EPLB, eplb.py), one layer.
 *
 * Reproduced step for step, in float32 like the original (it calls
 * weight.float() first and accumulates pack weights in float32 tensors):
 *   1. pack groups to nodes by balanced packing on the group loads;
 *   2. per node, replicate over R/N slots, each extra replica going to the
 *      expert with the largest load per replica (first index on ties, as
 *      torch.max does);
 *   3. per node, pack the replicas to the node's GPUs by balanced packing on
 *      load/replicas;
 *   then map node-local indices back to global slots (GPU-major).
 * Global policy (G % N != 0): the same with one group and one node.
 *
 * Tie-breaking. balanced_packing sorts with torch.sort(descending=True),
 * which is not stable: on CPU PyTorch runs libstdc++'s std::sort over (value,
 * index) pairs, an introsort whose order of equal weights is deterministic but
 * not the input order once more than 16 items are sorted. Equal weights are
 * common: all replicas of one expert weigh the same. So sort_desc below is
 * that introsort (median-of-three quicksort down to runs of 16, heapsort past
 * the depth limit, then insertion sort), which gives DeepSeek's placement and
 * replica order exactly, as checked against PyTorch 1.13 on random, Zipf and
 * tie-heavy loads. (PyTorch builds that sort through x86-simd-sort may order
 * ties differently; so may the original, from run to run, on GPU.) Inside
 * packing, Python's min() returns the first of equally light packs.
 */
#include "eplb/eplb_impl.h"

#include <stdlib.h>
#include <string.h>

#include "dsinfer/common.h"

typedef struct {
    float w;
    int i;
} keyed;

/* torch's KeyValueCompDesc without NaNs (loads are checked finite). */
static inline int before(const keyed *x, const keyed *y) { return x->w > y->w; }

static inline void swap_k(keyed *a, keyed *b) {
    keyed t = *a;
    *a = *b, *b = t;
}

static void push_heap(keyed *v, long hole, long top, keyed val) {
    long parent = (hole - 1) / 2;
    while (hole > top && before(&v[parent], &val)) {
        v[hole] = v[parent];
        hole = parent;
        parent = (hole - 1) / 2;
    }
    v[hole] = val;
}

static void adjust_heap(keyed *v, long hole, long len, keyed val) {
    long top = hole, child = hole;
    while (child < (len - 1) / 2) {
        child = 2 * (child + 1);
        if (before(&v[child], &v[child - 1])) child--;
        v[hole] = v[child];
        hole = child;
    }
    if ((len & 1) == 0 && child == (len - 2) / 2) {
        child = 2 * (child + 1);
        v[hole] = v[child - 1];
        hole = child - 1;
    }
    push_heap(v, hole, top, val);
}

static void heap_sort(keyed *v, long len) {
    for (long parent = (len - 2) / 2; len >= 2; parent--) {
        adjust_heap(v, parent, len, v[parent]);
        if (parent == 0) break;
    }
    for (long last = len - 1; last > 0; last--) {
        keyed val = v[last];
        v[last] = v[0];
        adjust_heap(v, 0, last, val);
    }
}

static void median_to_first(keyed *res, keyed *a, keyed *b, keyed *c) {
    if (before(a, b)) {
        if (before(b, c)) swap_k(res, b);
        else if (before(a, c)) swap_k(res, c);
        else swap_k(res, a);
    } else if (before(a, c)) swap_k(res, a);
    else if (before(b, c)) swap_k(res, c);
    else swap_k(res, b);
}

static keyed *partition_pivot(keyed *first, keyed *last) {
    median_to_first(first, first + 1, first + (last - first) / 2, last - 1);
    keyed *lo = first + 1, *hi = last, *pivot = first;
    for (;;) {
        while (before(lo, pivot)) lo++;
        hi--;
        while (before(pivot, hi)) hi--;
        if (!(lo < hi)) return lo;
        swap_k(lo, hi);
        lo++;
    }
}

static void introsort_loop(keyed *first, keyed *last, int depth) {
    while (last - first > 16) {
        if (depth == 0) {
            heap_sort(first, last - first);
            return;
        }
        depth--;
        keyed *cut = partition_pivot(first, last);
        introsort_loop(cut, last, depth);
        last = cut;
    }
}

static void linear_insert(keyed *last) {
    keyed val = *last, *next = last - 1;
    while (before(&val, next)) *last = *next, last = next--;
    *last = val;
}

static void insertion_sort(keyed *first, keyed *last) {
    for (keyed *i = first + 1; i < last; i++) {
        if (before(i, first)) {
            keyed val = *i;
            memmove(first + 1, first, sizeof *first * (size_t)(i - first));
            *first = val;
        } else {
            linear_insert(i);
        }
    }
}

/* std::sort(v, v + n, KeyValueCompDesc), step for step. */
static void sort_desc(keyed *v, long n) {
    if (n < 2) return;
    int lg = 0;
    while ((2L << lg) <= n) lg++;
    introsort_loop(v, v + n, 2 * lg);
    if (n > 16) {
        insertion_sort(v, v + 16);
        for (keyed *i = v + 16; i < v + n; i++) linear_insert(i);
    } else {
        insertion_sort(v, v + n);
    }
}

/* n items of weight w into m packs of exactly n/m items each. Writes the pack
 * and the rank inside the pack of every item. `tmp` holds n keyed entries. */
static void balanced_packing(const float *w, int n, int m, int32_t *pack, int32_t *rank, keyed *tmp,
                             float *pack_w, int *pack_n) {
    int per = n / m;
    if (per == 1) {
        for (int i = 0; i < n; i++) pack[i] = i, rank[i] = 0;
        return;
    }
    for (int i = 0; i < n; i++) tmp[i].w = w[i], tmp[i].i = i;
    sort_desc(tmp, n);
    for (int p = 0; p < m; p++) pack_w[p] = 0.0f, pack_n[p] = 0;
    for (int t = 0; t < n; t++) {
        int item = tmp[t].i, best = -1;
        for (int p = 0; p < m; p++)
            if (pack_n[p] < per && (best < 0 || pack_w[p] < pack_w[best])) best = p;
        pack[item] = best;
        rank[item] = pack_n[best]++;
        pack_w[best] += w[item];
    }
}

/* n logical experts of weight w to S >= n replicas: phy2log[S], rank[S], cnt[n]. */
static void replicate(const float *w, int n, int S, int32_t *phy2log, int32_t *rank, int32_t *cnt) {
    for (int i = 0; i < n; i++) phy2log[i] = i, rank[i] = 0, cnt[i] = 1;
    for (int s = n; s < S; s++) {
        int best = 0;
        float bv = w[0] / (float)cnt[0];
        for (int i = 1; i < n; i++) {
            float v = w[i] / (float)cnt[i];
            if (v > bv) bv = v, best = i;
        }
        phy2log[s] = best;
        rank[s] = cnt[best]++;
    }
}

int dsi__eplb_deepseek_layer(const double *load, int E, int R, int G, int N, int P,
                             int32_t *phy2log_out, int32_t *phyrank_out) {
    if (G % N != 0) G = 1, N = 1; /* global policy */
    const int gs = E / G, gpn = G / N, En = E / N, Sn = R / N, Pn = P / N, k = R / P;
    int nmax = DSI_MAX(E, R);
    float *w = malloc(sizeof(float) * E), *gw = calloc(G, sizeof(float));
    float *wn = malloc(sizeof(float) * En), *wphy = malloc(sizeof(float) * Sn);
    float *pack_w = malloc(sizeof(float) * DSI_MAX(G, P));
    int *pack_n = malloc(sizeof(int) * DSI_MAX(G, P));
    keyed *tmp = malloc(sizeof(keyed) * nmax);
    int32_t *gpack = malloc(sizeof(int32_t) * G), *grank = malloc(sizeof(int32_t) * G);
    int32_t *mlog2log = malloc(sizeof(int32_t) * E);
    int32_t *p2m = malloc(sizeof(int32_t) * Sn), *prank = malloc(sizeof(int32_t) * Sn);
    int32_t *mcnt = malloc(sizeof(int32_t) * En);
    int32_t *pk = malloc(sizeof(int32_t) * Sn), *pr = malloc(sizeof(int32_t) * Sn);
    int rc = DSI_OK;
    if (!w || !gw || !wn || !wphy || !pack_w || !pack_n || !tmp || !gpack || !grank || !mlog2log ||
        !p2m || !prank || !mcnt || !pk || !pr) {
        rc = dsi_error(DSI_ENOMEM, "eplb: out of memory");
        goto done;
    }
    for (int e = 0; e < E; e++) w[e] = (float)load[e];

    /* Step 1: groups to nodes. Integer token counts below 2^24 sum exactly in
     * float32 in any order, so the group sums match torch's. */
    for (int g = 0; g < G; g++) {
        float s = 0.0f;
        for (int j = 0; j < gs; j++) s += w[g * gs + j];
        gw[g] = s;
    }
    balanced_packing(gw, G, N, gpack, grank, tmp, pack_w, pack_n);
    for (int g = 0; g < G; g++)
        for (int j = 0; j < gs; j++) mlog2log[(gpack[g] * gpn + grank[g]) * gs + j] = g * gs + j;

    for (int node = 0; node < N; node++) {
        /* Step 2: replicate within the node. */
        for (int i = 0; i < En; i++) wn[i] = w[mlog2log[node * En + i]];
        replicate(wn, En, Sn, p2m, prank, mcnt);
        /* Step 3: replicas to the node's GPUs. */
        for (int s = 0; s < Sn; s++) wphy[s] = wn[p2m[s]] / (float)mcnt[p2m[s]];
        balanced_packing(wphy, Sn, Pn, pk, pr, tmp, pack_w, pack_n);
        for (int s = 0; s < Sn; s++) {
            int slot = node * Sn + pk[s] * k + pr[s];
            phy2log_out[slot] = mlog2log[node * En + p2m[s]];
            phyrank_out[slot] = prank[s];
        }
    }
done:
    free(w), free(gw), free(wn), free(wphy), free(pack_w), free(pack_n), free(tmp);
    free(gpack), free(grank), free(mlog2log), free(p2m), free(prank), free(mcnt), free(pk), free(pr);
    return rc;
}
