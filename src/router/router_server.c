/* The router's HTTP side (libmicrohttpd, suspend/resume as dsinfer serve),
 * the heartbeat thread (health, drains, autoscaler, GPU account), the admin
 * endpoint and /metrics. */
#include "router/router_impl.h"

#include "dsinfer/pd.h"

#include <cjson/cJSON.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

/* A price list for the GPU account when no --pricing file is given: DeepSeek's
 * $2 per GPU-hour, R1's token prices for the served model. */
static const char DEFAULT_PRICING[] =
    "{\"version\":1,\"currency\":\"USD\",\"gpu\":{\"type\":\"H800\",\"cost_per_hour\":2.0,\"per_node\":8},"
    "\"models\":{\"dsinfer-demo\":{\"input_cache_hit\":0.14,\"input_cache_miss\":0.55,\"output\":2.19}}}";

dsi_router_opts dsi_router_default_opts(void) {
    dsi_router_opts o = {0};
    o.host = "127.0.0.1";
    o.port = 8000;
    return o;
}

/* ---------------------------------------------------------------- responses */

static enum MHD_Result send_text(struct MHD_Connection *mc, int status, const char *type, const char *body, size_t n) {
    struct MHD_Response *resp = MHD_create_response_from_buffer(n, (void *)body, MHD_RESPMEM_MUST_COPY);
    if (!resp) return MHD_NO;
    MHD_add_response_header(resp, "Content-Type", type);
    enum MHD_Result ok = MHD_queue_response(mc, status, resp);
    MHD_destroy_response(resp);
    return ok;
}

/* msg is escaped: admin errors quote what the request sent. */
static enum MHD_Result send_json_error(struct MHD_Connection *mc, int status, const char *msg) {
    dsi_rbuf b = {0};
    dsi__rbuf_put(&b, "{\"error\":{\"message\":\"", 21);
    for (const char *p = msg; *p && b.len < 600; p++) {
        unsigned char ch = (unsigned char)*p;
        if (ch == '"' || ch == '\\') dsi__rbuf_put(&b, "\\", 1);
        dsi__rbuf_put(&b, ch < 0x20 ? " " : p, 1);
    }
    dsi__rbuf_printf(&b, "\",\"type\":\"%s\",\"param\":null,\"code\":null}}",
                     status >= 500 ? "server_error" : "invalid_request_error");
    enum MHD_Result ok = send_text(mc, status, "application/json", b.p ? b.p : "", b.len);
    dsi__rbuf_free(&b);
    return ok;
}

static ssize_t stream_reader(void *cls, uint64_t pos, char *buf, size_t max) {
    rconn *c = cls;
    pthread_mutex_lock(&c->mu);
    size_t avail = c->out.len - c->out_pos;
    ssize_t n = 0;
    if (avail > 0) {
        n = (ssize_t)DSI_MIN(avail, max);
        memcpy(buf, c->out.p + c->out_pos, n);
        c->out_pos += n;
        if (c->out_pos == c->out.len) { c->out_pos = 0; c->out.len = 0; }
    } else if (c->finished) {
        n = MHD_CONTENT_READER_END_OF_STREAM;
    } else {
        c->suspended = 1;
        MHD_suspend_connection(c->mc);
    }
    pthread_mutex_unlock(&c->mu);
    return n;
}

static void stream_free(void *cls) { dsi__rconn_unref(cls); }

/* Called when the worker has decided the status (or again after a resume). */
static enum MHD_Result respond(rconn *c) {
    pthread_mutex_lock(&c->mu);
    if (!c->head_ready || (!c->stream && !c->finished)) {
        c->suspended = 1;
        MHD_suspend_connection(c->mc);
        pthread_mutex_unlock(&c->mu);
        return MHD_YES;
    }
    int stream = c->stream, status = c->status;
    pthread_mutex_unlock(&c->mu);
    if (!stream) return send_text(c->mc, status, "application/json", c->out.p ? c->out.p : "", c->out.len);
    atomic_fetch_add(&c->refs, 1);
    struct MHD_Response *resp = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16384, stream_reader, c, stream_free);
    if (!resp) { dsi__rconn_unref(c); return MHD_NO; }
    MHD_add_response_header(resp, "Content-Type", "text/event-stream");
    MHD_add_response_header(resp, "Cache-Control", "no-cache");
    enum MHD_Result ok = MHD_queue_response(c->mc, status, resp);
    MHD_destroy_response(resp);
    return ok;
}

