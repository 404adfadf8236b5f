/* Aligning a new placement with the current one, so that switching moves few
 * expert weights. A layer's busiest-GPU load does not change when whole nodes
 * are renumbered, when GPUs are renumbered within a node, or when a GPU's
 * slots are reordered; nor does the node of any group's experts stop being a
 * single node. So among those relabelings we pick, greedily, the one that
 * keeps the most replicas where their weights already are. */
#include <stdlib.h>
#include <string.h>

#include "dsinfer/eplb.h"

typedef struct {
    int score, a, b;
} pair_score;

static int cmp_pair(const void *x, const void *y) {
    const pair_score *p = x, *q = y;
    if (p->score != q->score) return q->score - p->score;
    if (p->a != q->a) return p->a - q->a;
    return p->b - q->b;
}

/* Experts in common between slot ranges (multiset intersection). */
static int common(const int32_t *x, int nx, const int32_t *y, int ny, char *used) {
    int c = 0;
    memset(used, 0, ny);
    for (int i = 0; i < nx; i++)
        for (int j = 0; j < ny; j++)
            if (!used[j] && y[j] == x[i]) {
                used[j] = 1, c++;
                break;
            }
    return c;
}

/* Greedy maximum-score matching of n new units to n old units of `width`
 * slots each: perm[new] = old. */
static int match_units(const int32_t *nw, const int32_t *old, int n, int width, int *perm, pair_score *ps,
                       char *used, char *taken_a, char *taken_b) {
    if (n <= 0) return 0;
    int m = 0;
    for (int a = 0; a < n; a++)
        for (int b = 0; b < n; b++)
            ps[m].a = a, ps[m].b = b, ps[m++].score = common(nw + a * width, width, old + b * width, width, used);
    qsort(ps, m, sizeof *ps, cmp_pair);
    for (int i = 0; i < n; i++) taken_a[i] = taken_b[i] = 0;
    int kept = 0;
    for (int i = 0; i < m; i++) {
        if (taken_a[ps[i].a] || taken_b[ps[i].b]) continue;
        taken_a[ps[i].a] = taken_b[ps[i].b] = 1;
        perm[ps[i].a] = ps[i].b;
        kept += ps[i].score;
    }
    return kept;
}

int dsi_eplb_align(const dsi_eplb_placement *cur, dsi_eplb_placement *next, int n_nodes, int *moved_slots) {
    if (!cur || !next || !cur->phy2log || !next->phy2log || cur->n_layers != next->n_layers ||
        cur->n_experts != next->n_experts || cur->n_slots != next->n_slots || cur->n_gpus != next->n_gpus)
        return dsi_error(DSI_EINVAL, "eplb: align needs two placements of the same shape");
    const int L = next->n_layers, R = next->n_slots, P = next->n_gpus, k = R / P;
    if (n_nodes <= 0 || P % n_nodes) return dsi_error(DSI_EINVAL, "eplb: align: %d gpus over %d nodes", P, n_nodes);
    const int N = n_nodes, Pn = P / N, Sn = R / N;
    int units = DSI_MAX(N, Pn), width = DSI_MAX(Sn, k);
    pair_score *ps = malloc(sizeof *ps * (size_t)units * units);
    int *perm = malloc(sizeof(int) * units);
    char *used = malloc(width), *ta = malloc(units), *tb = malloc(units);
    int32_t *row = malloc(sizeof(int32_t) * R), *gpu = malloc(sizeof(int32_t) * k);
    if (!ps || !perm || !used || !ta || !tb || !row || !gpu) {
        free(ps), free(perm), free(used), free(ta), free(tb), free(row), free(gpu);
        return dsi_error(DSI_ENOMEM, "eplb: out of memory");
    }
    int moved = 0;
    for (int l = 0; l < L; l++) {
        const int32_t *old = cur->phy2log + (size_t)l * R;
        int32_t *nw = next->phy2log + (size_t)l * R;
        /* nodes as blocks */
        if (N > 1) {
            match_units(nw, old, N, Sn, perm, ps, used, ta, tb);
            for (int a = 0; a < N; a++) memcpy(row + perm[a] * Sn, nw + a * Sn, sizeof(int32_t) * Sn);
            memcpy(nw, row, sizeof(int32_t) * R);
        }
        /* GPUs within each node */
        for (int node = 0; node < N; node++) {
            int32_t *nn = nw + node * Sn;
            match_units(nn, old + node * Sn, Pn, k, perm, ps, used, ta, tb);
            for (int a = 0; a < Pn; a++) memcpy(row + perm[a] * k, nn + a * k, sizeof(int32_t) * k);
            memcpy(nn, row, sizeof(int32_t) * Sn);
        }
        /* slots within each GPU: keep experts in the slot that already holds them */
        for (int g = 0; g < P; g++) {
            int32_t *ng = nw + g * k;
            const int32_t *og = old + g * k;
            memcpy(gpu, ng, sizeof(int32_t) * k);
            memset(used, 0, k);
            for (int j = 0; j < k; j++) ng[j] = -1;
            for (int j = 0; j < k; j++)
                for (int i = 0; i < k; i++)
                    if (!used[i] && gpu[i] == og[j]) {
                        ng[j] = gpu[i], used[i] = 1;
                        break;
                    }
            for (int i = 0, j = 0; i < k; i++) {
                if (used[i]) continue;
                while (ng[j] != -1) j++;
                ng[j] = gpu[i];
            }
            for (int j = 0; j < k; j++) moved += ng[j] != og[j];
        }
    }
    free(ps), free(perm), free(used), free(ta), free(tb), free(row), free(gpu);
    /* the index follows the new slot numbers */
    free(next->logcnt), free(next->log2phy);
    next->logcnt = NULL, next->log2phy = NULL;
    int rc = dsi_eplb_placement_index(next);
    if (rc == DSI_OK && moved_slots) *moved_slots = moved;
    return rc;
}
