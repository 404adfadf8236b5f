/* Policy BEST: a placement never worse than DeepSeek's, with no expert twice
 * on one GPU and, in hierarchical mode, every replica in its group's node.
 *
 * Per layer, in hierarchical mode (G % N == 0):
 *   - every way of splitting the G groups into N nodes of G/N groups is
 *     scored by solving each node on its own (memoised per set of groups),
 *     with branch-and-bound on the busiest node; when the splits are too many
 *     to enumerate, a swap search over groups starts from DeepSeek's split;
 *   - a node's subproblem (n experts, S slots, Q GPUs of k slots) is solved
 *     from several starts, each polished by local search: (1) a family of
 *     replica counts, from DeepSeek's (every extra replica to the largest load
 *     per replica) to ones that keep fewer heavy replicas (family_counts),
 *     each packed largest-first onto the lightest GPU that has room and lacks
 *     the expert; (2) with two slots per GPU (decode), counts searched on
 *     the exact value of pairing heaviest with lightest (pair_count_search);
 *     (3) DeepSeek's own node placement (the seed), with any expert doubled
 *     on a GPU swapped out first.
 *   Global mode is one subproblem over all experts, slots and GPUs.
 * Local search works on the busiest GPU: it swaps one of its replicas with a
 *   lighter replica elsewhere, or moves a replica slot from one expert to
 *   another (changing both replica counts and so every GPU holding either),
 *   accepting only moves that lower (busiest load, number of GPUs at it).
 *   Starting from DeepSeek's placement it can only improve on it, which is
 *   what makes "never worse" hold whenever that placement has no doubled
 *   expert; the final check below keeps DeepSeek's layer in the rare case the
 *   search ends above it.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "dsinfer/common.h"
#include "dsinfer/eplb.h"
#include "eplb/eplb_impl.h"

/* ---- one node's subproblem ------------------------------------------------ */

typedef struct {
    int n, S, Q, k, cap;  /* experts, slots, gpus, slots per gpu, max replicas (Q) */
    const double *L;      /* [n] loads, borrowed */
    int32_t *cnt;         /* [n] replicas */
    int32_t *slot;        /* [S] local expert in each slot; gpu = slot / k */
    double *gl;           /* [Q] gpu loads */
    double *tmp;          /* [Q] scratch for move evaluation */
    int32_t *pos;         /* [n][Q] slots of each expert's replicas */
    int32_t *npos;        /* [n] */
    double lb;            /* lower bound on the busiest gpu */
} sub;

static void sub_free(sub *s) {
    free(s->cnt), free(s->slot), free(s->gl), free(s->tmp), free(s->pos), free(s->npos);
    memset(s, 0, sizeof *s);
}

static int sub_init(sub *s, const double *L, int n, int S, int Q) {
    memset(s, 0, sizeof *s);
    s->n = n, s->S = S, s->Q = Q, s->k = S / Q, s->cap = Q, s->L = L;
    s->cnt = malloc(sizeof(int32_t) * n);
    s->slot = malloc(sizeof(int32_t) * S);
    s->gl = malloc(sizeof(double) * Q);
    s->tmp = malloc(sizeof(double) * Q);
    s->pos = malloc(sizeof(int32_t) * (size_t)n * Q);
    s->npos = malloc(sizeof(int32_t) * n);
    if (!s->cnt || !s->slot || !s->gl || !s->tmp || !s->pos || !s->npos) {
        sub_free(s);
        return dsi_error(DSI_ENOMEM, "eplb: out of memory");
    }
    double total = 0, top = 0;
    for (int e = 0; e < n; e++) total += L[e], top = DSI_MAX(top, L[e]);
    int most = DSI_MIN(Q, S - n + 1); /* replicas the hottest expert can get */
    s->lb = DSI_MAX(total / Q, top / most);
    return DSI_OK;
}

/* Recomputes counts, replica lists and gpu loads from slot[], summing in slot
 * order so that equal placements always score identically. */
static void sub_refresh(sub *s) {
    memset(s->cnt, 0, sizeof(int32_t) * s->n);
    memset(s->npos, 0, sizeof(int32_t) * s->n);
    for (int i = 0; i < s->S; i++) s->cnt[s->slot[i]]++;
    for (int i = 0; i < s->S; i++) {
        int e = s->slot[i];
        if (s->npos[e] < s->cap) s->pos[(size_t)e * s->cap + s->npos[e]++] = i;
    }
    for (int g = 0; g < s->Q; g++) {
        double sum = 0;
        for (int j = 0; j < s->k; j++) {
            int e = s->slot[g * s->k + j];
            sum += s->L[e] / s->cnt[e];
        }
        s->gl[g] = sum;
    }
}

static int gpu_has(const sub *s, int g, int e) {
    const int32_t *p = s->slot + g * s->k;
    for (int j = 0; j < s->k; j++)
        if (p[j] == e) return 1;
    return 0;
}