/* ---------------------------------------------------------------- admin, metrics */

static const char *role_str(int role) { return role == ROLE_P ? "prefill" : "decode"; }

static void instances_json(dsi_router *r, dsi_rbuf *b) {
    dsi__rbuf_put(b, "{\"instances\":[", 14);
    int first = 1;
    pthread_mutex_lock(&r->mu);
    for (int i = 0; i < r->n_in; i++) {
        inst *x = &r->in[i];
        if (!x->used || x->left) continue;
        dsi__rbuf_printf(b,
                         "%s{\"url\":\"%s\",\"role\":\"%s\",\"member\":%s,\"state\":\"%s\",\"draining\":%s,"
                         "\"routable\":%s,\"running\":%d,\"waiting\":%d,\"kv_tokens\":%lld,\"inflight\":%d,"
                         "\"pending_attn\":%.0f,\"routed\":%llu}",
                         first ? "" : ",", x->url, role_str(x->role), x->member ? "true" : "false",
                         dsi_inst_state_name(x->h.state),
                         x->admin_drain || x->scale_drain || x->reported_draining ? "true" : "false",
                         dsi__router_routable(x) ? "true" : "false", x->running, x->waiting, x->kv_tokens, x->inflight,
                         x->pend_attn, x->routed);
        first = 0;
    }
    pthread_mutex_unlock(&r->mu);
    dsi__rbuf_put(b, "]}", 2);
}

/* POST /admin/instances {"action":"join|leave|drain|undrain|standby","role":"prefill|decode","url":"http://h:p"} */
static enum MHD_Result handle_admin(dsi_router *r, rconn *c) {
    cJSON *j = cJSON_ParseWithLength(c->body ? c->body : "", c->body_len);
    const cJSON *a = cJSON_GetObjectItemCaseSensitive(j, "action"), *ro = cJSON_GetObjectItemCaseSensitive(j, "role"),
                *u = cJSON_GetObjectItemCaseSensitive(j, "url");
    if (!cJSON_IsString(a) || !cJSON_IsString(ro) || !cJSON_IsString(u) ||
        (strcmp(ro->valuestring, "prefill") && strcmp(ro->valuestring, "decode"))) {
        cJSON_Delete(j);
        return send_json_error(c->mc, 400, "expected {\"action\",\"role\":\"prefill|decode\",\"url\"}");
    }
    int role = !strcmp(ro->valuestring, "prefill") ? ROLE_P : ROLE_D, status = 200;
    const char *act = a->valuestring;
    char msg[256] = "";
    pthread_mutex_lock(&r->mu);
    int i = dsi__router_find_inst(r, u->valuestring, role);
    if (!strcmp(act, "join") || !strcmp(act, "standby")) {
        int member = !strcmp(act, "join");
        if (i < 0) i = dsi__router_add_inst(r, u->valuestring, role, member);
        if (i < 0) { status = 400; snprintf(msg, sizeof msg, "%s", dsi_last_error()); }
        else { r->in[i].member = member; r->in[i].admin_drain = 0; r->in[i].scale_drain = 0; }
    } else if (i < 0) {
        status = 404;
        snprintf(msg, sizeof msg, "no such instance");
    } else if (!strcmp(act, "leave")) r->in[i].left = 1, r->in[i].member = 0;
    else if (!strcmp(act, "drain")) r->in[i].admin_drain = 1;
    else if (!strcmp(act, "undrain")) r->in[i].admin_drain = 0;
    else { status = 400; snprintf(msg, sizeof msg, "unknown action"); }
    dsi__router_record_gpus(r);
    pthread_mutex_unlock(&r->mu);
    cJSON_Delete(j);
    if (status != 200) return send_json_error(c->mc, status, msg);
    dsi_rbuf b = {0};
    instances_json(r, &b);
    enum MHD_Result ok = send_text(c->mc, 200, "application/json", b.p ? b.p : "", b.len);
    dsi__rbuf_free(&b);
    return ok;
}

