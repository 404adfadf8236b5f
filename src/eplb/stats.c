/* Online load statistics: a ring of W per-step count buckets plus their
 * running sum, so that a snapshot costs L*E and sliding the window costs one
 * bucket. Counts are 64-bit integers: exact at any realistic traffic. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "dsinfer/eplb.h"
#include "eplb/eplb_impl.h"

struct dsi_eplb_stats {
    int L, E, W;
    int cur;        /* bucket of the open step */
    int64_t steps;  /* steps closed */
    uint64_t *bucket; /* [W][L][E] */
    uint64_t *sum;    /* [L][E] over all buckets */
};

dsi_eplb_stats *dsi_eplb_stats_create(int L, int E, int W) {
    if (L <= 0 || E <= 0 || W <= 0 || (size_t)L * E > ((size_t)1 << 40) / W) {
        dsi_error(DSI_EINVAL, "eplb: stats need positive layers (%d), experts (%d) and window (%d)", L, E, W);
        return NULL;
    }
    dsi_eplb_stats *s = calloc(1, sizeof *s);
    if (s) {
        s->bucket = calloc((size_t)W * L * E, sizeof(uint64_t));
        s->sum = calloc((size_t)L * E, sizeof(uint64_t));
    }
    if (!s || !s->bucket || !s->sum) {
        dsi_eplb_stats_destroy(s);
        dsi_error(DSI_ENOMEM, "eplb: out of memory for stats");
        return NULL;
    }
    s->L = L, s->E = E, s->W = W;
    return s;
}

void dsi_eplb_stats_destroy(dsi_eplb_stats *s) {
    if (!s) return;
    free(s->bucket);
    free(s->sum);
    free(s);
}

int dsi_eplb_stats_record(dsi_eplb_stats *s, int layer, const int32_t *ids, size_t n) {
    if (!s || (n && !ids)) return dsi_error(DSI_EINVAL, "eplb: bad stats_record arguments");
    if (layer < 0 || layer >= s->L) return dsi_error(DSI_ERANGE, "eplb: layer %d outside [0,%d)", layer, s->L);
    for (size_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= s->E)
            return dsi_error(DSI_ERANGE, "eplb: expert id %d at %zu outside [0,%d)", ids[i], i, s->E);
    uint64_t *b = s->bucket + ((size_t)s->cur * s->L + layer) * s->E, *sum = s->sum + (size_t)layer * s->E;
    for (size_t i = 0; i < n; i++) b[ids[i]]++, sum[ids[i]]++;
    return DSI_OK;
}

void dsi_eplb_stats_step(dsi_eplb_stats *s) {
    if (!s) return;
    s->steps++;
    s->cur = (s->cur + 1) % s->W;
    /* The bucket we move into holds the step that now leaves the window. */
    uint64_t *b = s->bucket + (size_t)s->cur * s->L * s->E;
    for (size_t i = 0; i < (size_t)s->L * s->E; i++) s->sum[i] -= b[i], b[i] = 0;
}

int64_t dsi_eplb_stats_steps(const dsi_eplb_stats *s) { return s ? s->steps : 0; }

void dsi_eplb_stats_snapshot(const dsi_eplb_stats *s, double *out) {
    if (!s || !out) return;
    for (size_t i = 0; i < (size_t)s->L * s->E; i++) out[i] = (double)s->sum[i];
}

int dsi_eplb_should_rebalance(const double *load, const dsi_eplb_placement *cur, const dsi_eplb_config *cfg,
                              double threshold, dsi_eplb_decision *dec, dsi_eplb_placement *proposal) {
    if (!load || !cur || !cfg || !dec || !cur->phy2log)
        return dsi_error(DSI_EINVAL, "eplb: bad should_rebalance arguments");
    if (proposal) memset(proposal, 0, sizeof *proposal);
    if (cur->n_slots != cfg->n_slots || cur->n_gpus != cfg->n_gpus)
        return dsi_error(DSI_EINVAL, "eplb: current placement (%d slots, %d gpus) does not match the config (%d, %d)",
                         cur->n_slots, cur->n_gpus, cfg->n_slots, cfg->n_gpus);
    const int L = cur->n_layers, E = cur->n_experts, R = cur->n_slots, P = cur->n_gpus;
    dsi_eplb_placement next = {0};
    int rc = dsi_eplb_rebalance(load, L, E, R, cfg->n_groups, cfg->n_nodes, P, cfg->policy, &next);
    if (rc == DSI_OK) {
        int hier = cfg->n_groups % cfg->n_nodes == 0;
        rc = dsi_eplb_align(cur, &next, hier ? cfg->n_nodes : 1, &dec->moved_slots);
        if (rc != DSI_OK) dsi_eplb_placement_free(&next);
    }
    if (rc != DSI_OK) return rc;
    double before = 0, after = 0;
    for (int l = 0; l < L && rc == DSI_OK; l++) {
        const double *ld = load + (size_t)l * E;
        double mb, ma;
        rc = dsi_eplb_layer_max_over_mean(cur->phy2log + (size_t)l * R, ld, E, R, P, &mb);
        if (rc == DSI_OK) rc = dsi_eplb_layer_max_over_mean(next.phy2log + (size_t)l * R, ld, E, R, P, &ma);
        if (rc != DSI_OK) break;
        if (dec->mom_before) dec->mom_before[l] = mb;
        if (dec->mom_after) dec->mom_after[l] = ma;
        before += dsi__eplb_layer_max_load(cur->phy2log + (size_t)l * R, ld, E, R, P);
        after += dsi__eplb_layer_max_load(next.phy2log + (size_t)l * R, ld, E, R, P);
    }
    if (rc != DSI_OK) {
        dsi_eplb_placement_free(&next);
        return dsi_error_prefix(rc, "current placement");
    }
    dec->gain = before > 0 ? 1.0 - after / before : 0.0;
    dec->rebalance = before > 0 && dec->gain >= threshold;
    if (proposal) *proposal = next;
    else dsi_eplb_placement_free(&next);
    return DSI_OK;
}

int dsi_eplb_stats_should_rebalance(const dsi_eplb_stats *s, const dsi_eplb_placement *cur,
                                    const dsi_eplb_config *cfg, double threshold, dsi_eplb_decision *dec,
                                    dsi_eplb_placement *proposal) {
    if (!s || !cur || cur->n_layers != s->L || cur->n_experts != s->E)
        return dsi_error(DSI_EINVAL, "eplb: stats and placement shapes differ");
    double *load = malloc(sizeof(double) * (size_t)s->L * s->E);
    if (!load) return dsi_error(DSI_ENOMEM, "eplb: out of memory");
    dsi_eplb_stats_snapshot(s, load);
    int rc = dsi_eplb_should_rebalance(load, cur, cfg, threshold, dec, proposal);
    free(load);
    return rc;
}