static double sub_max(const sub *s, int *arg) {
    int a = 0;
    for (int g = 1; g < s->Q; g++)
        if (s->gl[g] > s->gl[a]) a = g;
    if (arg) *arg = a;
    return s->gl[a];
}

/* Replica counts. The first `hot_extras` extra replicas go, as in DeepSeek's
 * algorithm, to the expert with the largest load per replica; the rest are
 * fillers: with fill 0 they go the same way but only to experts that got none
 * of the first ones, with fill 1 to the experts whose replicas are lightest.
 * All capped at one replica per GPU. hot_extras = all extras is DeepSeek's
 * counts. Fewer hot replicas matter because replicas heavier than half a
 * GPU's share cannot share a GPU: once there are more of them than GPUs the
 * busiest GPU pays for two. */
static void family_counts(sub *s, int hot_extras, int fill, char *hot) {
    for (int e = 0; e < s->n; e++) s->cnt[e] = 1, hot[e] = 0;
    for (int r = s->n; r < s->S; r++) {
        int phase_hot = r - s->n < hot_extras, best = -1;
        double bv = 0;
        for (int pass = 0; pass < 2 && best < 0; pass++)
            for (int e = 0; e < s->n; e++) {
                if (s->cnt[e] >= s->cap || (!phase_hot && pass == 0 && hot[e])) continue;
                double v = s->L[e] / s->cnt[e];
                if (!phase_hot && fill == 1) v = -v;
                if (best < 0 || v > bv) bv = v, best = e;
            }
        /* best exists: S <= n * Q was checked by the caller */
        s->cnt[best]++;
        if (phase_hot) hot[best] = 1;
    }
}

typedef struct {
    double w;
    int e;
} item;

static int cmp_item(const void *a, const void *b) {
    const item *x = a, *y = b;
    if (x->w > y->w) return -1;
    if (x->w < y->w) return 1;
    return (x->e > y->e) - (x->e < y->e);
}

/* Packs the replicas given by cnt[] largest first onto the lightest GPU with a
 * free slot that lacks the expert. When every GPU with room already holds the
 * expert, a replica f from a full GPU g without it moves to the roomy GPU h
 * (some f on g is missing from h, which has fewer than k experts) and the
 * expert takes f's place on g. */
static int lpt_pack(sub *s, item *items, int *fill) {
    int m = 0;
    for (int e = 0; e < s->n; e++)
        for (int c = 0; c < s->cnt[e]; c++) items[m].w = s->L[e] / s->cnt[e], items[m++].e = e;
    qsort(items, m, sizeof *items, cmp_item);
    for (int g = 0; g < s->Q; g++) fill[g] = 0, s->gl[g] = 0;
    for (int i = 0; i < m; i++) {
        int e = items[i].e, best = -1;
        for (int g = 0; g < s->Q; g++) {
            if (fill[g] >= s->k) continue;
            int dup = 0;
            for (int j = 0; j < fill[g]; j++) dup |= s->slot[g * s->k + j] == e;
            if (!dup && (best < 0 || s->gl[g] < s->gl[best])) best = g;
        }
        if (best < 0) {
            int h = -1, g = -1, jf = -1;
            for (int q = 0; q < s->Q && h < 0; q++)
                if (fill[q] < s->k) h = q;
            for (int q = 0; q < s->Q && jf < 0; q++) {
                if (fill[q] < s->k) continue;
                int hase = 0;
                for (int j = 0; j < s->k; j++) hase |= s->slot[q * s->k + j] == e;
                if (hase) continue;
                for (int j = 0; j < s->k && jf < 0; j++) {
                    int f = s->slot[q * s->k + j], onh = 0;
                    for (int t = 0; t < fill[h]; t++) onh |= s->slot[h * s->k + t] == f;
                    if (!onh) g = q, jf = j;
                }
            }
            if (h < 0 || jf < 0) return dsi_error(DSI_EINTERNAL, "eplb: cannot pack replicas without doubling");
            s->slot[h * s->k + fill[h]++] = s->slot[g * s->k + jf];
            s->slot[g * s->k + jf] = e;
            continue; /* loads are recomputed below; the rest of the order is a heuristic */
        }
        s->slot[best * s->k + fill[best]++] = e;
        s->gl[best] += items[i].w;
    }
    sub_refresh(s);
    return DSI_OK;
}

/* Swaps doubled experts out of their GPU, each time choosing the partner that
 * keeps the two GPUs lightest. Returns 0, or -1 if some doubling has no legal
 * partner. */