static void metrics(dsi_router *r, dsi_rbuf *b) {
    dsi__rbuf_printf(b, "# HELP dsinfer_router_requests_total Requests through the router by outcome.\n"
                        "# TYPE dsinfer_router_requests_total counter\n");
    dsi__rbuf_printf(b, "dsinfer_router_requests_total{outcome=\"ok\"} %lu\n", atomic_load(&r->n_ok));
    dsi__rbuf_printf(b, "dsinfer_router_requests_total{outcome=\"client_error\"} %lu\n", atomic_load(&r->n_client_err));
    dsi__rbuf_printf(b, "dsinfer_router_requests_total{outcome=\"error\"} %lu\n", atomic_load(&r->n_err));
    dsi__rbuf_printf(b, "dsinfer_router_requests_total{outcome=\"decode_lost\"} %lu\n", atomic_load(&r->n_decode_lost));
    dsi__rbuf_printf(b, "# HELP dsinfer_router_prefill_retries_total Prefills retried on another instance.\n"
                        "# TYPE dsinfer_router_prefill_retries_total counter\ndsinfer_router_prefill_retries_total %lu\n",
                     atomic_load(&r->n_retries));
    dsi__rbuf_printf(b, "# HELP dsinfer_router_kv_transfer_bytes_total KV bytes prefill instances sent to decode ones.\n"
                        "# TYPE dsinfer_router_kv_transfer_bytes_total counter\ndsinfer_router_kv_transfer_bytes_total %lu\n",
                     atomic_load(&r->kv_bytes));
    dsi__rbuf_printf(b, "# HELP dsinfer_router_kv_blocks_total Prompt KV blocks of prefilled requests.\n"
                        "# TYPE dsinfer_router_kv_blocks_total counter\ndsinfer_router_kv_blocks_total %lu\n",
                     atomic_load(&r->kv_blocks));
    dsi__rbuf_printf(b, "# HELP dsinfer_router_kv_blocks_skipped_total Blocks not sent: the decode side or the disk tier held them.\n"
                        "# TYPE dsinfer_router_kv_blocks_skipped_total counter\ndsinfer_router_kv_blocks_skipped_total %lu\n",
                     atomic_load(&r->kv_skipped));
    dsi__rbuf_printf(b, "# HELP dsinfer_router_requests_in_flight Requests being served.\n"
                        "# TYPE dsinfer_router_requests_in_flight gauge\ndsinfer_router_requests_in_flight %lu\n",
                     atomic_load(&r->n_inflight));
    static const char *G[][2] = {
        {"dsinfer_router_instance_routable", "1 when the instance takes new requests."},
        {"dsinfer_router_instance_member", "1 when the instance is in the pool (not standby)."},
        {"dsinfer_router_instance_pending_attention", "Core-attention work sent and not finished (token pairs)."},
        {"dsinfer_router_instance_kv_tokens", "KV tokens the instance reported holding."},
        {"dsinfer_router_instance_in_flight", "Requests the router has on the instance (decode)."},
        {"dsinfer_router_instance_routed_total", "Requests routed to the instance."},
    };
    pthread_mutex_lock(&r->mu);
    for (size_t g = 0; g < sizeof G / sizeof G[0]; g++) {
        dsi__rbuf_printf(b, "# HELP %s %s\n# TYPE %s %s\n", G[g][0], G[g][1], G[g][0], g == 5 ? "counter" : "gauge");
        for (int i = 0; i < r->n_in; i++) {
            inst *x = &r->in[i];
            if (!x->used || x->left) continue;
            double v = g == 0 ? dsi__router_routable(x) : g == 1 ? x->member : g == 2 ? x->pend_attn
                     : g == 3 ? (double)x->kv_tokens : g == 4 ? x->inflight : (double)x->routed;
            dsi__rbuf_printf(b, "%s{role=\"%s\",instance=\"%s\"} %.17g\n", G[g][0], role_str(x->role), x->url, v);
        }
    }
    pthread_mutex_unlock(&r->mu);
    if (r->acct) {
        int n;
        char *t = dsi_account_metrics_text(r->acct, dsi__router_wall_now(), &n);
        if (t) dsi__rbuf_put(b, t, n);
        free(t);
    }
}

/* ---------------------------------------------------------------- HTTP */

