/* dsinfer router: the public OpenAI endpoint in front of prefill and decode
 * instances.
 *
 * A request: the worker thread asks every routable prefill instance how much
 * of the prompt it holds (POST /internal/match), picks a prefill instance
 * (Prefill LB) and a decode instance (Decode LB), opens
 * POST /internal/decode?xfer=X on the decode instance (which parks the
 * request until its KV arrives), then calls POST /internal/prefill on the
 * prefill instance, which computes the prompt, streams the KV blocks straight
 * to the decode instance and answers once the decode side has them. A failed
 * prefill is retried on another instance (the decode side keeps waiting for
 * transfer X). The decode instance's response (SSE or JSON) is relayed to the
 * client; if it stops before its end the client gets an error event and
 * [DONE].
 *
 * Threads: MHD's (client HTTP), one worker per request (blocking calls to
 * instances), and the heartbeat thread (polls GET /internal/load, runs the
 * health state machine, drains, the autoscaler and the GPU account). */
#define _GNU_SOURCE /* POLLRDHUP */
#include "router/router_impl.h"

#include "dsinfer/econ.h"
#include "dsinfer/pd.h"

#include <cjson/cJSON.h>
#include <ctype.h>
#include <microhttpd.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/socket.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

double dsi__router_wall_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* ---------------------------------------------------------------- instances */

/* An instance URL in one spelling, "http://host:port" ("http://[v6]:port"),
 * from that, "host:port", or either with one trailing "/". Any other scheme,
 * a path, or a byte outside host names is refused: the same instance under
 * two spellings was two members of the pool, and the URL is written
 * unescaped into JSON and metric labels. */
int dsi__router_canon_url(const char *in, char *out, size_t cap) {
    const char *s = in;
    if (strstr(in, "://")) {
        if (strncmp(in, "http://", 7)) return dsi_error(DSI_EINVAL, "instance URLs are http://host:port");
        s += 7;
    }
    size_t n = strlen(s);
    if (n && s[n - 1] == '/') n--;
    char hp[160];
    if (n == 0 || n >= sizeof hp) return dsi_error(DSI_EINVAL, "bad instance URL (http://host:port expected)");
    for (size_t k = 0; k < n; k++) {
        unsigned char ch = (unsigned char)s[k];
        if (!isalnum(ch) && !strchr(".-_:[]", ch))
            return dsi_error(DSI_EINVAL, "bad instance URL (http://host:port expected)");
    }
    memcpy(hp, s, n);
    hp[n] = 0;
    char host[128];
    int port;
    if (dsi_pd_split_hostport(hp, host, sizeof host, &port))
        return dsi_error(DSI_EINVAL, "bad instance URL (http://host:port expected)");
    if ((size_t)snprintf(out, cap, strchr(host, ':') ? "http://[%s]:%d" : "http://%s:%d", host, port) >= cap)
        return dsi_error(DSI_EINVAL, "instance URL too long");
    return DSI_OK;
}

/* Adds an instance slot (mu held). Returns the index or -1. A URL that left
 * takes its old slot back (keeping the router's account of what it still has
 * there); past MAX_INST a slot that left with nothing of the router's in it is
 * reused: slots were never freed, so after 64 leaves no instance could join. */
int dsi__router_add_inst(dsi_router *r, const char *url, int role, int member) {
    char cu[sizeof r->in[0].url];
    if (dsi__router_canon_url(url, cu, sizeof cu)) return -1;
    for (int i = 0; i < r->n_in; i++) {
        inst *x = &r->in[i];
        if (x->used && x->left && x->role == role && !strcmp(x->url, cu)) {
            x->left = 0;
            x->member = member;
            x->admin_drain = x->scale_drain = x->wrong_role = 0;
            memset(&x->h, 0, sizeof x->h); /* joining again: the heartbeats say when it is up */
            return i;
        }
    }
    int i = r->n_in < MAX_INST ? r->n_in : -1;
    for (int k = 0; i < 0 && k < r->n_in; k++) {
        const inst *x = &r->in[k];
        if (x->left && x->inflight == 0 && x->pend_attn <= 0 && x->pend_tokens <= 0) i = k;
    }
    if (i < 0) return dsi_error(DSI_ERANGE, "at most %d instances", MAX_INST), -1;
    inst *x = &r->in[i];
    memset(x, 0, sizeof *x);
    if (dsi_pd_split_hostport(cu, x->host, sizeof x->host, &x->port)) return -1;
    snprintf(x->url, sizeof x->url, "%s", cu);
    x->used = 1;
    x->role = role;
    x->member = member;
    x->max_num_seqs = 64;
    if (i == r->n_in) r->n_in++;
    return i;
}