static int repair_dups(sub *s) {
    sub_refresh(s);
    for (int g = 0; g < s->Q; g++)
        for (int a = 0; a < s->k; a++)
            for (int b = a + 1; b < s->k; b++) {
                int e = s->slot[g * s->k + a];
                if (s->slot[g * s->k + b] != e) continue;
                double we = s->L[e] / s->cnt[e], best = INFINITY;
                int by = -1;
                for (int y = 0; y < s->S; y++) {
                    int h = y / s->k, f = s->slot[y];
                    if (h == g || f == e || gpu_has(s, g, f) || gpu_has(s, h, e)) continue;
                    double wf = s->L[f] / s->cnt[f];
                    double v = DSI_MAX(s->gl[g] - we + wf, s->gl[h] - wf + we);
                    if (v < best) best = v, by = y;
                }
                if (by < 0) return -1;
                s->slot[g * s->k + b] = s->slot[by];
                s->slot[by] = e;
                sub_refresh(s);
            }
    return 0;
}

static int count_at(const double *gl, int Q, double mx, double tol) {
    int c = 0;
    for (int g = 0; g < Q; g++) c += gl[g] >= mx - tol;
    return c;
}

/* Loads after turning the replica of `a` in slot x into a replica of `b`;
 * returns the new maximum, *nat the GPUs at it. */
static double eval_count_move(sub *s, int a, int x, int b, double tol, int *nat) {
    double wa0 = s->L[a] / s->cnt[a], wa1 = s->L[a] / (s->cnt[a] - 1);
    double wb0 = s->L[b] / s->cnt[b], wb1 = s->L[b] / (s->cnt[b] + 1);
    memcpy(s->tmp, s->gl, sizeof(double) * s->Q);
    for (int i = 0; i < s->npos[a]; i++) {
        int y = s->pos[(size_t)a * s->cap + i];
        s->tmp[y / s->k] += y == x ? wb1 - wa0 : wa1 - wa0;
    }
    for (int i = 0; i < s->npos[b]; i++) s->tmp[s->pos[(size_t)b * s->cap + i] / s->k] += wb1 - wb0;
    double mx = s->tmp[0];
    for (int g = 1; g < s->Q; g++) mx = DSI_MAX(mx, s->tmp[g]);
    *nat = count_at(s->tmp, s->Q, mx, tol);
    return mx;
}

static void local_search(sub *s) {
    const int k = s->k, max_iter = 64 * s->S + 256;
    for (int it = 0; it < max_iter; it++) {
        int g;
        double M = sub_max(s, &g);
        double tol = 1e-12 * (M > 0 ? M : 1);
        if (M <= s->lb + tol) return;
        int nat = count_at(s->gl, s->Q, M, tol);

        /* Swap one replica of the busiest GPU with a lighter one elsewhere. */
        double best = M - tol;
        int bx = -1, by = -1;
        for (int j = 0; j < k; j++) {
            int x = g * k + j, ea = s->slot[x];
            double wa = s->L[ea] / s->cnt[ea];
            for (int h = 0; h < s->Q; h++) {
                if (h == g || s->gl[h] >= M - tol || gpu_has(s, h, ea)) continue;
                for (int t = 0; t < k; t++) {
                    int y = h * k + t, eb = s->slot[y];
                    double wb = s->L[eb] / s->cnt[eb];
                    if (wb >= wa || gpu_has(s, g, eb)) continue;
                    double v = DSI_MAX(M - wa + wb, s->gl[h] - wb + wa);
                    if (v < best) best = v, bx = x, by = y;
                }
            }
        }
        if (bx >= 0) {
            int t = s->slot[bx];
            s->slot[bx] = s->slot[by], s->slot[by] = t;
            sub_refresh(s);
            continue;
        }

        /* Move a replica slot between experts so the busiest GPU gets lighter. */
        double bmax = M;
        int bnat = nat, ca = -1, cx = -1, cb = -1;
        for (int j = 0; j < k; j++) {
            int x = g * k + j, e = s->slot[x];
            if (s->cnt[e] < s->cap) /* e gains a replica taken from some a */
                for (int a = 0; a < s->n; a++) {
                    if (a == e || s->cnt[a] < 2) continue;
                    for (int i = 0; i < s->npos[a]; i++) {
                        int y = s->pos[(size_t)a * s->cap + i];
                        if (gpu_has(s, y / k, e)) continue;
                        int na;
                        double v = eval_count_move(s, a, y, e, tol, &na);
                        if (v < bmax - tol || (v <= bmax && na < bnat)) bmax = v, bnat = na, ca = a, cx = y, cb = e;
                    }
                }
            if (s->cnt[e] >= 2) /* e's replica here becomes one of some b */
                for (int b = 0; b < s->n; b++) {
                    if (b == e || s->cnt[b] >= s->cap || gpu_has(s, g, b)) continue;
                    int na;
                    double v = eval_count_move(s, e, x, b, tol, &na);
                    if (v < bmax - tol || (v <= bmax && na < bnat)) bmax = v, bnat = na, ca = e, cx = x, cb = b;
                }
        }
        if (ca < 0 || !(bmax < M - tol || (bmax <= M && bnat < nat))) return;
        s->slot[cx] = cb;
        sub_refresh(s);
    }
}