/* With --api-key, clients present it on /v1/ paths (as to a single server)
 * and operators on /admin/ ones (which add and remove instances); /health and
 * /metrics stay open for probes and scrapers, as on the instances. */
#define UNAUTHORISED                                                                                       \
    "{\"error\":{\"message\":\"missing or wrong API key (Authorization: Bearer ...)\",\"type\":"           \
    "\"invalid_request_error\",\"param\":null,\"code\":null}}"
static int authorised(const dsi_router *r, struct MHD_Connection *mc) {
    if (!r->o.api_key || !*r->o.api_key) return 1;
    const char *h = MHD_lookup_connection_value(mc, MHD_HEADER_KIND, "Authorization");
    return h && !strncmp(h, "Bearer ", 7) && !strcmp(h + 7, r->o.api_key);
}

static enum MHD_Result handler(void *cls, struct MHD_Connection *mc, const char *url, const char *method,
                               const char *version, const char *upload, size_t *upload_size, void **con_cls) {
    dsi_router *r = cls;
    rconn *c = *con_cls;
    if (!c) {
        c = calloc(1, sizeof *c);
        if (!c) return MHD_NO;
        c->r = r;
        c->mc = mc;
        c->fd = -1;
        atomic_init(&c->watch, -1);
        const union MHD_ConnectionInfo *ci = MHD_get_connection_info(mc, MHD_CONNECTION_INFO_CONNECTION_FD);
        if (ci) c->fd = ci->connect_fd;
        atomic_fetch_add(&r->n_conns, 1);
        atomic_init(&c->refs, 1);
        pthread_mutex_init(&c->mu, NULL);
        *con_cls = c;
        /* libmicrohttpd decodes chunked bodies only (see the server's handler) */
        const char *te = MHD_lookup_connection_value(mc, MHD_HEADER_KIND, "Transfer-Encoding");
        if (te && strcasecmp(te, "chunked")) {
            c->started = 2; /* answered: no worker, and the body is never read */
            return send_json_error(mc, 501, "unsupported Transfer-Encoding (only chunked is)");
        }
        if (!strcmp(version, MHD_HTTP_VERSION_1_1) && !MHD_lookup_connection_value(mc, MHD_HEADER_KIND, "Host")) {
            c->started = 2; /* RFC 9112 3.2: a server MUST answer 400 */
            return send_json_error(mc, 400, "an HTTP/1.1 request needs a Host header");
        }
        return MHD_YES;
    }
    if (*upload_size) {
        size_t n = *upload_size;
        *upload_size = 0;
        if (c->too_large || c->body_len + n > (8u << 20)) { c->too_large = 1; return MHD_YES; }
        char *nb = realloc(c->body, c->body_len + n + 1);
        if (!nb) return MHD_NO;
        memcpy(nb + c->body_len, upload, n);
        c->body = nb;
        c->body_len += n;
        c->body[c->body_len] = 0;
        return MHD_YES;
    }
    if (c->started == 2) return MHD_YES;
    if (c->started) return respond(c);
    int is_post = !strcmp(method, "POST");
    if ((!strncmp(url, "/v1/", 4) || !strncmp(url, "/admin/", 7)) && !authorised(r, mc)) {
        struct MHD_Response *resp = MHD_create_response_from_buffer(
            strlen(UNAUTHORISED), (void *)UNAUTHORISED, MHD_RESPMEM_PERSISTENT);
        if (!resp) return MHD_NO;
        MHD_add_response_header(resp, "Content-Type", "application/json");
        MHD_add_response_header(resp, "WWW-Authenticate", "Bearer");
        enum MHD_Result ok = MHD_queue_response(mc, 401, resp);
        MHD_destroy_response(resp);
        return ok;
    }
    int chat = !strcmp(url, "/v1/chat/completions"), compl = !strcmp(url, "/v1/completions");
    if (chat || compl) {
        if (!is_post) return send_json_error(mc, 405, "use POST for this endpoint");
        if (c->too_large) return send_json_error(mc, 413, "the request body is too large");
        c->chat = chat;
        c->started = 1;
        atomic_fetch_add(&c->refs, 1); /* the worker's */
        atomic_fetch_add(&r->n_workers, 1);
        pthread_t t;
        if (pthread_create(&t, NULL, dsi__router_worker, c) != 0) {
            atomic_fetch_sub(&r->n_workers, 1);
            atomic_fetch_sub(&c->refs, 1);
            c->started = 0;
            return send_json_error(mc, 503, "cannot start a worker thread");
        }
        pthread_detach(t);
        return respond(c);
    }
    dsi_rbuf b = {0};
    enum MHD_Result ok;
    if (!strcmp(url, "/admin/instances") && is_post) return handle_admin(r, c);
    int is_get = !strcmp(method, "GET") || !strcmp(method, "HEAD");
    int known = !strcmp(url, "/admin/instances") || !strcmp(url, "/metrics") || !strcmp(url, "/v1/pricing") ||
                !strcmp(url, "/health") || !strcmp(url, "/v1/models");
    if (known && !is_get) /* as the server answers (these said 200 to DELETE) */
        return send_json_error(mc, 405, strcmp(url, "/admin/instances") ? "use GET for this endpoint"
                                                                         : "use GET or POST for this endpoint");
    if (!strcmp(url, "/admin/instances")) {
        instances_json(r, &b);
        ok = send_text(mc, 200, "application/json", b.p ? b.p : "", b.len);
    } else if (!strcmp(url, "/metrics")) {
        metrics(r, &b);
        ok = send_text(mc, 200, "text/plain; version=0.0.4; charset=utf-8", b.p ? b.p : "", b.len);
    } else if (!strcmp(url, "/v1/pricing")) {
        /* prices in force for the cluster: utilisation = mean over routable
         * instances of max(batch slots in use, KV blocks in use) */
        double util = 0;
        int n = 0;
        pthread_mutex_lock(&r->mu);
        for (int i = 0; i < r->n_in; i++) {
            inst *x = &r->in[i];
            if (!dsi__router_routable(x)) continue;
            util += dsi_pricing_utilisation(x->running + x->waiting, x->max_num_seqs > 0 ? x->max_num_seqs : 64,
                                            x->kv_blocks_used, x->kv_blocks_total);
            n++;
        }
        pthread_mutex_unlock(&r->mu);
        int len;
        pthread_mutex_lock(&r->pricing_mu);
        char *buf = dsi_pricing_json_text(r->pricing, dsi__router_wall_now(), n ? util / n : -1.0, &len);
        pthread_mutex_unlock(&r->pricing_mu);
        ok = buf ? send_text(mc, 200, "application/json", buf, (size_t)len)
                 : send_json_error(mc, 500, dsi_last_error());
        free(buf);
    } else if (!strcmp(url, "/health")) {
        int np = 0, nd = 0;
        pthread_mutex_lock(&r->mu);
        for (int i = 0; i < r->n_in; i++)
            if (dsi__router_routable(&r->in[i])) { if (r->in[i].role == ROLE_P) np++; else nd++; }
        pthread_mutex_unlock(&r->mu);
        dsi__rbuf_printf(&b, "{\"status\":\"%s\",\"prefill\":%d,\"decode\":%d}", np && nd ? "ok" : "unavailable", np, nd);
        ok = send_text(mc, np && nd ? 200 : 503, "application/json", b.p, b.len);
    } else if (!strcmp(url, "/v1/models")) { /* any decode instance knows the model */
        int status = 503, done = 0;
        for (int i = 0; i < MAX_INST && !done; i++) {
            char host[128];
            int port = 0;
            pthread_mutex_lock(&r->mu);
            if (i < r->n_in && dsi__router_routable(&r->in[i])) {
                snprintf(host, sizeof host, "%s", r->in[i].host);
                port = r->in[i].port;
            }
            pthread_mutex_unlock(&r->mu);
            if (port && !dsi__hc_call(host, port, "GET", "/v1/models", NULL, 0, r->o.api_key, 2.0, &status, &b)) done = 1;
        }
        ok = done ? send_text(mc, status, "application/json", b.p ? b.p : "", b.len)
                  : send_json_error(mc, 503, "no instance is available");
    } else {
        ok = send_json_error(mc, 404, "no such endpoint");
    }
    dsi__rbuf_free(&b);
    return ok;
}