int dsi__router_find_inst(dsi_router *r, const char *url, int role) {
    char cu[sizeof r->in[0].url];
    if (dsi__router_canon_url(url, cu, sizeof cu)) return -1;
    for (int i = 0; i < r->n_in; i++)
        if (r->in[i].used && !r->in[i].left && r->in[i].role == role && !strcmp(r->in[i].url, cu)) return i;
    return -1;
}

int dsi__router_routable(const inst *x) {
    return x->used && x->member && !x->left && !x->wrong_role && !x->admin_drain && !x->scale_drain &&
           !x->reported_draining && dsi_health_routable(&x->h);
}

/* GPU count for the cost account: every member instance (draining ones still run). mu held. */
void dsi__router_record_gpus(dsi_router *r) {
    int n = 0;
    for (int i = 0; i < r->n_in; i++)
        if (r->in[i].used && r->in[i].member && !r->in[i].left) n++;
    int gpus = n * (r->o.gpus_per_instance > 0 ? r->o.gpus_per_instance : 8);
    if (gpus != r->gpus_recorded && r->acct) {
        dsi_account_set_gpus(r->acct, dsi__router_wall_now(), gpus);
        r->gpus_recorded = gpus;
    }
}

/* A call to an instance failed: it is suspect at once (and dead after
 * miss_limit failures in a row, heartbeats included). */
static void note_failure(dsi_router *r, int i) {
    pthread_mutex_lock(&r->mu);
    dsi_health_observe(&r->in[i].h, 0, dsi_now(), r->o.miss_limit);
    pthread_mutex_unlock(&r->mu);
}

/* ---------------------------------------------------------------- client connections */


void dsi__rconn_unref(rconn *c) {
    if (atomic_fetch_sub(&c->refs, 1) != 1) return;
    atomic_fetch_sub(&c->r->n_conns, 1);
    free(c->body);
    dsi__rbuf_free(&c->out);
    pthread_mutex_destroy(&c->mu);
    free(c);
}

static void wake(rconn *c) {
    if (c->suspended) {
        c->suspended = 0;
        MHD_resume_connection(c->mc);
    }
}

static void set_head(rconn *c, int status, int stream) {
    pthread_mutex_lock(&c->mu);
    c->status = status;
    c->stream = stream;
    c->head_ready = 1;
    wake(c);
    pthread_mutex_unlock(&c->mu);
}

static void push(rconn *c, const char *s, size_t n, int finished) {
    pthread_mutex_lock(&c->mu);
    if (n) dsi__rbuf_put(&c->out, s, n);
    if (finished) c->finished = 1;
    wake(c);
    pthread_mutex_unlock(&c->mu);
}

static void error_json(dsi_rbuf *b, int status, const char *msg) {
    const char *type = status == 429 ? "rate_limit_error" : status >= 500 ? "server_error" : "invalid_request_error";
    dsi__rbuf_put(b, "{\"error\":{\"message\":\"", 21);
    for (const char *p = msg; *p; p++) {
        if (*p == '"' || *p == '\\') dsi__rbuf_put(b, "\\", 1);
        if ((unsigned char)*p < 0x20) { dsi__rbuf_put(b, " ", 1); continue; }
        dsi__rbuf_put(b, p, 1);
    }
    dsi__rbuf_printf(b, "\",\"type\":\"%s\",\"param\":null,\"code\":null}}", type);
}

/* Answers the whole request with an error (before any head was sent). */
void dsi__router_fail_request(rconn *c, int status, const char *msg) {
    dsi_rbuf b = {0};
    error_json(&b, status, msg);
    pthread_mutex_lock(&c->mu);
    dsi__rbuf_put(&c->out, b.p ? b.p : "", b.len);
    pthread_mutex_unlock(&c->mu);
    dsi__rbuf_free(&b);
    set_head(c, status, 0);
    push(c, NULL, 0, 1);
}

static void relay_whole(rconn *c, int status, const dsi_rbuf *body) {
    pthread_mutex_lock(&c->mu);
    dsi__rbuf_put(&c->out, body->p ? body->p : "", body->len);
    pthread_mutex_unlock(&c->mu);
    set_head(c, status, 0);
    push(c, NULL, 0, 1);
}