/* With two slots per GPU, the best packing of given replica counts pairs the
 * i-th heaviest replica with the i-th lightest (the doubling rule aside), so
 * counts can be searched on that exact value: repeatedly move the one replica
 * slot, from an expert with two or more to any other, that lowers the
 * heaviest pair most. w/tag hold the replicas sorted heaviest first; nw/ntag
 * are scratch of the same size. */
static double pair_value(const double *w, int S) {
    double m = 0;
    for (int i = 0; i < S / 2; i++) m = DSI_MAX(m, w[i] + w[S - 1 - i]);
    return m;
}

static void pair_sorted(const sub *s, double *w, int32_t *tag, item *items) {
    int m = 0;
    for (int e = 0; e < s->n; e++)
        for (int c = 0; c < s->cnt[e]; c++) items[m].w = s->L[e] / s->cnt[e], items[m++].e = e;
    qsort(items, m, sizeof *items, cmp_item);
    for (int i = 0; i < m; i++) w[i] = items[i].w, tag[i] = items[i].e;
}

/* The sorted replicas after moving one slot from expert a to expert b. */
static void pair_move(const sub *s, const double *w, const int32_t *tag, int a, int b, double *nw) {
    double wa = s->L[a] / (s->cnt[a] - 1), wb = s->L[b] / (s->cnt[b] + 1);
    int na = s->cnt[a] - 1, nb = s->cnt[b] + 1, j = 0;
    double hi = DSI_MAX(wa, wb), lo = DSI_MIN(wa, wb);
    int nhi = wa >= wb ? na : nb, nlo = wa >= wb ? nb : na;
    for (int i = 0; i < s->S; i++) {
        if (tag[i] == a || tag[i] == b) continue;
        while (nhi && hi > w[i]) nw[j++] = hi, nhi--;
        while (nlo && lo > w[i]) nw[j++] = lo, nlo--;
        nw[j++] = w[i];
    }
    while (nhi) nw[j++] = hi, nhi--;
    while (nlo) nw[j++] = lo, nlo--;
}

static void pair_count_search(sub *s, item *items, double *w, int32_t *tag, double *nw) {
    pair_sorted(s, w, tag, items);
    double cur = pair_value(w, s->S);
    for (int it = 0; it < 4 * s->S; it++) {
        double best = cur * (1 - 1e-12);
        int ba = -1, bb = -1;
        for (int a = 0; a < s->n; a++) {
            if (s->cnt[a] < 2) continue;
            for (int b = 0; b < s->n; b++) {
                if (b == a || s->cnt[b] >= s->cap) continue;
                pair_move(s, w, tag, a, b, nw);
                double v = pair_value(nw, s->S);
                if (v < best) best = v, ba = a, bb = b;
            }
        }
        if (ba < 0) return;
        s->cnt[ba]--, s->cnt[bb]++;
        pair_sorted(s, w, tag, items);
        cur = pair_value(w, s->S);
    }
}

/* Solves one node: n experts with loads L over S slots on Q GPUs. seed[S]
 * (local expert ids, may be NULL) is DeepSeek's placement of the same node.
 * Writes the best placement found to out[S] and returns its busiest GPU load
 * (INFINITY with a status in *rc on failure). */
static double solve_sub(const double *L, int n, int S, int Q, const int32_t *seed, int32_t *out, int *rc) {
    sub s;
    *rc = sub_init(&s, L, n, S, Q);
    if (*rc != DSI_OK) return INFINITY;
    item *items = malloc(sizeof(item) * S);
    int *fill_n = malloc(sizeof(int) * Q);
    double best = INFINITY;
    if (!items || !fill_n) {
        *rc = dsi_error(DSI_ENOMEM, "eplb: out of memory");
        goto done;
    }
    char *hot = malloc(s.n);
    if (!hot) {
        *rc = dsi_error(DSI_ENOMEM, "eplb: out of memory");
        goto done;
    }
    /* Count vectors from DeepSeek's (all extras hot) down to none hot. */
    for (int x = S - n; x >= 0; x--)
        for (int fill = 0; fill < 2; fill++) {
            if (x == S - n && fill == 1) continue; /* same counts as fill 0 */
            family_counts(&s, x, fill, hot);
            *rc = lpt_pack(&s, items, fill_n);
            if (*rc != DSI_OK) {
                free(hot);
                goto done;
            }
            local_search(&s);
            double m = sub_max(&s, NULL);
            if (m < best) best = m, memcpy(out, s.slot, sizeof(int32_t) * S);
        }
    if (s.k == 2) {
        double *w = malloc(sizeof(double) * S), *nw = malloc(sizeof(double) * S);
        int32_t *tag = malloc(sizeof(int32_t) * S);
        if (!w || !nw || !tag) *rc = dsi_error(DSI_ENOMEM, "eplb: out of memory");
        if (*rc == DSI_OK) {
            /* start from the counts of the best placement so far */
            for (int e = 0; e < n; e++) s.cnt[e] = 0;
            for (int i = 0; i < S; i++) s.cnt[out[i]]++;
            pair_count_search(&s, items, w, tag, nw);
            *rc = lpt_pack(&s, items, fill_n);
        }
        free(w), free(nw), free(tag);
        if (*rc != DSI_OK) {
            free(hot);
            goto done;
        }
        local_search(&s);
        double m = sub_max(&s, NULL);
        if (m < best) best = m, memcpy(out, s.slot, sizeof(int32_t) * S);
    }
    free(hot);
    if (seed) {
        memcpy(s.slot, seed, sizeof(int32_t) * S);
        if (repair_dups(&s) == 0) {
            local_search(&s);
            double m = sub_max(&s, NULL);
            if (m < best) best = m, memcpy(out, s.slot, sizeof(int32_t) * S);
        }
    }
done:
    free(items), free(fill_n);
    sub_free(&s);
    return best;
}

