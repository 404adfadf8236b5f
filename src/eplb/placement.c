/* Placement bookkeeping: shape checks, the policy dispatch, max_over_mean,
 * validation and the log2phy index. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "dsinfer/eplb.h"
#include "eplb/eplb_impl.h"

void dsi_eplb_placement_free(dsi_eplb_placement *pl) {
    if (!pl) return;
    free(pl->phy2log);
    free(pl->log2phy);
    free(pl->logcnt);
    memset(pl, 0, sizeof *pl);
}

int dsi_eplb_check_shape(int E, int R, int G, int N, int P) {
    if (E <= 0 || R <= 0 || G <= 0 || N <= 0 || P <= 0)
        return dsi_error(DSI_EINVAL, "eplb: experts (%d), slots (%d), groups (%d), nodes (%d) and gpus (%d) must be positive",
                         E, R, G, N, P);
    if (E % G) return dsi_error(DSI_EINVAL, "eplb: %d experts do not divide into %d groups", E, G);
    if (P % N) return dsi_error(DSI_EINVAL, "eplb: %d gpus do not divide over %d nodes", P, N);
    if (R % P) return dsi_error(DSI_EINVAL, "eplb: %d slots do not divide over %d gpus", R, P);
    if (R < E) return dsi_error(DSI_EINVAL, "eplb: %d slots cannot hold %d experts", R, E);
    return DSI_OK;
}

double dsi__eplb_layer_max_load(const int32_t *phy2log, const double *load, int E, int R, int P) {
    /* Callers guarantee phy2log is in range and covers every expert. */
    int cnt_small[1024], *cnt = E <= 1024 ? cnt_small : calloc(E, sizeof(int));
    if (!cnt) return INFINITY;
    if (cnt == cnt_small) memset(cnt, 0, sizeof(int) * E);
    for (int s = 0; s < R; s++) cnt[phy2log[s]]++;
    int k = R / P;
    double mx = 0.0;
    for (int g = 0; g < P; g++) {
        double sum = 0.0;
        for (int j = 0; j < k; j++) {
            int e = phy2log[g * k + j];
            sum += load[e] / cnt[e];
        }
        if (sum > mx) mx = sum;
    }
    if (cnt != cnt_small) free(cnt);
    return mx;
}

int dsi_eplb_layer_max_over_mean(const int32_t *phy2log, const double *load, int E, int R, int P,
                                 double *out_mom) {
    if (!phy2log || !load || !out_mom || E <= 0 || R <= 0 || P <= 0 || R % P)
        return dsi_error(DSI_EINVAL, "eplb: bad max_over_mean arguments");
    char *seen = calloc(E, 1);
    if (!seen) return dsi_error(DSI_ENOMEM, "eplb: out of memory");
    for (int s = 0; s < R; s++) {
        if (phy2log[s] < 0 || phy2log[s] >= E) {
            free(seen);
            return dsi_error(DSI_ERANGE, "eplb: slot %d holds expert %d, outside [0,%d)", s, phy2log[s], E);
        }
        seen[phy2log[s]] = 1;
    }
    double total = 0.0;
    for (int e = 0; e < E; e++) {
        if (!seen[e] && load[e] > 0) {
            free(seen);
            return dsi_error(DSI_EINVAL, "eplb: expert %d has load but no replica", e);
        }
        total += load[e];
    }
    free(seen);
    /* An expert without replicas and without load contributes nothing. */
    if (total <= 0) {
        *out_mom = 1.0;
        return DSI_OK;
    }
    *out_mom = dsi__eplb_layer_max_load(phy2log, load, E, R, P) / (total / P);
    return DSI_OK;
}

int dsi_eplb_max_over_mean(const dsi_eplb_placement *pl, const double *load, double *out) {
    if (!pl || !pl->phy2log || !load || !out) return dsi_error(DSI_EINVAL, "eplb: bad max_over_mean arguments");
    for (int l = 0; l < pl->n_layers; l++) {
        int rc = dsi_eplb_layer_max_over_mean(pl->phy2log + (size_t)l * pl->n_slots,
                                              load + (size_t)l * pl->n_experts, pl->n_experts, pl->n_slots,
                                              pl->n_gpus, &out[l]);
        if (rc != DSI_OK) return dsi_error_prefix(rc, "layer %d", l);
    }
    return DSI_OK;
}

/* Builds logcnt and log2phy from phy2log. With `rank` (DeepSeek's replica
 * ranks, [L][R]) entry j of log2phy is the slot of replica j; without it,
 * replicas are listed in slot order. */