/* ---------------------------------------------------------------- one request */

typedef struct match_res {
    int ok, n_prompt, cached, max_tokens;
} match_res;

static int json_int(const cJSON *o, const char *k, int dflt) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsNumber(v) ? (int)v->valuedouble : dflt;
}

/* Picks an instance of `role` (mu held), skipping those in `tried`. */
static int pick(dsi_router *r, int role, const match_res *m, int n_prompt, int n_tokens, const int *tried) {
    dsi_lb_inst li[MAX_INST];
    memset(li, 0, sizeof li);
    for (int i = 0; i < r->n_in; i++) {
        inst *x = &r->in[i];
        li[i].eligible = x->role == role && dsi__router_routable(x) && !tried[i] && (role == ROLE_D ? x->kv_port > 0 : m[i].ok);
        li[i].attn_load = x->pend_attn;
        li[i].input_tokens = x->pend_tokens;
        li[i].cached_tokens = role == ROLE_P ? m[i].cached : 0;
        li[i].kv_tokens = DSI_MAX((double)x->kv_tokens, x->inflight_tokens);
        li[i].n_requests = DSI_MAX((double)(x->running + x->waiting), (double)x->inflight);
    }
    if (r->o.lb == DSI_LB_ROUND_ROBIN) return dsi_lb_pick_round_robin(li, r->n_in, &r->rr[role]);
    return role == ROLE_P ? dsi_lb_pick_prefill(li, r->n_in, n_prompt) : dsi_lb_pick_decode(li, r->n_in, n_tokens);
}

static void release_decode(dsi_router *r, int d, double tokens) {
    pthread_mutex_lock(&r->mu);
    r->in[d].inflight--;
    r->in[d].inflight_tokens -= tokens;
    pthread_mutex_unlock(&r->mu);
}

/* Adds a prefill answer's transfer figures to the router's counters. */
static void count_transfer(dsi_router *r, const dsi_rbuf *pb) {
    cJSON *pj = cJSON_ParseWithLength(pb->p ? pb->p : "", pb->len);
    const cJSON *v;
    if (cJSON_IsNumber(v = cJSON_GetObjectItemCaseSensitive(pj, "transfer_bytes")))
        atomic_fetch_add(&r->kv_bytes, (unsigned long)v->valuedouble);
    if (cJSON_IsNumber(v = cJSON_GetObjectItemCaseSensitive(pj, "blocks")))
        atomic_fetch_add(&r->kv_blocks, (unsigned long)v->valuedouble);
    if (cJSON_IsNumber(v = cJSON_GetObjectItemCaseSensitive(pj, "skipped_blocks")))
        atomic_fetch_add(&r->kv_skipped, (unsigned long)v->valuedouble);
    cJSON_Delete(pj);
}

/* Whether the decode instance closed the connection it holds for the request
 * (it died, or refused the request and answered already). */
static int decode_gone(dsi_hc *dc) {
    struct pollfd pf = {.fd = dc->fd, .events = POLLIN | POLLRDHUP};
    if (poll(&pf, 1, 0) <= 0) return 0;
    if (pf.revents & (POLLRDHUP | POLLHUP | POLLERR)) return 1;
    char ch;
    return recv(dc->fd, &ch, 1, MSG_PEEK | MSG_DONTWAIT) == 0;
}

/* The worker's abort check (dsi__hc_set_abort): the router stops, or the
 * client left. While a request waits for an instance's answer its connection
 * is suspended and libmicrohttpd does not see the client go, so the socket is
 * polled here (as the server's watchdog does); a client gone sooner was seen
 * by `completed`. Without this a non-streaming client that hung up left its
 * request generating on the decode instance to its end (10+ minutes for a
 * long one), and a stopping router waited on every such call. */