/* ---- hierarchical: groups to nodes ---------------------------------------- */

typedef struct {
    uint64_t mask;
    double val;
    int32_t *slots; /* [Sn] global expert ids */
} memo_ent;

typedef struct {
    const double *load;
    int G, N, gs, gpn, Sn, Pn;
    memo_ent *m;
    int nm, capm;
    double *Lsub;   /* [En] */
    int32_t *gid;   /* [En] local -> global expert */
    int32_t *tmp;   /* [Sn] */
    int rc;
} hier;

/* Node value for a set of groups, solving it the first time it is asked. */
static memo_ent *node_value(hier *h, uint64_t mask, const int32_t *seed_global) {
    for (int i = 0; i < h->nm; i++)
        if (h->m[i].mask == mask) return &h->m[i];
    if (h->nm == h->capm) {
        int nc = h->capm ? 2 * h->capm : 64;
        memo_ent *nm = realloc(h->m, sizeof *nm * nc);
        if (!nm) {
            h->rc = dsi_error(DSI_ENOMEM, "eplb: out of memory");
            return NULL;
        }
        h->m = nm, h->capm = nc;
    }
    int n = 0;
    for (int g = 0; g < h->G; g++)
        if (mask >> g & 1)
            for (int j = 0; j < h->gs; j++) h->gid[n] = g * h->gs + j, h->Lsub[n++] = h->load[g * h->gs + j];
    int32_t *seed = NULL;
    if (seed_global) {
        /* local id of global expert e: its rank among the mask's experts */
        seed = malloc(sizeof(int32_t) * h->Sn);
        if (!seed) {
            h->rc = dsi_error(DSI_ENOMEM, "eplb: out of memory");
            return NULL;
        }
        for (int i = 0; i < h->Sn; i++) {
            int e = seed_global[i], grp = e / h->gs, before = 0;
            for (int g = 0; g < grp; g++) before += (int)(mask >> g & 1);
            seed[i] = before * h->gs + e % h->gs;
        }
    }
    memo_ent *ent = &h->m[h->nm];
    ent->mask = mask;
    ent->slots = malloc(sizeof(int32_t) * h->Sn);
    if (!ent->slots) {
        free(seed);
        h->rc = dsi_error(DSI_ENOMEM, "eplb: out of memory");
        return NULL;
    }
    int rc;
    ent->val = solve_sub(h->Lsub, n, h->Sn, h->Pn, seed, h->tmp, &rc);
    free(seed);
    if (rc != DSI_OK) {
        free(ent->slots);
        h->rc = rc;
        return NULL;
    }
    for (int i = 0; i < h->Sn; i++) ent->slots[i] = h->gid[h->tmp[i]];
    h->nm++;
    return ent;
}

/* Branch and bound over splits of the groups into nodes of gpn groups. */
typedef struct {
    hier *h;
    uint64_t cur[64], best[64];
    double best_val, best_sum;
} search;

