/* /metrics in the Prometheus text exposition format (0.0.4). */
#include "server/server_impl.h"

#include <string.h>

void dsi__histo_init(dsi_histo *h, const char *name, const char *help, const double *bounds, int n) {
    memset(h, 0, sizeof *h);
    h->name = name;
    h->help = help;
    h->n_bounds = n > DSI_HISTO_MAX_BUCKETS ? DSI_HISTO_MAX_BUCKETS : n;
    memcpy(h->bounds, bounds, sizeof(double) * h->n_bounds);
    pthread_mutex_init(&h->mu, NULL);
}

void dsi__histo_observe(dsi_histo *h, double v) {
    int i = 0;
    while (i < h->n_bounds && v > h->bounds[i]) i++;
    pthread_mutex_lock(&h->mu);
    h->counts[i]++;
    h->sum += v;
    h->count++;
    pthread_mutex_unlock(&h->mu);
}

void dsi__histo_write(dsi_histo *h, dsi_sbuf *o) {
    uint64_t counts[DSI_HISTO_MAX_BUCKETS + 1], count;
    double sum;
    pthread_mutex_lock(&h->mu);
    memcpy(counts, h->counts, sizeof counts);
    sum = h->sum;
    count = h->count;
    pthread_mutex_unlock(&h->mu);
    dsi__sbuf_printf(o, "# HELP %s %s\n# TYPE %s histogram\n", h->name, h->help, h->name);
    uint64_t acc = 0;
    for (int i = 0; i < h->n_bounds; i++) {
        acc += counts[i];
        dsi__sbuf_printf(o, "%s_bucket{le=\"%g\"} %llu\n", h->name, h->bounds[i], (unsigned long long)acc);
    }
    acc += counts[h->n_bounds];
    dsi__sbuf_printf(o, "%s_bucket{le=\"+Inf\"} %llu\n%s_sum %.9g\n%s_count %llu\n", h->name, (unsigned long long)acc,
                     h->name, sum, h->name, (unsigned long long)count);
}

static const double LATENCY_BOUNDS[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25,
                                        0.5,   0.75,   1.0,   2.5,  5.0,   10.0, 20.0,  40.0, 80.0};
static const double ITL_BOUNDS[] = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05,
                                    0.075,  0.1,   0.15,   0.2,   0.3,  0.5,   1.0,  2.5};

void dsi__metrics_init(dsi_server_metrics *m) {
    memset(m, 0, sizeof *m);
    dsi__histo_init(&m->ttft, "dsinfer_time_to_first_token_seconds",
                    "Time from request arrival to its first generated token.", LATENCY_BOUNDS,
                    sizeof LATENCY_BOUNDS / sizeof LATENCY_BOUNDS[0]);
    dsi__histo_init(&m->itl, "dsinfer_inter_token_latency_seconds", "Time between consecutive tokens of a request.",
                    ITL_BOUNDS, sizeof ITL_BOUNDS / sizeof ITL_BOUNDS[0]);
    dsi__histo_init(&m->e2e, "dsinfer_request_duration_seconds", "Time from request arrival to its last token.",
                    LATENCY_BOUNDS, sizeof LATENCY_BOUNDS / sizeof LATENCY_BOUNDS[0]);
}

void dsi__metrics_destroy(dsi_server_metrics *m) {
    pthread_mutex_destroy(&m->ttft.mu);
    pthread_mutex_destroy(&m->itl.mu);
    pthread_mutex_destroy(&m->e2e.mu);
}

static void counter(dsi_sbuf *o, const char *name, const char *help, unsigned long long v) {
    dsi__sbuf_printf(o, "# HELP %s %s\n# TYPE %s counter\n%s %llu\n", name, help, name, name, v);
}

static void gauge(dsi_sbuf *o, const char *name, const char *help, double v) {
    dsi__sbuf_printf(o, "# HELP %s %s\n# TYPE %s gauge\n%s %.17g\n", name, help, name, name, v);
}