static int worker_abort(void *ctx) {
    rconn *c = ctx;
    if (atomic_load(&c->r->stop)) return 1;
    /* a decode instance that stopped answering (SIGSTOP, a hung host) but
     * keeps the connection open: once its heartbeats mark it dead, the wait
     * ends as if it had died (the stream's clients went quiet until they
     * gave up, a non-streaming one waited up to 600 s) */
    int w = atomic_load(&c->watch);
    if (w >= 0) {
        pthread_mutex_lock(&c->r->mu);
        int dead = c->r->in[w].h.state == DSI_INST_DEAD;
        pthread_mutex_unlock(&c->r->mu);
        if (dead) return 2;
    }
    pthread_mutex_lock(&c->mu);
    if (!c->client_gone && c->suspended && c->fd >= 0) {
        struct pollfd pf = {.fd = c->fd, .events = POLLRDHUP};
        if (poll(&pf, 1, 0) > 0 && (pf.revents & (POLLRDHUP | POLLHUP | POLLERR))) c->client_gone = 1;
    }
    int gone = c->client_gone;
    pthread_mutex_unlock(&c->mu);
    return gone;
}

/* Ends a request whose calls were abandoned (rc DSI_ECANCELED: see
 * worker_abort). Closing the instance connections (the caller's) cancels
 * the work there; no instance is marked as failing. A stopping router still
 * answers a client that is there. */
static void abandon(rconn *c, int head_sent) {
    if (!atomic_load(&c->r->stop)) { push(c, NULL, 0, 1); return; }
    if (!head_sent) { dsi__router_fail_request(c, 503, "the router is shutting down"); return; }
    static const char ev[] = "data: {\"error\":{\"message\":\"the router is shutting down\",\"type\":"
                             "\"server_error\",\"param\":null,\"code\":null}}\n\ndata: [DONE]\n\n";
    push(c, ev, sizeof ev - 1, 1);
}

/* The same, for a request that holds a decode instance (its parked request
 * is dropped when the connection closes) and a prefill answer buffer. */
static void abandon_with_decode(rconn *c, dsi_hc *dc, int d, double dtokens, dsi_rbuf *pb) {
    dsi__hc_close(dc);
    release_decode(c->r, d, dtokens);
    dsi__rbuf_free(pb);
    abandon(c, 0);
}