static int build_index(dsi_eplb_placement *pl, const int32_t *rank) {
    const int L = pl->n_layers, E = pl->n_experts, R = pl->n_slots;
    pl->logcnt = calloc((size_t)L * E, sizeof(int32_t));
    if (!pl->logcnt) return dsi_error(DSI_ENOMEM, "eplb: out of memory");
    int k = 1;
    for (int l = 0; l < L; l++) {
        const int32_t *p2l = pl->phy2log + (size_t)l * R;
        int32_t *cnt = pl->logcnt + (size_t)l * E;
        for (int s = 0; s < R; s++) {
            if (p2l[s] < 0 || p2l[s] >= E)
                return dsi_error(DSI_EFORMAT, "eplb: layer %d slot %d holds expert %d, outside [0,%d)", l, s, p2l[s], E);
            if (++cnt[p2l[s]] > k) k = cnt[p2l[s]];
        }
    }
    pl->max_replicas = k;
    pl->log2phy = malloc(sizeof(int32_t) * (size_t)L * E * k);
    if (!pl->log2phy) return dsi_error(DSI_ENOMEM, "eplb: out of memory");
    for (size_t i = 0; i < (size_t)L * E * k; i++) pl->log2phy[i] = -1;
    int32_t *fill = calloc(E, sizeof(int32_t));
    if (!fill) return dsi_error(DSI_ENOMEM, "eplb: out of memory");
    for (int l = 0; l < L; l++) {
        const int32_t *p2l = pl->phy2log + (size_t)l * R;
        int32_t *l2p = pl->log2phy + (size_t)l * E * k;
        memset(fill, 0, sizeof(int32_t) * E);
        for (int s = 0; s < R; s++) {
            int e = p2l[s];
            int j = rank ? rank[(size_t)l * R + s] : fill[e]++;
            if (j < 0 || j >= k || l2p[(size_t)e * k + j] != -1) {
                free(fill);
                return dsi_error(DSI_EINTERNAL, "eplb: layer %d: replica rank %d of expert %d repeated", l, j, e);
            }
            l2p[(size_t)e * k + j] = s;
        }
    }
    free(fill);
    return DSI_OK;
}

int dsi_eplb_placement_index(dsi_eplb_placement *pl) {
    if (!pl || !pl->phy2log || pl->logcnt || pl->log2phy)
        return dsi_error(DSI_EINVAL, "eplb: index needs phy2log and no existing index");
    int rc = build_index(pl, NULL);
    if (rc != DSI_OK) {
        free(pl->logcnt), free(pl->log2phy);
        pl->logcnt = NULL, pl->log2phy = NULL;
    }
    return rc;
}

int dsi_eplb_rebalance(const double *load, int L, int E, int R, int G, int N, int P,
                       dsi_eplb_policy policy, dsi_eplb_placement *out) {
    if (!load || !out || L <= 0) return dsi_error(DSI_EINVAL, "eplb: need a load matrix with at least one layer");
    memset(out, 0, sizeof *out);
    int rc = dsi_eplb_check_shape(E, R, G, N, P);
    if (rc != DSI_OK) return rc;
    if (policy != DSI_EPLB_DEEPSEEK && policy != DSI_EPLB_BEST)
        return dsi_error(DSI_EINVAL, "eplb: unknown policy %d", (int)policy);
    for (size_t i = 0; i < (size_t)L * E; i++)
        if (!isfinite(load[i]) || load[i] < 0)
            return dsi_error(DSI_EINVAL, "eplb: load[%zu][%zu] = %g: loads must be finite and >= 0", i / E, i % E,
                             load[i]);
    if (policy == DSI_EPLB_BEST) {
        int hier = G % N == 0, e_node = hier ? E / N : E;
        if (R / P > e_node)
            return dsi_error(DSI_EINVAL,
                             "eplb: policy best cannot fill %d slots per gpu with distinct experts (%d experts per %s); "
                             "use policy deepseek",
                             R / P, e_node, hier ? "node" : "layer");
    }
    int32_t *p2l = malloc(sizeof(int32_t) * (size_t)L * R), *rank = malloc(sizeof(int32_t) * (size_t)L * R);
    int32_t *seed = policy == DSI_EPLB_BEST ? malloc(sizeof(int32_t) * R) : NULL;
    if (!p2l || !rank || (policy == DSI_EPLB_BEST && !seed)) {
        rc = dsi_error(DSI_ENOMEM, "eplb: out of memory");
        goto fail;
    }
    for (int l = 0; l < L && rc == DSI_OK; l++) {
        const double *ld = load + (size_t)l * E;
        int32_t *row = p2l + (size_t)l * R, *rrow = rank + (size_t)l * R;
        rc = dsi__eplb_deepseek_layer(ld, E, R, G, N, P, row, rrow);
        if (rc == DSI_OK && policy == DSI_EPLB_BEST) {
            memcpy(seed, row, sizeof(int32_t) * R);
            rc = dsi__eplb_best_layer(ld, E, R, G, N, P, seed, row);
        }
        if (rc != DSI_OK) dsi_error_prefix(rc, "layer %d", l);
    }
    if (rc != DSI_OK) goto fail;
    out->n_layers = L, out->n_experts = E, out->n_slots = R, out->n_gpus = P;
    out->phy2log = p2l;
    p2l = NULL;
    rc = build_index(out, policy == DSI_EPLB_DEEPSEEK ? rank : NULL);
    if (rc != DSI_OK) dsi_eplb_placement_free(out);
fail:
    free(p2l), free(rank), free(seed);
    return rc;
}