static void enumerate(search *q, uint64_t used, int node, double cur_max, double cur_sum) {
    hier *h = q->h;
    if (h->rc != DSI_OK) return;
    if (node == h->N) {
        if (cur_max < q->best_val || (cur_max == q->best_val && cur_sum < q->best_sum)) {
            q->best_val = cur_max, q->best_sum = cur_sum;
            memcpy(q->best, q->cur, sizeof(uint64_t) * h->N);
        }
        return;
    }
    int first = 0;
    while (used >> first & 1) first++;
    /* choose gpn-1 more groups above `first` */
    int pick[64], np, need = h->gpn - 1;
    uint64_t mask = 1ull << first;
    int freeg[64], nf = 0;
    for (int g = first + 1; g < h->G; g++)
        if (!(used >> g & 1)) freeg[nf++] = g;
    for (int i = 0; i < need; i++) pick[i] = i;
    np = need;
    for (;;) {
        uint64_t m = mask;
        for (int i = 0; i < np; i++) m |= 1ull << freeg[pick[i]];
        memo_ent *e = node_value(h, m, NULL);
        if (!e) return;
        double v = e->val;
        if (v <= q->best_val) { /* a node above the best split's busiest cannot help */
            q->cur[node] = m;
            enumerate(q, used | m, node + 1, DSI_MAX(cur_max, v), cur_sum + v);
        }
        int i = np - 1;
        while (i >= 0 && pick[i] == nf - np + i) i--;
        if (i < 0) break;
        pick[i]++;
        for (int j = i + 1; j < np; j++) pick[j] = pick[j - 1] + 1;
    }
}

/* More groups than a mask holds: keep DeepSeek's split of groups into nodes
 * and improve each node on its own (its placement is one of the starts). */
static int fixed_split(const double *load, int E, int R, int G, int N, int P, const int32_t *seed,
                       int32_t *phy2log) {
    const int gs = E / G, En = E / N, Sn = R / N, Pn = P / N;
    double *Ls = malloc(sizeof(double) * En);
    int32_t *gid = malloc(sizeof(int32_t) * En), *lseed = malloc(sizeof(int32_t) * Sn);
    int32_t *out = malloc(sizeof(int32_t) * Sn), *local = malloc(sizeof(int32_t) * E);
    char *in = malloc(G);
    int rc = DSI_OK;
    if (!Ls || !gid || !lseed || !out || !local || !in) rc = dsi_error(DSI_ENOMEM, "eplb: out of memory");
    for (int node = 0; node < N && rc == DSI_OK; node++) {
        const int32_t *sd = seed + node * Sn;
        memset(in, 0, G);
        for (int i = 0; i < Sn; i++) in[sd[i] / gs] = 1;
        int n = 0;
        for (int g = 0; g < G; g++)
            if (in[g])
                for (int j = 0; j < gs; j++) local[g * gs + j] = n, gid[n] = g * gs + j, Ls[n++] = load[g * gs + j];
        if (n != En) {
            rc = dsi_error(DSI_EINTERNAL, "eplb: node %d holds %d experts, not %d", node, n, En);
            break;
        }
        for (int i = 0; i < Sn; i++) lseed[i] = local[sd[i]];
        solve_sub(Ls, n, Sn, Pn, lseed, out, &rc);
        for (int i = 0; i < Sn && rc == DSI_OK; i++) phy2log[node * Sn + i] = gid[out[i]];
    }
    free(Ls), free(gid), free(lseed), free(out), free(local), free(in);
    return rc;
}

static double log_splits(int G, int gpn, int N) {
    double v = lgamma(G + 1.0) - N * lgamma(gpn + 1.0) - lgamma(N + 1.0);
    return v / log(10.0);
}