static void run_request(rconn *c) {
    dsi_router *r = c->r;
    const char *api = c->chat ? "chat" : "completions";
    int stream = 0;
    cJSON *j = cJSON_ParseWithLength(c->body ? c->body : "", c->body_len);
    if (j) stream = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(j, "stream"));
    cJSON_Delete(j);

    /* 1. how much of the prompt each prefill instance holds */
    match_res m[MAX_INST];
    memset(m, 0, sizeof m);
    int cand[MAX_INST], n_cand = 0;
    char hosts[MAX_INST][128];
    int ports[MAX_INST];
    pthread_mutex_lock(&r->mu);
    for (int i = 0; i < r->n_in; i++)
        if (r->in[i].role == ROLE_P && dsi__router_routable(&r->in[i])) {
            cand[n_cand++] = i;
            snprintf(hosts[i], sizeof hosts[i], "%s", r->in[i].host);
            ports[i] = r->in[i].port;
        }
    pthread_mutex_unlock(&r->mu);
    char path[512];
    snprintf(path, sizeof path, "/internal/match?api=%s", api);
    int n_prompt = -1, max_tokens = 0;
    for (int k = 0; k < n_cand; k++) {
        int i = cand[k], status = 0;
        dsi_rbuf b = {0};
        int rc = dsi__hc_call(hosts[i], ports[i], "POST", path, c->body, c->body_len, r->o.api_key, 5.0, &status, &b);
        if (rc == DSI_ECANCELED) {
            dsi__rbuf_free(&b);
            abandon(c, 0);
            return;
        }
        if (rc || status >= 500) {
            note_failure(r, i);
        } else if (status != 200) { /* the request itself is bad: every instance would say so */
            atomic_fetch_add(&r->n_client_err, 1);
            relay_whole(c, status, &b);
            dsi__rbuf_free(&b);
            return;
        } else if ((j = cJSON_ParseWithLength(b.p, b.len))) {
            m[i].ok = 1;
            m[i].n_prompt = n_prompt = json_int(j, "n_prompt", 0);
            m[i].cached = json_int(j, "cached_tokens", 0);
            max_tokens = json_int(j, "max_tokens", 0);
            cJSON_Delete(j);
        }
        dsi__rbuf_free(&b);
    }
    if (n_prompt < 0) {
        atomic_fetch_add(&r->n_err, 1);
        dsi__router_fail_request(c, 503, "no prefill instance is available");
        return;
    }

    /* 2. a decode instance that takes the request and waits for its KV;
     * 3. prefill, retried elsewhere when a prefill instance fails. When the
     * decode instance is lost before anything reached the client, the whole
     * request moves to another decode instance. */
    int tried_d[MAX_INST] = {0};
    double dtokens = n_prompt + max_tokens / 2.0;
    dsi_hc dc;
    int d = -1, headed = 0, client_status = 0, gave_up = 0;
    dsi_rbuf pb = {0};
    while (!headed && !client_status && !gave_up) {
        uint64_t xfer = ((uint64_t)time(NULL) << 24) ^ ((uint64_t)getpid() << 44) ^
                        (atomic_fetch_add(&r->xfer_seq, 1) * 0x9e3779b97f4a7c15ull);
        if (!xfer) xfer = 1;
        int kv_port = 0, dport = 0;
        char dhost[128];
        for (;;) {
            pthread_mutex_lock(&r->mu);
            d = pick(r, ROLE_D, m, n_prompt, (int)dtokens, tried_d);
            if (d >= 0) {
                inst *x = &r->in[d];
                x->inflight++;
                x->inflight_tokens += dtokens;
                x->routed++;
                snprintf(dhost, sizeof dhost, "%s", x->host);
                kv_port = x->kv_port;
                dport = x->port;
            }
            pthread_mutex_unlock(&r->mu);
            if (d < 0) break;
            tried_d[d] = 1;
            snprintf(path, sizeof path, "/internal/decode?api=%s&xfer=%llx", api, (unsigned long long)xfer);
            if (dsi__hc_start(&dc, dhost, dport, "POST", path, c->body, c->body_len, r->o.api_key, 2.0) == DSI_OK) break;
            note_failure(r, d);
            release_decode(r, d, dtokens);
        }
        if (d < 0) {
            atomic_fetch_add(&r->n_err, 1);
            dsi__router_fail_request(c, 503, "no decode instance is available");
            dsi__rbuf_free(&pb);
            return;
        }
        int max_attempts = r->o.max_prefill_attempts > 0 ? r->o.max_prefill_attempts : 3;
        int tried_p[MAX_INST] = {0}, done = 0, lost = 0;
        for (int attempt = 0; attempt < max_attempts && !done; attempt++) {
            pthread_mutex_lock(&r->mu);
            int p = pick(r, ROLE_P, m, n_prompt, 0, tried_p);
            double w = 0, t = 0;
            char phost[128];
            int pport = 0;
            if (p >= 0) {
                inst *x = &r->in[p];
                int cch = DSI_MIN(m[p].cached, n_prompt - 1);
                w = dsi_lb_attn_work(cch, n_prompt - cch);
                t = n_prompt - cch;
                x->pend_attn += w;
                x->pend_tokens += t;
                x->routed++;
                snprintf(phost, sizeof phost, "%s", x->host);
                pport = x->port;
            }
            pthread_mutex_unlock(&r->mu);
            if (p < 0) break;
            tried_p[p] = 1;
            if (attempt > 0) atomic_fetch_add(&r->n_retries, 1);
            snprintf(path, sizeof path, "/internal/prefill?api=%s&xfer=%llx&decode=%s:%d", api,
                     (unsigned long long)xfer, dhost, kv_port);
            int status = 0;
            dsi__rbuf_free(&pb);
            int rc = dsi__hc_call(phost, pport, "POST", path, c->body, c->body_len, r->o.api_key, 600.0, &status, &pb);
            pthread_mutex_lock(&r->mu);
            r->in[p].pend_attn -= w;
            r->in[p].pend_tokens -= t;
            pthread_mutex_unlock(&r->mu);
            if (rc == DSI_ECANCELED) {
                abandon_with_decode(c, &dc, d, dtokens, &pb);
                return;
            }
            if (!rc && status == 200) {
                done = 1;
                count_transfer(r, &pb);
            } else if (!rc && status >= 400 && status < 500 && status != 429) {
                client_status = status;
                break;
            } else if (rc) note_failure(r, p);
            else DSI_LOG_WARN("router: prefill on %s:%d answered %d: %.200s", phost, pport, status, pb.p ? pb.p : "");
            if (!done && decode_gone(&dc)) { lost = 1; break; } /* nobody would take the KV */
        }
        atomic_store(&c->watch, d);
        int hrc = done ? dsi__hc_read_head(&dc, 600.0) : DSI_OK;
        atomic_store(&c->watch, -1);
        if (done && hrc == DSI_OK) { headed = 1; break; }
        if (hrc == DSI_ECANCELED) {
            abandon_with_decode(c, &dc, d, dtokens, &pb);
            return;
        }
        if (done) lost = 1; /* the decode instance died between the KV and its answer */
        dsi__hc_close(&dc); /* a live decode instance sees the hang-up and drops the parked request */
        release_decode(r, d, dtokens);
        if (lost) {
            note_failure(r, d);
            atomic_fetch_add(&r->n_retries, 1);
            DSI_LOG_WARN("router: decode instance lost before answering; trying another");
        } else if (!client_status) gave_up = 1;
    }
    if (!headed) {
        if (client_status) {
            atomic_fetch_add(&r->n_client_err, 1);
            relay_whole(c, client_status, &pb);
        } else {
            atomic_fetch_add(&r->n_err, 1);
            dsi__router_fail_request(c, 503, "prefill failed on every instance tried");
        }
        dsi__rbuf_free(&pb);
        return;
    }
    dsi__rbuf_free(&pb);

    /* 4. relay the decode instance's answer */
    atomic_store(&c->watch, d);
    int outcome = 0; /* 0 ok, 1 decode lost, 2 error answer, 3 abandoned, 4 server error answer */
    if (dc.status != 200 || !stream) {
        dsi_rbuf b = {0};
        int arc = dsi__hc_read_all(&dc, &b, 64u << 20, 600.0);
        if (arc == DSI_ECANCELED) {
            outcome = 3;
            abandon(c, 0);
        } else if (arc) {
            note_failure(r, d);
            outcome = 1;
            dsi__router_fail_request(c, 502, "the decode instance failed mid-response");
        } else {
            if (dc.status != 200) outcome = dc.status >= 500 ? 4 : 2; /* a draining instance's 503 is no client error */
            relay_whole(c, dc.status, &b);
        }
        dsi__rbuf_free(&b);
    } else {
        set_head(c, 200, 1);
        char buf[16384], tail[16] = {0};
        for (;;) {
            long n = dsi__hc_read_body(&dc, buf, sizeof buf, 0.2);
            pthread_mutex_lock(&c->mu);
            int gone = c->client_gone;
            pthread_mutex_unlock(&c->mu);
            if (gone) break; /* closing the connection cancels the request on the decode instance */
            if (n == DSI_ETIMEOUT) continue;
            if (n == DSI_ECANCELED) { /* the router stops */
                outcome = 3;
                abandon(c, 1);
                break;
            }
            if (n > 0) {
                push(c, buf, n, 0);
                /* remember the last bytes: a complete stream ends in "data: [DONE]\n\n" */
                size_t keep = n >= 15 ? 15 : (size_t)n, old = strlen(tail);
                if (old + keep > 15) { memmove(tail, tail + (old + keep - 15), 15 - keep); old = 15 - keep; }
                memcpy(tail + old, buf + n - keep, keep);
                tail[old + keep] = 0;
                continue;
            }
            if (n == 0 && strstr(tail, "[DONE]")) { push(c, NULL, 0, 1); break; }
            /* the stream stopped before its end: the decode instance died */
            note_failure(r, d);
            outcome = 1;
            static const char ev[] = "data: {\"error\":{\"message\":\"the decode instance serving this request "
                                     "failed mid-stream\",\"type\":\"server_error\",\"param\":null,\"code\":"
                                     "\"decode_instance_lost\"}}\n\ndata: [DONE]\n\n";
            push(c, ev, sizeof ev - 1, 1);
            break;
        }
        push(c, NULL, 0, 1);
    }
    atomic_store(&c->watch, -1);
    dsi__hc_close(&dc);
    release_decode(r, d, dtokens);
    if (outcome != 3) /* not abandoned */
        atomic_fetch_add(outcome == 0   ? &r->n_ok
                         : outcome == 1 ? &r->n_decode_lost
                         : outcome == 2 ? &r->n_client_err
                                        : &r->n_err,
                         1);
}

void *dsi__router_worker(void *arg) {
    rconn *c = arg;
    atomic_fetch_add(&c->r->n_inflight, 1);
    dsi__hc_set_abort(worker_abort, c);
    run_request(c);
    dsi__hc_set_abort(NULL, NULL);
    atomic_fetch_sub(&c->r->n_inflight, 1);
    atomic_fetch_sub(&c->r->n_workers, 1);
    dsi__rconn_unref(c);
    return NULL;
}