static void completed(void *cls, struct MHD_Connection *mc, void **con_cls, enum MHD_RequestTerminationCode toe) {
    rconn *c = *con_cls;
    if (!c) return;
    *con_cls = NULL;
    pthread_mutex_lock(&c->mu);
    c->client_gone = 1;
    pthread_mutex_unlock(&c->mu);
    dsi__rconn_unref(c);
}

static void mhd_log(void *cls, const char *fmt, va_list ap) {
    char msg[512];
    vsnprintf(msg, sizeof msg, fmt, ap);
    DSI_LOG_DEBUG("router http: %s", msg);
}

/* ---------------------------------------------------------------- heartbeat */

static void poll_one(dsi_router *r, int i) {
    char host[128];
    int port;
    pthread_mutex_lock(&r->mu);
    snprintf(host, sizeof host, "%s", r->in[i].host);
    port = r->in[i].port;
    pthread_mutex_unlock(&r->mu);
    double hb = r->o.heartbeat_s > 0 ? r->o.heartbeat_s : 0.2;
    dsi_rbuf b = {0};
    int status = 0;
    int rc = dsi__hc_call(host, port, "GET", "/internal/load", NULL, 0, r->o.api_key, DSI_MAX(0.5, 2 * hb), &status, &b);
    cJSON *j = !rc && status == 200 ? cJSON_ParseWithLength(b.p, b.len) : NULL;
    pthread_mutex_lock(&r->mu);
    inst *x = &r->in[i];
    int was = x->h.state;
    dsi_health_observe(&x->h, j != NULL, dsi_now(), r->o.miss_limit);
    if (j) {
        const cJSON *v;
#define GETI(name, field) if (cJSON_IsNumber(v = cJSON_GetObjectItemCaseSensitive(j, name))) x->field = (int)v->valuedouble
        GETI("running", running);
        GETI("waiting", waiting);
        GETI("kv_port", kv_port);
        GETI("max_num_seqs", max_num_seqs);
        GETI("draining", reported_draining);
        GETI("kv_blocks_total", kv_blocks_total);
        GETI("kv_blocks_used", kv_blocks_used);
#undef GETI
        if (cJSON_IsNumber(v = cJSON_GetObjectItemCaseSensitive(j, "kv_tokens"))) x->kv_tokens = (long long)v->valuedouble;
        /* a decode instance joined as prefill (or the reverse) refuses every
         * request with "this instance has role ...", which clients got as a
         * 400: it stays out of the pool until it reports a role that serves */
        const cJSON *ro = cJSON_GetObjectItemCaseSensitive(j, "role");
        int wrong = cJSON_IsString(ro) && strcmp(ro->valuestring, "both") &&
                    strcmp(ro->valuestring, x->role == ROLE_P ? "prefill" : "decode");
        if (wrong && !x->wrong_role)
            DSI_LOG_WARN("router: %s reports role %s; not routing %s requests there", x->url, ro->valuestring,
                         role_str(x->role));
        x->wrong_role = wrong;
    }
    if ((int)x->h.state != was)
        DSI_LOG_INFO("router: %s instance %s is %s", role_str(x->role), x->url, dsi_inst_state_name(x->h.state));
    pthread_mutex_unlock(&r->mu);
    cJSON_Delete(j);
    dsi__rbuf_free(&b);
}