static int best_hier(const double *load, int E, int R, int G, int N, int P, const int32_t *seed,
                     int32_t *phy2log) {
    hier h = {0};
    h.load = load, h.G = G, h.N = N, h.gs = E / G, h.gpn = G / N, h.Sn = R / N, h.Pn = P / N;
    h.rc = DSI_OK;
    int En = E / N;
    h.Lsub = malloc(sizeof(double) * En);
    h.gid = malloc(sizeof(int32_t) * En);
    h.tmp = malloc(sizeof(int32_t) * h.Sn);
    uint64_t *chosen = malloc(sizeof(uint64_t) * N);
    if (!h.Lsub || !h.gid || !h.tmp || !chosen) {
        h.rc = dsi_error(DSI_ENOMEM, "eplb: out of memory");
        goto done;
    }
    if (G > 64) {
        h.rc = fixed_split(load, E, R, G, N, P, seed, phy2log);
        goto done;
    }
    /* DeepSeek's split, read off its placement, solved with its nodes as seeds. */
    double ds_max = 0, ds_sum = 0;
    for (int node = 0; node < N; node++) {
        uint64_t m = 0;
        for (int i = 0; i < h.Sn; i++) m |= 1ull << (seed[node * h.Sn + i] / h.gs);
        chosen[node] = m;
        memo_ent *e = node_value(&h, m, seed + node * h.Sn);
        if (!e) goto done;
        ds_max = DSI_MAX(ds_max, e->val), ds_sum += e->val;
    }
    if (N > 1 && h.gpn > 1) {
        if (log_splits(G, h.gpn, N) <= 4.0) {
            search q = {.h = &h, .best_val = ds_max, .best_sum = ds_sum};
            memcpy(q.best, chosen, sizeof(uint64_t) * N);
            enumerate(&q, 0, 0, 0, 0);
            if (h.rc != DSI_OK) goto done;
            memcpy(chosen, q.best, sizeof(uint64_t) * N);
        } else {
            /* Too many splits: swap groups between the busiest node and another. */
            for (int improved = 1, it = 0; improved && it < 1000; it++) {
                improved = 0;
                int worst = 0;
                double mx = -1;
                for (int node = 0; node < N; node++) {
                    memo_ent *e = node_value(&h, chosen[node], NULL);
                    if (!e) goto done;
                    if (e->val > mx) mx = e->val, worst = node;
                }
                for (int o = 0; o < N && !improved; o++) {
                    if (o == worst) continue;
                    for (int a = 0; a < G && !improved; a++) {
                        if (!(chosen[worst] >> a & 1)) continue;
                        for (int b = 0; b < G && !improved; b++) {
                            if (!(chosen[o] >> b & 1)) continue;
                            uint64_t mw = (chosen[worst] & ~(1ull << a)) | 1ull << b;
                            uint64_t mo = (chosen[o] & ~(1ull << b)) | 1ull << a;
                            memo_ent *ew = node_value(&h, mw, NULL);
                            if (!ew) goto done;
                            double vw = ew->val;
                            memo_ent *eo = node_value(&h, mo, NULL);
                            if (!eo) goto done;
                            if (DSI_MAX(vw, eo->val) < mx * (1 - 1e-12)) {
                                chosen[worst] = mw, chosen[o] = mo, improved = 1;
                            }
                        }
                    }
                }
            }
        }
    }
    for (int node = 0; node < N; node++) {
        memo_ent *e = node_value(&h, chosen[node], NULL);
        if (!e) goto done;
        memcpy(phy2log + node * h.Sn, e->slots, sizeof(int32_t) * h.Sn);
    }
done:
    for (int i = 0; i < h.nm; i++) free(h.m[i].slots);
    free(h.m), free(h.Lsub), free(h.gid), free(h.tmp), free(chosen);
    return h.rc;
}

static int has_dup(const int32_t *p2l, int R, int P) {
    int k = R / P;
    for (int g = 0; g < P; g++)
        for (int a = 0; a < k; a++)
            for (int b = a + 1; b < k; b++)
                if (p2l[g * k + a] == p2l[g * k + b]) return 1;
    return 0;
}

int dsi__eplb_best_layer(const double *load, int E, int R, int G, int N, int P, const int32_t *seed,
                         int32_t *phy2log) {
    int rc;
    if (G % N == 0 && N > 1) {
        rc = best_hier(load, E, R, G, N, P, seed, phy2log);
    } else {
        solve_sub(load, E, R, P, seed, phy2log, &rc);
    }
    if (rc != DSI_OK) return rc;
    if (seed && !has_dup(seed, R, P) &&
        dsi__eplb_layer_max_load(seed, load, E, R, P) < dsi__eplb_layer_max_load(phy2log, load, E, R, P))
        memcpy(phy2log, seed, sizeof(int32_t) * R);
    return DSI_OK;
}

/* ---- lower bound ------------------------------------------------------------ */

/* A node holding experts L[n] on Q GPUs of k slots (S = Q*k) cannot beat
 * its mean GPU load. Nor can it beat H + (k-1)*m, H its heaviest replica and
 * m its lightest, as the GPU holding the heaviest holds k-1 others (pass
 * k = 1 to drop that term). For a
 * given H every expert needs base_e = ceil(L_e/H) replicas, leaving B = S -
 * sum(base) spare slots, so the lightest replica is at least
 * min_y L_y / min(Q, B + base_y). H is some L_e/c, c <= Q: try them all. */
static double node_bound(const double *L, int n, int S, int Q, int k) {
    double total = 0, best = INFINITY;
    for (int e = 0; e < n; e++) total += L[e];
    for (int e = 0; e < n; e++) {
        if (L[e] <= 0) continue;
        for (int c = 1; c <= Q; c++) {
            double H = L[e] / c;
            long B = S;
            for (int f = 0; f < n && B >= 0; f++) {
                double need = L[f] > 0 ? ceil(L[f] / H - 1e-9) : 1;
                if (need > Q) B = -1;
                else B -= need < 1 ? 1 : (long)need;
            }
            if (B < 0) continue;
            double m = INFINITY;
            for (int f = 0; f < n; f++) {
                double need = L[f] > 0 ? ceil(L[f] / H - 1e-9) : 1;
                long cy = B + (need < 1 ? 1 : (long)need);
                m = DSI_MIN(m, L[f] / (cy < Q ? cy : Q));
            }
            best = DSI_MIN(best, H + (k - 1) * m);
        }
    }
    if (best == INFINITY) best = 0; /* no load at all */
    return DSI_MAX(total / Q, best);
}