static void hook_write(void *w, const char *text, size_t len) { dsi__sbuf_put(w, text, len); }

void dsi__metrics_render(dsi_server_metrics *m, const dsi_sched_stats *st, const char *model, dsi_sbuf *o) {
    static const char *OUT_NAMES[DSI_OUT_COUNT] = {"stop", "length", "cancelled", "client_error", "rejected",
                                                   "server_error"};
    dsi__sbuf_puts(o, "# HELP dsinfer_requests_total Requests by outcome (finish reason, or the error class).\n"
                      "# TYPE dsinfer_requests_total counter\n");
    for (int i = 0; i < DSI_OUT_COUNT; i++)
        dsi__sbuf_printf(o, "dsinfer_requests_total{outcome=\"%s\"} %lu\n", OUT_NAMES[i], atomic_load(&m->outcomes[i]));
    counter(o, "dsinfer_prompt_tokens_total", "Prompt tokens of finished requests.", atomic_load(&m->prompt_tokens));
    counter(o, "dsinfer_generation_tokens_total", "Generated tokens of finished requests.",
            atomic_load(&m->completion_tokens));
    counter(o, "dsinfer_prompt_cache_hit_tokens_total", "Prompt tokens served from the prefix cache.",
            atomic_load(&m->cache_hit_tokens));
    counter(o, "dsinfer_prompt_cache_disk_hit_tokens_total", "Prompt cache-hit tokens loaded from the disk KV tier.",
            (unsigned long long)st->disk_cached_tokens);
    counter(o, "dsinfer_computed_tokens_total", "Tokens run through the model (prefill and decode).",
            (unsigned long long)st->computed_tokens);
    counter(o, "dsinfer_scheduler_steps_total", "Engine steps run.", (unsigned long long)st->steps);
    counter(o, "dsinfer_preemptions_total", "Requests preempted for lack of KV blocks.",
            (unsigned long long)st->preemptions);
    gauge(o, "dsinfer_requests_waiting", "Requests queued for admission (queue depth).", st->n_waiting);
    gauge(o, "dsinfer_requests_running", "Requests in the running batch.", st->n_running);
    gauge(o, "dsinfer_requests_in_flight", "HTTP requests accepted and not yet finished.",
          atomic_load(&m->in_flight));
    gauge(o, "dsinfer_kv_blocks_capacity", "KV pool size in 64-token blocks.", st->kv_blocks_total);
    gauge(o, "dsinfer_kv_blocks_used", "KV blocks held by requests.", st->kv_blocks_used);
    gauge(o, "dsinfer_kv_blocks_free", "KV blocks on the free list.", st->kv_blocks_free);
    gauge(o, "dsinfer_kv_blocks_cached", "KV blocks in the prefix cache (in use or idle).", st->kv_blocks_cached);
    gauge(o, "dsinfer_kv_blocks_cached_idle", "Prefix-cached KV blocks no request uses (evictable).",
          st->kv_blocks_idle_cached);
    gauge(o, "dsinfer_max_model_len", "Context limit in tokens (prompt + completion).", st->max_model_len);
    dsi__sbuf_printf(o, "# HELP dsinfer_model_info The served model.\n# TYPE dsinfer_model_info gauge\n"
                        "dsinfer_model_info{model=");
    /* label values escape \ and " and newlines; the model name is ours but may come from a path */
    dsi__sbuf_put(o, "\"", 1);
    for (const char *p = model; *p; p++) {
        if (*p == '\\' || *p == '"') dsi__sbuf_put(o, "\\", 1);
        if (*p == '\n') { dsi__sbuf_puts(o, "\\n"); continue; }
        dsi__sbuf_put(o, p, 1);
    }
    dsi__sbuf_puts(o, "\"} 1\n");
    dsi__histo_write(&m->ttft, o);
    dsi__histo_write(&m->itl, o);
    dsi__histo_write(&m->e2e, o);
    for (int i = 0; i < m->n_hooks; i++) m->hooks[i](m->hook_ctx[i], hook_write, o);
}