/* Autoscaler and scale-down drains, per role (mu held). */
static void autoscale(dsi_router *r) {
    double now = dsi_now();
    for (int role = 0; role < 2; role++) {
        /* a scale-down drain is complete when the router has nothing left there */
        for (int i = 0; i < r->n_in; i++) {
            inst *x = &r->in[i];
            if (x->used && x->role == role && x->scale_drain && x->inflight == 0 && x->pend_attn <= 0 &&
                x->running + x->waiting == 0) {
                x->scale_drain = 0;
                x->member = 0;
                DSI_LOG_INFO("router: autoscaler: %s %s drained, now standby", role_str(role), x->url);
            }
        }
        if (!r->o.autoscale) continue;
        int active = 0, standby = 0, last = -1, first_standby = -1;
        double util = 0;
        for (int i = 0; i < r->n_in; i++) {
            inst *x = &r->in[i];
            if (!x->used || x->left || x->role != role) continue;
            if (dsi__router_routable(x)) {
                double slots = x->max_num_seqs > 0 ? x->max_num_seqs : 64;
                double u = (x->running + x->waiting + (role == ROLE_D ? 0 : x->pend_tokens > 0)) / slots;
                if (x->kv_blocks_total > 0) u = DSI_MAX(u, (double)x->kv_blocks_used / x->kv_blocks_total);
                util += u;
                active++;
                last = i;
            } else if (!x->member && x->h.state == DSI_INST_UP) {
                standby++;
                if (first_standby < 0) first_standby = i;
            }
        }
        if (active) util /= active;
        int d = dsi_autoscale_decide(&r->o.policy, &r->as[role], now, util, active, standby);
        if (d > 0 && first_standby >= 0) {
            r->in[first_standby].member = 1;
            DSI_LOG_INFO("router: autoscaler: utilisation %.2f, %s %s joins", util, role_str(role), r->in[first_standby].url);
        } else if (d < 0 && last >= 0) {
            r->in[last].scale_drain = 1;
            DSI_LOG_INFO("router: autoscaler: utilisation %.2f, draining %s %s", util, role_str(role), r->in[last].url);
        }
    }
    dsi__router_record_gpus(r);
}