typedef struct {
    int G, N, gpn, nsub;
    uint64_t *masks;
    double *vals;
    double best;
} bound_search;

static void bound_enum(bound_search *b, uint64_t used, int node, double cur) {
    if (cur >= b->best) return;
    if (node == b->N) {
        b->best = cur;
        return;
    }
    int first = 0;
    while (used >> first & 1) first++;
    for (int i = 0; i < b->nsub; i++) {
        uint64_t m = b->masks[i];
        if ((m & used) || !(m >> first & 1)) continue;
        bound_enum(b, used | m, node + 1, DSI_MAX(cur, b->vals[i]));
    }
}

int dsi_eplb_layer_lower_bound(const double *load, int E, int R, int G, int N, int P, double *out_mom) {
    if (!load || !out_mom) return dsi_error(DSI_EINVAL, "eplb: bad lower_bound arguments");
    /* shape errors are reported by the caller's check; guard the arithmetic */
    if (E <= 0 || R < E || G <= 0 || N <= 0 || P <= 0 || E % G || P % N || R % P)
        return dsi_error(DSI_EINVAL, "eplb: bad shape for lower_bound");
    double total = 0;
    for (int e = 0; e < E; e++) total += load[e];
    if (total <= 0) {
        *out_mom = 1.0;
        return DSI_OK;
    }
    int hier = G % N == 0 && N > 1, rc = DSI_OK;
    int32_t *cnt = malloc(sizeof(int32_t) * E);
    double *L = malloc(sizeof(double) * E);
    if (!cnt || !L) {
        free(cnt), free(L);
        return dsi_error(DSI_ENOMEM, "eplb: out of memory");
    }
    double lb;
    if (!hier) {
        lb = node_bound(load, E, R, P, R / P);
    } else {
        int gs = E / G, gpn = G / N, Sn = R / N, Q = P / N;
        bound_search b = {.G = G, .N = N, .gpn = gpn, .best = INFINITY};
        double nsub = exp(lgamma(G + 1.0) - lgamma(gpn + 1.0) - lgamma(G - gpn + 1.0));
        if (G < 64 && nsub <= 4096 && log_splits(G, gpn, N) <= 6.0) {
            int ns = (int)(nsub + 0.5);
            b.masks = malloc(sizeof(uint64_t) * ns);
            b.vals = malloc(sizeof(double) * ns);
            if (!b.masks || !b.vals) rc = dsi_error(DSI_ENOMEM, "eplb: out of memory");
            /* every subset of gpn groups, by Gosper's hack */
            for (uint64_t m = (1ull << gpn) - 1; rc == DSI_OK && b.nsub < ns && !(m >> G);) {
                int n = 0;
                for (int g = 0; g < G; g++)
                    if (m >> g & 1)
                        for (int j = 0; j < gs; j++) L[n++] = load[g * gs + j];
                b.masks[b.nsub] = m;
                b.vals[b.nsub++] = node_bound(L, n, Sn, Q, Sn / Q);
                uint64_t c = m & -m, r = m + c;
                m = (((r ^ m) >> 2) / c) | r;
            }
            if (rc == DSI_OK) bound_enum(&b, 0, 0, 0);
            lb = b.best;
            free(b.masks), free(b.vals);
        } else {
            /* Relaxation: the node holding group g holds at least g and the
             * lightest other groups, and g's experts get at most Sn - the
             * other groups' experts slots. */
            double *gl = malloc(sizeof(double) * G);
            lb = total / P;
            if (!gl) rc = dsi_error(DSI_ENOMEM, "eplb: out of memory");
            for (int g = 0; rc == DSI_OK && g < G; g++) {
                gl[g] = 0;
                for (int j = 0; j < gs; j++) gl[g] += load[g * gs + j];
            }
            for (int g = 0; rc == DSI_OK && g < G; g++) {
                double node = gl[g];
                /* add the gpn-1 lightest other groups */
                char *used = calloc(G, 1);
                if (!used) {
                    rc = dsi_error(DSI_ENOMEM, "eplb: out of memory");
                    break;
                }
                used[g] = 1;
                for (int t = 1; t < gpn; t++) {
                    int m = -1;
                    for (int h = 0; h < G; h++)
                        if (!used[h] && (m < 0 || gl[h] < gl[m])) m = h;
                    used[m] = 1, node += gl[m];
                }
                free(used);
                double v = node_bound(load + g * gs, gs, Sn - (gpn - 1) * gs, Q, 1);
                lb = DSI_MAX(lb, DSI_MAX(node / Q, v));
            }
            free(gl);
        }
    }
    free(cnt), free(L);
    if (rc != DSI_OK) return rc;
    *out_mom = lb / (total / P);
    return DSI_OK;
}