int dsi_eplb_placement_validate(const dsi_eplb_placement *pl, int G, int N, int no_dup) {
    if (!pl || !pl->phy2log || !pl->logcnt || !pl->log2phy)
        return dsi_error(DSI_EINVAL, "eplb: validate needs a complete placement");
    const int L = pl->n_layers, E = pl->n_experts, R = pl->n_slots, P = pl->n_gpus, K = pl->max_replicas;
    if (L <= 0 || E <= 0 || R < E || P <= 0 || R % P || K <= 0)
        return dsi_error(DSI_EFORMAT, "eplb: placement shape L=%d E=%d R=%d P=%d k=%d is inconsistent", L, E, R, P, K);
    int hier = N > 0 && G > 0 && G % N == 0 && E % G == 0 && P % N == 0;
    int k = R / P;
    int32_t *cnt = malloc(sizeof(int32_t) * E);
    if (!cnt) return dsi_error(DSI_ENOMEM, "eplb: out of memory");
    int rc = DSI_OK;
    for (int l = 0; l < L && rc == DSI_OK; l++) {
        const int32_t *p2l = pl->phy2log + (size_t)l * R, *lc = pl->logcnt + (size_t)l * E;
        const int32_t *l2p = pl->log2phy + (size_t)l * E * K;
        memset(cnt, 0, sizeof(int32_t) * E);
        for (int s = 0; s < R; s++) {
            if (p2l[s] < 0 || p2l[s] >= E) {
                rc = dsi_error(DSI_EFORMAT, "eplb: layer %d slot %d holds expert %d, outside [0,%d)", l, s, p2l[s], E);
                break;
            }
            cnt[p2l[s]]++;
        }
        for (int e = 0; e < E && rc == DSI_OK; e++) {
            if (cnt[e] < 1) rc = dsi_error(DSI_EFORMAT, "eplb: layer %d expert %d has no replica", l, e);
            else if (lc[e] != cnt[e])
                rc = dsi_error(DSI_EFORMAT, "eplb: layer %d expert %d: logcnt %d but %d replicas in phy2log", l, e,
                               lc[e], cnt[e]);
            for (int j = 0; j < K && rc == DSI_OK; j++) {
                int s = l2p[(size_t)e * K + j];
                if (j < cnt[e] ? (s < 0 || s >= R || p2l[s] != e) : s != -1)
                    rc = dsi_error(DSI_EFORMAT, "eplb: layer %d expert %d: log2phy entry %d (%d) disagrees with phy2log",
                                   l, e, j, s);
                for (int i = 0; i < j && j < cnt[e] && rc == DSI_OK; i++)
                    if (l2p[(size_t)e * K + i] == s)
                        rc = dsi_error(DSI_EFORMAT, "eplb: layer %d expert %d: log2phy repeats slot %d", l, e, s);
            }
        }
        for (int g = 0; g < P && rc == DSI_OK && no_dup; g++)
            for (int a = 0; a < k && rc == DSI_OK; a++)
                for (int b = a + 1; b < k; b++)
                    if (p2l[g * k + a] == p2l[g * k + b]) {
                        rc = dsi_error(DSI_EFORMAT, "eplb: layer %d gpu %d holds expert %d twice", l, g, p2l[g * k + a]);
                        break;
                    }
        if (hier && rc == DSI_OK) {
            /* Every expert of a group must live in one node, the same for the whole group. */
            int gs = E / G, Sn = R / N;
            int32_t *gnode = cnt; /* reuse: node of each group, -1 unknown */
            for (int g = 0; g < G; g++) gnode[g] = -1;
            for (int s = 0; s < R && rc == DSI_OK; s++) {
                int grp = p2l[s] / gs, node = s / Sn;
                if (gnode[grp] < 0) gnode[grp] = node;
                else if (gnode[grp] != node)
                    rc = dsi_error(DSI_EFORMAT, "eplb: layer %d: group %d has replicas on nodes %d and %d", l, grp,
                                   gnode[grp], node);
            }
        }
    }
    free(cnt);
    return rc;
}