/* One heartbeat round: every live instance polled, HB_THREADS at a time.
 * One after another, each instance that accepts and never answers cost the
 * round its whole timeout (0.5 s): with 20 of them a killed instance was
 * marked dead after 22.9 s instead of 0.7. */
#define HB_THREADS 32
typedef struct hb_round {
    dsi_router *r;
    int n;
    atomic_int next;
} hb_round;

static void *hb_poller(void *arg) {
    hb_round *h = arg;
    for (int i; (i = atomic_fetch_add(&h->next, 1)) < h->n && !atomic_load(&h->r->stop);) {
        pthread_mutex_lock(&h->r->mu);
        int live = h->r->in[i].used && !h->r->in[i].left;
        pthread_mutex_unlock(&h->r->mu);
        if (live) poll_one(h->r, i);
    }
    return NULL;
}

static void poll_all(dsi_router *r) {
    hb_round h = {r, 0, 0};
    pthread_mutex_lock(&r->mu);
    h.n = r->n_in;
    pthread_mutex_unlock(&r->mu);
    pthread_t t[HB_THREADS - 1];
    int nt = 0;
    while (nt < HB_THREADS - 1 && nt + 1 < h.n && pthread_create(&t[nt], NULL, hb_poller, &h) == 0) nt++;
    hb_poller(&h);
    for (int k = 0; k < nt; k++) pthread_join(t[k], NULL);
}

static void *heartbeat(void *arg) {
    dsi_router *r = arg;
    double hb = r->o.heartbeat_s > 0 ? r->o.heartbeat_s : 0.2;
    double last_checkpoint = dsi_now();
    while (!atomic_load(&r->stop)) {
        double t0 = dsi_now();
        poll_all(r);
        pthread_mutex_lock(&r->mu);
        autoscale(r);
        pthread_mutex_unlock(&r->mu);
        if (r->acct && dsi_now() - last_checkpoint > 60) {
            dsi_account_checkpoint(r->acct, dsi__router_wall_now());
            last_checkpoint = dsi_now();
        }
        double left = hb - (dsi_now() - t0);
        if (left > 0) {
            struct timespec ts = {(time_t)left, (long)((left - (time_t)left) * 1e9)};
            nanosleep(&ts, NULL);
        }
    }
    return NULL;
}

/* ---------------------------------------------------------------- start / stop */

static void router_free(dsi_router *r) {
    if (r->mhd) MHD_stop_daemon(r->mhd);
    if (r->acct) dsi_account_checkpoint(r->acct, dsi__router_wall_now());
    dsi_account_destroy(r->acct);
    dsi_pricing_destroy(r->pricing);
    pthread_mutex_destroy(&r->pricing_mu);
    pthread_mutex_destroy(&r->mu);
    free(r);
}

