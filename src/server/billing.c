/* Economics in the server: requests are quoted at admission (the price in
 * force then, whatever happens before they finish), billed at finish into the
 * live account, whose counters join /metrics; GET /v1/pricing shows the
 * current prices. Utilisation for load-based price bands comes from the
 * scheduler: the larger of running/max_num_seqs and KV blocks in use. */
#include "server/server_impl.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

/* docs/pricing.deepseek.json, embedded at build time (--pricing deepseek) */
extern const unsigned char dsi_default_pricing_json[];

static double wall_now(void) {
    struct timeval tv;
    gettimeofday(&tv, NULL);
    return tv.tv_sec + tv.tv_usec * 1e-6;
}

static double utilisation(dsi_server *s) {
    dsi_sched_stats st;
    dsi_sched_get_stats(s->sched, &st);
    return dsi_pricing_utilisation(st.n_running, s->o.max_num_seqs > 0 ? s->o.max_num_seqs : 64,
                                   st.kv_blocks_used, st.kv_blocks_total);
}

static void metrics_hook(void *ctx, void (*write)(void *w, const char *text, size_t len), void *w) {
    dsi_server *s = ctx;
    int n;
    char *t = dsi_account_metrics_text(s->account, wall_now(), &n);
    if (!t) DSI_LOG_WARN("metrics: economics left out: %s", dsi_last_error());
    else write(w, t, (size_t)n);
    free(t);
}

int dsi__billing_start(dsi_server *s) {
    if (!s->o.pricing_path) return DSI_OK;
    if (s->o.role == DSI_ROLE_PREFILL) {
        /* behind the router a request passes a prefill and a decode instance;
         * the decode instance reports its usage (cache hits included), so it bills */
        DSI_LOG_INFO("pricing: prefill instances do not bill; decode instances do, the router accounts GPUs");
        return DSI_OK;
    }
    int rc = !strcmp(s->o.pricing_path, "deepseek")
                 ? dsi_pricing_parse((const char *)dsi_default_pricing_json, "built-in DeepSeek pricing", &s->pricing)
                 : dsi_pricing_load(s->o.pricing_path, &s->pricing);
    if (rc) return rc;
    const char *want = s->o.pricing_model ? s->o.pricing_model : s->model_name;
    int idx = dsi_pricing_find_model(s->pricing, want);
    if (idx < 0 && s->o.pricing_model)
        return dsi_error(DSI_ENOTFOUND, "%s: no model '%s' (--pricing-model)", s->o.pricing_path, want);
    if (idx < 0) {
        idx = 0;
        DSI_LOG_WARN("pricing: '%s' is not in %s; billing at '%s' prices", want, s->o.pricing_path,
                     dsi_pricing_model_name(s->pricing, 0));
    }
    snprintf(s->pricing_model, sizeof s->pricing_model, "%s", dsi_pricing_model_name(s->pricing, idx));
    pthread_mutex_init(&s->pricing_mu, NULL);
    rc = dsi_account_create(s->pricing, s->o.account_journal, &s->account);
    if (rc) return rc;
    int gpus = s->o.account_gpus > 0 ? s->o.account_gpus : dsi_pricing_gpus_per_node(s->pricing);
    dsi_account_set_gpus(s->account, wall_now(), gpus);
    return dsi_server_add_metrics_hook(s, metrics_hook, s);
}

void dsi__billing_stop(dsi_server *s) {
    if (!s->pricing) return;
    if (s->account) {
        double now = wall_now();
        dsi_account_set_gpus(s->account, now, 0); /* the instance stops costing */
        dsi_account_checkpoint(s->account, now);
        dsi_account_destroy(s->account);
    }
    dsi_pricing_destroy(s->pricing);
    pthread_mutex_destroy(&s->pricing_mu);
    s->pricing = NULL;
    s->account = NULL;
}

void dsi__billing_quote(dsi_server *s, dsi_conn *c) {
    if (!s->pricing) return;
    double u = utilisation(s);
    pthread_mutex_lock(&s->pricing_mu);
    c->has_quote = dsi_pricing_current(s->pricing, s->pricing_model, wall_now(), u, &c->quote) == DSI_OK;
    pthread_mutex_unlock(&s->pricing_mu);
}

void dsi__billing_bill(dsi_server *s, dsi_conn *c, int prompt, int cached, int completion, double *usd) {
    *usd = 0;
    if (!s->account || !c->has_quote) return;
    dsi_account_bill(s->account, &c->quote, wall_now(), (uint64_t)cached, (uint64_t)(prompt - cached),
                     (uint64_t)completion, 1, usd);
}

int dsi__billing_pricing_json(dsi_server *s, dsi_sbuf *b) {
    if (!s->pricing) {
        dsi__api_error_json(b, 404, "no pricing configured (start the server with --pricing FILE)", NULL);
        return 404;
    }
    double u = utilisation(s);
    int n;
    pthread_mutex_lock(&s->pricing_mu);
    char *t = dsi_pricing_json_text(s->pricing, wall_now(), u, &n);
    pthread_mutex_unlock(&s->pricing_mu);
    if (!t) {
        dsi__api_error_json(b, 500, dsi_last_error(), NULL);
        return 500;
    }
    dsi__sbuf_put(b, t, (size_t)n);
    free(t);
    return 200;
}