int dsi_router_start(const dsi_router_opts *opts, dsi_router **out) {
    *out = NULL;
    dsi_router *r = calloc(1, sizeof *r);
    if (!r) return dsi_error(DSI_ENOMEM, "out of memory");
    r->o = opts ? *opts : dsi_router_default_opts();
    if (!r->o.host) r->o.host = "127.0.0.1";
    if (r->o.miss_limit <= 0) r->o.miss_limit = 3;
    dsi_autoscale_policy *p = &r->o.policy;
    if (p->up_util <= 0) p->up_util = 0.8;
    if (p->down_util <= 0) p->down_util = 0.3;
    if (p->hold_s <= 0) p->hold_s = 2;
    if (p->cooldown_s <= 0) p->cooldown_s = 5;
    pthread_mutex_init(&r->mu, NULL);
    dsi_autoscale_init(&r->as[0]);
    dsi_autoscale_init(&r->as[1]);
    int rc = DSI_OK;
    struct { const char *const *urls; int n, role, member; } lists[4] = {
        {r->o.prefill, r->o.n_prefill, ROLE_P, 1}, {r->o.decode, r->o.n_decode, ROLE_D, 1},
        {r->o.standby_prefill, r->o.n_standby_prefill, ROLE_P, 0}, {r->o.standby_decode, r->o.n_standby_decode, ROLE_D, 0}};
    for (int l = 0; l < 4 && !rc; l++)
        for (int i = 0; i < lists[l].n && !rc; i++)
            if (dsi__router_add_inst(r, lists[l].urls[i], lists[l].role, lists[l].member) < 0) rc = DSI_EINVAL;
    pthread_mutex_init(&r->pricing_mu, NULL);
    if (!rc) rc = r->o.pricing_path ? dsi_pricing_load(r->o.pricing_path, &r->pricing)
                                    : dsi_pricing_parse(DEFAULT_PRICING, "built-in pricing", &r->pricing);
    if (!rc) rc = dsi_account_create(r->pricing, r->o.journal_path, &r->acct);
    if (rc) { router_free(r); return rc; }
    pthread_mutex_lock(&r->mu);
    dsi__router_record_gpus(r);
    pthread_mutex_unlock(&r->mu);
    /* a first round of heartbeats so the pool is known before the first request */
    poll_all(r);

    struct sockaddr_storage ss;
    char host[160];
    snprintf(host, sizeof host, "%s", r->o.host);
    int lfd, port;
    if ((rc = dsi_pd_listen(host, r->o.port, &lfd, &port))) { router_free(r); return rc; }
    (void)ss;
    r->port = port;
    r->mhd = MHD_start_daemon(MHD_USE_AUTO_INTERNAL_THREAD | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ITC | MHD_USE_ERROR_LOG,
                              0, NULL, NULL, handler, r, MHD_OPTION_LISTEN_SOCKET, lfd, MHD_OPTION_THREAD_POOL_SIZE,
                              (unsigned)(r->o.http_threads > 0 ? r->o.http_threads : 2), MHD_OPTION_NOTIFY_COMPLETED,
                              completed, r, MHD_OPTION_CONNECTION_TIMEOUT, 300u,
                              MHD_OPTION_CONNECTION_LIMIT, 4096u, MHD_OPTION_EXTERNAL_LOGGER, mhd_log,
                              NULL, MHD_OPTION_END);
    if (!r->mhd) {
        close(lfd);
        router_free(r);
        return dsi_error(DSI_EIO, "router: cannot start the HTTP server on %s:%d", r->o.host, port);
    }
    if (pthread_create(&r->hb, NULL, heartbeat, r) == 0) r->hb_started = 1;
    *out = r;
    return DSI_OK;
}

int dsi_router_port(const dsi_router *r) { return r->port; }

void dsi_router_stop(dsi_router *r) {
    if (!r) return;
    atomic_store(&r->stop, 1);
    if (r->hb_started) pthread_join(r->hb, NULL);
    MHD_socket lfd = MHD_quiesce_daemon(r->mhd);
    if (lfd != MHD_INVALID_SOCKET) close(lfd);
    /* workers see `stop` within 0.2 s in any wait on an instance (see
     * worker_abort) and answer their clients 503; then libmicrohttpd sends
     * what they queued. Stopping it with a connection still suspended
     * aborted the process (a request in flight at SIGTERM: exit 134). */
    double end = dsi_now() + 10.0;
    while (atomic_load(&r->n_workers) > 0 && dsi_now() < end) {
        struct timespec ts = {0, 10 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    end = dsi_now() + 5.0;
    while (atomic_load(&r->n_conns) > 0 && dsi_now() < end) {
        struct timespec ts = {0, 10 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    router_free(r);
}
