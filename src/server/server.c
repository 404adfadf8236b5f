/* The HTTP front end on libmicrohttpd: routing, uploads, suspend/resume
 * streaming, disconnect watching, start and drain.
 *
 * Threads: MHD's own (parse, tokenize, submit, send), the scheduler's (runs
 * steps; its callback formats output into the request's buffer and resumes
 * the connection), and a watchdog that notices clients gone while their
 * connection is suspended (MHD does not see disconnects then) and cancels
 * their requests so their KV blocks are freed. */
#define _GNU_SOURCE /* POLLRDHUP */
#include "server/server_impl.h"

#include <arpa/inet.h>
#include <errno.h>
#include <microhttpd.h>
#include <netdb.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#define DEMO_SEED 20250227ull
#define DEMO_NAME "dsinfer-demo"

extern const unsigned char dsi_demo_tokenizer_json[];
extern const size_t dsi_demo_tokenizer_json_len;
extern const unsigned char dsi_demo_tokenizer_config_json[];
extern const size_t dsi_demo_tokenizer_config_json_len;

dsi_server_opts dsi_server_default_opts(void) {
    dsi_server_opts o = {0};
    o.host = "127.0.0.1";
    o.port = 8000;
    return o;
}

/* ---------------------------------------------------------------- connections */

static dsi_conn *conn_new(dsi_server *s, struct MHD_Connection *mc) {
    dsi_conn *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->srv = s;
    c->mc = mc;
    c->fd = -1;
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(mc, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (ci) c->fd = ci->connect_fd;
    atomic_init(&c->refs, 1);
    pthread_mutex_init(&c->mu, NULL);
    atomic_fetch_add(&s->n_conns, 1);
    return c;
}

void dsi__conn_unref(dsi_conn *c) {
    if (atomic_fetch_sub(&c->refs, 1) != 1) return;
    dsi_server *s = c->srv;
    dsi__conn_pipeline_free(c);
    dsi__sbuf_free(&c->out);
    free(c->body);
    pthread_mutex_destroy(&c->mu);
    free(c);
    atomic_fetch_sub(&s->n_conns, 1);
}

void dsi__conn_register(dsi_conn *c) {
    dsi_server *s = c->srv;
    pthread_mutex_lock(&s->reg_mu);
    c->prev = NULL;
    c->next = s->reg_head;
    if (s->reg_head) s->reg_head->prev = c;
    s->reg_head = c;
    c->in_registry = 1;
    pthread_mutex_unlock(&s->reg_mu);
}

void dsi__conn_unregister(dsi_conn *c) {
    dsi_server *s = c->srv;
    pthread_mutex_lock(&s->reg_mu);
    if (c->in_registry) {
        if (c->prev) c->prev->next = c->next; else s->reg_head = c->next;
        if (c->next) c->next->prev = c->prev;
        c->in_registry = 0;
    }
    pthread_mutex_unlock(&s->reg_mu);
}

void dsi__conn_wake(dsi_conn *c) {
    if (c->suspended) {
        c->suspended = 0;
        MHD_resume_connection(c->mc);
    }
}

/* Polls suspended connections for a hang-up every 50 ms. Connections stay
 * open while suspended (MHD closes none), so their fds are valid to poll. */
static void *watchdog(void *arg) {
    dsi_server *s = arg;
    while (!atomic_load(&s->watchdog_stop)) {
        struct timespec ts = {0, 50 * 1000 * 1000};
        nanosleep(&ts, NULL);
        pthread_mutex_lock(&s->reg_mu);
        for (dsi_conn *c = s->reg_head; c; c = c->next) {
            pthread_mutex_lock(&c->mu);
            if (c->suspended && !c->finished && !c->cancel_sent && c->fd >= 0) {
                struct pollfd pf = {.fd = c->fd, .events = POLLRDHUP};
                if (poll(&pf, 1, 0) > 0 && (pf.revents & (POLLRDHUP | POLLHUP | POLLERR))) {
                    c->cancel_sent = 1;
                    dsi_sched_cancel(s->sched, c->sched_id);
                }
            }
            pthread_mutex_unlock(&c->mu);
        }
        pthread_mutex_unlock(&s->reg_mu);
    }
    return NULL;
}

/* ---------------------------------------------------------------- responses */

static enum MHD_Result send_buf(struct MHD_Connection *mc, int status, const char *type, const char *body, size_t n,
                                int retry_after) {
    struct MHD_Response *r = MHD_create_response_from_buffer(n, (void *)body, MHD_RESPMEM_MUST_COPY);
    if (!r) return MHD_NO;
    MHD_add_response_header(r, "Content-Type", type);
    if (retry_after) MHD_add_response_header(r, "Retry-After", "1");
    if (status == 401) MHD_add_response_header(r, "WWW-Authenticate", "Bearer");
    enum MHD_Result ok = MHD_queue_response(mc, status, r);
    MHD_destroy_response(r);
    return ok;
}

static enum MHD_Result send_error(dsi_server *s, struct MHD_Connection *mc, int status, const char *msg,
                                  const char *param) {
    dsi_sbuf b = {0};
    dsi__api_error_json(&b, status, msg, param);
    int outcome = status == 429 || status == 503 ? DSI_OUT_REJECTED : status >= 500 ? DSI_OUT_SERVER_ERROR
                                                                                     : DSI_OUT_CLIENT_ERROR;
    atomic_fetch_add(&s->metrics.outcomes[outcome], 1);
    enum MHD_Result ok = send_buf(mc, status, "application/json", b.p ? b.p : "", b.len, status == 429 || status == 503);
    dsi__sbuf_free(&b);
    return ok;
}

/* The streaming body: copies what the scheduler queued; suspends the
 * connection when there is nothing yet (returning 0 without suspending would
 * spin), and is resumed by dsi__conn_wake. */
static ssize_t stream_reader(void *cls, uint64_t pos, char *buf, size_t max) {
    dsi_conn *c = cls;
    pthread_mutex_lock(&c->mu);
    size_t avail = c->out.len - c->out_pos;
    ssize_t n = 0;
    if (avail > 0) {
        n = (ssize_t)DSI_MIN(avail, max);
        memcpy(buf, c->out.p + c->out_pos, n);
        c->out_pos += n;
        if (c->out_pos == c->out.len) { c->out_pos = 0; dsi__sbuf_reset(&c->out); }
    } else if (c->finished) {
        n = MHD_CONTENT_READER_END_OF_STREAM;
    } else {
        c->suspended = 1;
        MHD_suspend_connection(c->mc);
    }
    pthread_mutex_unlock(&c->mu);
    return n;
}

static void stream_free(void *cls) { dsi__conn_unref(cls); }

/* ---------------------------------------------------------------- generation */

static enum MHD_Result handle_generate(dsi_server *s, dsi_conn *c, int chat) {
    struct MHD_Connection *mc = c->mc;
    if (atomic_load(&s->draining)) return send_error(s, mc, 503, "the server is shutting down", NULL);
    if (c->too_large) {
        char msg[128];
        snprintf(msg, sizeof msg, "the request body exceeds the limit of %zu bytes", s->o.max_body_bytes);
        return send_error(s, mc, 413, msg, NULL);
    }
    char msg[512];
    const char *param = NULL;
    int st = dsi__api_parse(&s->api, c->body ? c->body : "", c->body_len, chat, &c->rq, msg, sizeof msg, &param);
    if (st) return send_error(s, mc, st, msg, param);
    dsi_api_req *r = &c->rq;
    snprintf(c->id, sizeof c->id, "%s-%016llx%06lx", chat ? "chatcmpl" : "cmpl", (unsigned long long)s->id_nonce,
             (unsigned long)atomic_fetch_add(&s->req_counter, 1));
    c->created = (long)time(NULL);
    if (dsi__conn_pipeline_init(c)) return send_error(s, mc, 500, "out of memory", NULL);

    dsi_request_params p = {.prompt = r->prompt, .n_prompt = (int)r->n_prompt, .max_tokens = r->max_tokens,
                            .sampling = r->sampling, .logprobs = r->logprobs, .top_logprobs = r->top_logprobs};
    if (!r->ignore_eos)
        for (int i = 0; i < s->api.n_eos; i++) p.stop_ids[p.n_stop_ids++] = s->api.eos_ids[i];
    c->t_start = dsi_now();
    dsi__billing_quote(s, c);
    atomic_fetch_add(&c->refs, 1); /* the scheduler's */
    dsi__conn_register(c);
    atomic_fetch_add(&s->metrics.in_flight, 1);
    /* /internal/decode: submitted once the prefill instance's KV has arrived */
    int rc = c->pd_xfer ? dsi__pd_await(c, &p) : dsi_sched_submit(s->sched, &p, dsi__conn_on_event, c, &c->sched_id);
    if (rc) {
        atomic_fetch_sub(&s->metrics.in_flight, 1);
        dsi__conn_unregister(c);
        atomic_fetch_sub(&c->refs, 1);
        int code = rc == DSI_EBUSY ? 429 : rc == DSI_ECANCELED ? 503 : rc == DSI_EINVAL ? 400 : 500;
        return send_error(s, mc, code, dsi_last_error(), NULL);
    }
    if (r->stream) {
        pthread_mutex_lock(&c->mu);
        c->state = DSI_CONN_STREAM;
        pthread_mutex_unlock(&c->mu);
        atomic_fetch_add(&c->refs, 1); /* the response's */
        struct MHD_Response *resp = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16384, stream_reader, c,
                                                                      stream_free);
        if (!resp) { dsi__conn_unref(c); return MHD_NO; }
        MHD_add_response_header(resp, "Content-Type", "text/event-stream");
        MHD_add_response_header(resp, "Cache-Control", "no-cache");
        enum MHD_Result ok = MHD_queue_response(mc, 200, resp);
        MHD_destroy_response(resp);
        return ok;
    }
    pthread_mutex_lock(&c->mu);
    c->state = DSI_CONN_WAIT;
    if (!c->finished) {
        c->suspended = 1;
        MHD_suspend_connection(mc);
    }
    pthread_mutex_unlock(&c->mu);
    return MHD_YES;
}

/* Called again after the scheduler resumed a non-streaming request. */
static enum MHD_Result handle_wait(dsi_server *s, dsi_conn *c) {
    pthread_mutex_lock(&c->mu);
    if (!c->finished) {
        c->suspended = 1;
        MHD_suspend_connection(c->mc);
        pthread_mutex_unlock(&c->mu);
        return MHD_YES;
    }
    c->state = DSI_CONN_DONE;
    pthread_mutex_unlock(&c->mu);
    return send_buf(c->mc, c->final_status, "application/json", c->out.p ? c->out.p : "", c->out.len, 0);
}

/* ---------------------------------------------------------------- routing */

static enum MHD_Result handle_get(dsi_server *s, dsi_conn *c, const char *url) {
    dsi_sbuf b = {0};
    enum MHD_Result ok;
    if (!strcmp(url, "/health")) {
        int d = atomic_load(&s->draining);
        dsi__sbuf_puts(&b, d ? "{\"status\":\"draining\"}" : "{\"status\":\"ok\"}");
        ok = send_buf(c->mc, d ? 503 : 200, "application/json", b.p, b.len, 0);
    } else if (!strcmp(url, "/v1/pricing")) {
        int st = dsi__billing_pricing_json(s, &b);
        ok = send_buf(c->mc, st, "application/json", b.p, b.len, 0);
    } else if (!strcmp(url, "/v1/models")) {
        dsi__api_models_json(&b, s->model_name, dsi_sched_max_model_len(s->sched), s->created);
        ok = send_buf(c->mc, 200, "application/json", b.p, b.len, 0);
    } else {
        dsi_sched_stats st;
        dsi_sched_get_stats(s->sched, &st);
        dsi__metrics_render(&s->metrics, &st, s->model_name, &b);
        ok = b.oom ? send_error(s, c->mc, 500, "out of memory", NULL)
                   : send_buf(c->mc, 200, "text/plain; version=0.0.4; charset=utf-8", b.p, b.len, 0);
    }
    dsi__sbuf_free(&b);
    return ok;
}

static int authorised(dsi_server *s, struct MHD_Connection *mc) {
    if (!s->o.api_key || !*s->o.api_key) return 1;
    const char *h = MHD_lookup_connection_value(mc, MHD_HEADER_KIND, "Authorization");
    return h && !strncmp(h, "Bearer ", 7) && !strcmp(h + 7, s->o.api_key);
}

static enum MHD_Result handler(void *cls, struct MHD_Connection *mc, const char *url, const char *method,
                               const char *version, const char *upload, size_t *upload_size, void **con_cls) {
    dsi_server *s = cls;
    dsi_conn *c = *con_cls;
    if (!c) {
        if (!(c = conn_new(s, mc))) return MHD_NO;
        *con_cls = c;
        /* libmicrohttpd decodes chunked bodies only; with any other coding it
         * waited for a body it would never take, and the client hung */
        const char *te = MHD_lookup_connection_value(mc, MHD_HEADER_KIND, "Transfer-Encoding");
        if (te && strcasecmp(te, "chunked")) {
            c->state = DSI_CONN_DONE;
            return send_error(s, mc, 501, "unsupported Transfer-Encoding (only chunked is)", NULL);
        }
        if (!strcmp(version, MHD_HTTP_VERSION_1_1) && !MHD_lookup_connection_value(mc, MHD_HEADER_KIND, "Host")) {
            c->state = DSI_CONN_DONE; /* RFC 9112 3.2: a server MUST answer 400 */
            return send_error(s, mc, 400, "an HTTP/1.1 request needs a Host header", NULL);
        }
        const char *cl = MHD_lookup_connection_value(mc, MHD_HEADER_KIND, "Content-Length");
        if (cl && strtoull(cl, NULL, 10) > s->o.max_body_bytes) {
            c->too_large = 1;
            return handle_generate(s, c, 0); /* answers 413 before reading the body */
        }
        return MHD_YES;
    }
    if (*upload_size) {
        size_t n = *upload_size;
        *upload_size = 0;
        if (c->too_large) return MHD_YES;
        if (c->body_len + n > s->o.max_body_bytes) {
            c->too_large = 1;
            free(c->body);
            c->body = NULL;
            c->body_len = 0;
            return MHD_YES;
        }
        char *nb = realloc(c->body, c->body_len + n + 1);
        if (!nb) return MHD_NO;
        memcpy(nb + c->body_len, upload, n);
        c->body = nb;
        c->body_len += n;
        c->body[c->body_len] = 0;
        return MHD_YES;
    }
    if (c->state == DSI_CONN_WAIT) return handle_wait(s, c);
    if (c->state != DSI_CONN_NEW) return MHD_YES;

    int is_get = !strcmp(method, "GET") || !strcmp(method, "HEAD"), is_post = !strcmp(method, "POST");
    int chat = !strcmp(url, "/v1/chat/completions"), compl = !strcmp(url, "/v1/completions");
    int get_route = !strcmp(url, "/health") || !strcmp(url, "/v1/models") || !strcmp(url, "/metrics") ||
                    !strcmp(url, "/v1/pricing");
    /* /internal/ paths too: they compute (prefill) and connect out (the decode
     * address a request names); the router sends the same key */
    if ((!strncmp(url, "/v1/", 4) || !strncmp(url, "/internal/", 10)) && !authorised(s, mc))
        return send_error(s, mc, 401, "missing or wrong API key (Authorization: Bearer ...)", NULL);
    if (chat || compl) {
        if (!is_post) return send_error(s, mc, 405, "use POST for this endpoint", NULL);
        return handle_generate(s, c, chat);
    }
    if (get_route) {
        if (!is_get) return send_error(s, mc, 405, "use GET for this endpoint", NULL);
        return handle_get(s, c, url);
    }
    if (!strcmp(url, "/internal/decode")) { /* prefill/decode disaggregation (kv_transfer.c) */
        if (!is_post) return send_error(s, mc, 405, "use POST for this endpoint", NULL);
        const char *api = MHD_lookup_connection_value(mc, MHD_GET_ARGUMENT_KIND, "api");
        const char *xfer = MHD_lookup_connection_value(mc, MHD_GET_ARGUMENT_KIND, "xfer");
        c->pd_xfer = xfer ? strtoull(xfer, NULL, 16) : 0;
        if (!c->pd_xfer || s->o.role == DSI_ROLE_PREFILL)
            return send_error(s, mc, 400, "/internal/decode needs xfer=ID and a decode or both role", NULL);
        return handle_generate(s, c, api && !strcmp(api, "chat"));
    }
    if (!strncmp(url, "/internal/", 10)) return (enum MHD_Result)dsi__pd_route(s, c, url, method);
    char msg[160];
    snprintf(msg, sizeof msg, "no such endpoint: %.100s", url);
    return send_error(s, mc, 404, msg, NULL);
}

/* MHD is done with a request (sent, failed, or the client went away). */
static void completed(void *cls, struct MHD_Connection *mc, void **con_cls, enum MHD_RequestTerminationCode toe) {
    dsi_server *s = cls;
    dsi_conn *c = *con_cls;
    if (!c) return;
    *con_cls = NULL;
    pthread_mutex_lock(&c->mu);
    int cancel = c->state != DSI_CONN_NEW && !c->finished && !c->cancel_sent;
    if (cancel) c->cancel_sent = 1;
    pthread_mutex_unlock(&c->mu);
    if (cancel) dsi_sched_cancel(s->sched, c->sched_id);
    dsi__conn_unref(c);
}

/* ---------------------------------------------------------------- start / stop */

/* MHD's messages (a client that went away mid-stream, ...) are routine for a
 * server: debug level. Failures that matter reach the caller as statuses. */
static void mhd_log(void *cls, const char *fmt, va_list ap) {
    char msg[512];
    vsnprintf(msg, sizeof msg, fmt, ap);
    size_t n = strlen(msg);
    while (n && msg[n - 1] == '\n') msg[--n] = 0;
    DSI_LOG_DEBUG("http: %s", msg);
}

static void ep_metrics(void *ctx, void (*write)(void *w, const char *text, size_t len), void *w) {
    char buf[65536];
    int n = dsi_ep_write_eplb_metrics(ctx, buf, sizeof buf);
    if (n > 0) write(w, buf, (size_t)n);
}

/* A failed collective leaves the EP group out of step, so every rank must
 * end (mpirun then exits non-zero). Not at once: the scheduler first
 * finishes the requests of the failed step, and of any step after it, with
 * the reason (an error event, or a 500), and their answers get
 * EP_ABORT_GRACE_S to reach the clients before the group ends. Followers
 * that see the failure wait as long, so that rank 0 gets its grace too.
 * One EP group per process (MPI_COMM_WORLD): the state is global. */
#define EP_ABORT_GRACE_S 2
static atomic_int g_ep_failed;
static char g_ep_failure[512];

static void *ep_abort_later(void *arg) {
    (void)arg;
    sleep(EP_ABORT_GRACE_S);
    dsi_ep_abort(1);
    return NULL;
}

/* A scheduler step across the EP group; after a failure, no collective
 * again (the thread that ends the group may be inside MPI_Abort). */
static int ep_step(void *ctx, const dsi_seq_step *seqs, int n) {
    if (atomic_load(&g_ep_failed)) return dsi_error(DSI_EPEER, "%s", g_ep_failure);
    int rc = dsi_ep_step(ctx, seqs, n);
    if (rc != DSI_OK) {
        snprintf(g_ep_failure, sizeof g_ep_failure, "expert parallelism failed: %s", dsi_last_error());
        atomic_store(&g_ep_failed, 1);
        DSI_LOG_ERROR("%s; failing the requests in flight, then ending the group in %d s", g_ep_failure,
                      EP_ABORT_GRACE_S);
        pthread_t t;
        if (pthread_create(&t, NULL, ep_abort_later, NULL)) dsi_ep_abort(1);
        pthread_detach(t);
        return dsi_error(rc, "%s", g_ep_failure);
    }
    return rc;
}

static int open_model(dsi_server *s) {
    const dsi_server_opts *o = &s->o;
    int rc;
    if (o->model_dir) {
        if ((rc = dsi_model_load(o->model_dir, NULL, &s->model))) return rc;
        if ((rc = dsi_tokenizer_load(o->model_dir, &s->tok))) return dsi_error_prefix(rc, "%s", o->model_dir);
        const char *base = o->model_dir, *p;
        size_t n = strlen(base);
        while (n > 1 && base[n - 1] == '/') n--;
        for (p = base + n; p > base && p[-1] != '/'; p--) {}
        snprintf(s->model_name, sizeof s->model_name, "%.*s", (int)(base + n - p), p);
    } else {
        dsi_config c;
        dsi_config_preset(DSI_PRESET_TINY, 0, 1, &c);
        if ((rc = dsi_make_model_memory(&c, DEMO_SEED, &s->model))) return rc;
        if ((rc = dsi_tokenizer_load_json((const char *)dsi_demo_tokenizer_json, dsi_demo_tokenizer_json_len,
                                          (const char *)dsi_demo_tokenizer_config_json,
                                          dsi_demo_tokenizer_config_json_len, &s->tok)))
            return dsi_error_prefix(rc, "built-in tokenizer");
        snprintf(s->model_name, sizeof s->model_name, "%s", DEMO_NAME);
    }
    if (o->served_model_name && *o->served_model_name)
        snprintf(s->model_name, sizeof s->model_name, "%s", o->served_model_name);
    const dsi_config *cfg = dsi_model_config(s->model);
    size_t block_bytes = (size_t)cfg->n_layers * DSI_KV_BLOCK_TOKENS * dsi_config_kv_dim(cfg) * sizeof(float);
    int blocks = o->kv_blocks;
    if (blocks <= 0) blocks = (int)DSI_MIN(1 << 22, (o->kv_cache_gb * (1 << 30)) / block_bytes);
    if (blocks < 4) blocks = 4;
    if ((rc = dsi_kv_pool_create(cfg->n_layers, dsi_config_kv_dim(cfg), DSI_KV_BLOCK_TOKENS, blocks, &s->kv)))
        return rc;
    dsi_engine_opts eo = {.n_threads = o->threads, .max_tokens = o->max_num_batched_tokens,
                          .batch_invariant = o->batch_invariant, .moe_io = o->moe_io};
    if ((rc = dsi_engine_create(s->model, s->kv, &eo, &s->engine))) return rc;
    if (o->kv_disk.dir && *o->kv_disk.dir) {
        if ((rc = dsi_kvdisk_open(&o->kv_disk, dsi_model_fingerprint(s->model), cfg->n_layers, dsi_config_kv_dim(cfg),
                                  DSI_KV_BLOCK_TOKENS, &s->disk)))
            return rc;
        dsi_server_add_metrics_hook(s, dsi_kvdisk_write_metrics, s->disk);
    }
    if (dsi_ep_launched()) {
        if ((rc = dsi_ep_init()) || (rc = dsi_ep_create(s->engine, o->ep, &s->ep)))
            return dsi_error_prefix(rc, "expert parallelism");
        dsi_server_add_metrics_hook(s, ep_metrics, s->ep); /* EPLB balancedness before/after */
    }
    dsi_sched_opts so = {.max_num_seqs = o->max_num_seqs, .max_batched_tokens = o->max_num_batched_tokens,
                         .max_queue = o->max_queue, .max_model_len = o->max_model_len,
                         .no_prefix_cache = o->no_prefix_cache, .step_fn = s->ep ? ep_step : NULL,
                         .step_ctx = s->ep, .heartbeat_s = s->ep ? 1.0 : 0,
                         .disk = s->disk};
    if ((rc = dsi_sched_create(s->engine, &so, &s->sched))) return rc;
    s->api.tok = s->tok;
    s->api.model_name = s->model_name;
    s->api.vocab = cfg->vocab_size;
    s->api.max_model_len = dsi_sched_max_model_len(s->sched);
    s->api.default_max_tokens = o->default_max_tokens;
    int32_t eos[DSI_MAX_EOS_IDS + 1];
    int n = 0;
    if (cfg->n_eos_token_ids > 0)
        for (int i = 0; i < cfg->n_eos_token_ids; i++) eos[n++] = cfg->eos_token_ids[i];
    else
        eos[n++] = cfg->eos_token_id;
    eos[n++] = dsi_tokenizer_eos_id(s->tok);
    _Static_assert(DSI_MAX_EOS_IDS + 1 <= DSI_SCHED_MAX_STOP_IDS, "every eos id is a stop id");
    for (int i = 0; i < n; i++) {
        int seen = 0;
        for (int j = 0; j < s->api.n_eos; j++) seen |= s->api.eos_ids[j] == eos[i];
        if (eos[i] >= 0 && eos[i] < cfg->vocab_size && !seen) s->api.eos_ids[s->api.n_eos++] = eos[i];
    }
    return DSI_OK;
}

static int bind_addr(const char *host, int port, struct sockaddr_storage *ss, int *v6) {
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE}, *res;
    char ps[16];
    snprintf(ps, sizeof ps, "%d", port);
    int e = getaddrinfo(host, ps, &hints, &res);
    if (e) return dsi_error(DSI_EINVAL, "cannot resolve host '%s': %s", host, gai_strerror(e));
    memcpy(ss, res->ai_addr, res->ai_addrlen);
    *v6 = res->ai_family == AF_INET6;
    freeaddrinfo(res);
    return DSI_OK;
}

static void server_free(dsi_server *s) {
    dsi__pd_stop(s); /* parked decode requests finish (their connections resume) before MHD stops */
    if (s->mhd) MHD_stop_daemon(s->mhd);
    if (s->watchdog_started) {
        atomic_store(&s->watchdog_stop, 1);
        pthread_join(s->watchdog, NULL);
    }
    dsi_sched_destroy(s->sched); /* waits for its disk loads and writes */
    dsi__pd_free(s);
    dsi_kvdisk_close(s->disk);
    if (s->ep && atomic_load(&g_ep_failed)) {
        /* the group is out of step: no collective, no MPI_Finalize; ep_abort_later ends it */
        pause();
    } else if (s->ep) {
        /* the scheduler thread has stopped: release the other ranks */
        if (!s->ep_released && dsi_ep_idle(s->ep) != DSI_OK) DSI_LOG_ERROR("expert parallelism: %s", dsi_last_error());
        dsi_ep_destroy(s->ep);
        dsi_ep_finalize();
    }
    dsi_engine_destroy(s->engine);
    dsi_kv_pool_destroy(s->kv);
    dsi_model_destroy(s->model);
    dsi_tokenizer_destroy(s->tok);
    dsi__billing_stop(s);
    dsi__metrics_destroy(&s->metrics);
    pthread_mutex_destroy(&s->reg_mu);
    free(s);
}

static void apply_defaults(dsi_server_opts *o) {
    if (!o->host) o->host = "127.0.0.1";
    if (o->kv_cache_gb <= 0) o->kv_cache_gb = 0.5;
    if (o->max_num_batched_tokens <= 0) o->max_num_batched_tokens = 512;
    if (o->max_body_bytes == 0) o->max_body_bytes = 8u << 20;
    if (o->default_max_tokens <= 0) o->default_max_tokens = 4096;
    if (o->http_threads <= 0) o->http_threads = 2;
}

int dsi_server_follow(const dsi_server_opts *opts) {
    dsi_server *s = calloc(1, sizeof *s);
    if (!s) return dsi_error(DSI_ENOMEM, "out of memory");
    s->o = opts ? *opts : dsi_server_default_opts();
    apply_defaults(&s->o);
    s->o.kv_disk.dir = NULL; /* rank 0's scheduler alone reads and writes the disk KV tier */
    pthread_mutex_init(&s->reg_mu, NULL);
    dsi__metrics_init(&s->metrics);
    int rc = open_model(s);
    if (!rc && !s->ep) rc = dsi_error(DSI_EINVAL, "serve: following needs an EP group (mpirun with several ranks)");
    if (!rc) {
        rc = dsi_ep_idle(s->ep);
        s->ep_released = rc == DSI_OK;
        if (rc) {
            DSI_LOG_ERROR("expert parallelism: %s; ending the group in %d s", dsi_last_error(), EP_ABORT_GRACE_S);
            sleep(EP_ABORT_GRACE_S); /* rank 0's answers to its clients first (see ep_step) */
            dsi_ep_abort(1);
        }
    }
    server_free(s);
    return rc;
}

/* A random 64-bit value per server instance. Response ids were the start
 * second plus a counter, so decode instances started in the same second
 * (behind one router) handed out the same ids. Without getrandom(2) (old
 * kernel, or entropy not ready at boot) time, pid and a per-process count
 * still separate instances, mixed so ids do not reveal them. */
static uint64_t id_nonce(void) {
    uint64_t v = 0;
    if (getrandom(&v, sizeof v, GRND_NONBLOCK) == (ssize_t)sizeof v) return v;
    static atomic_ulong n_started;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    v = ((uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec) ^ ((uint64_t)getpid() << 32) ^
        ((uint64_t)atomic_fetch_add(&n_started, 1) << 48);
    v += 0x9e3779b97f4a7c15ull; /* splitmix64's finaliser */
    v = (v ^ (v >> 30)) * 0xbf58476d1ce4e5b9ull;
    v = (v ^ (v >> 27)) * 0x94d049bb133111ebull;
    return v ^ (v >> 31);
}

int dsi_server_start(const dsi_server_opts *opts, dsi_server **out) {
    *out = NULL;
    dsi_server *s = calloc(1, sizeof *s);
    if (!s) return dsi_error(DSI_ENOMEM, "out of memory");
    s->o = opts ? *opts : dsi_server_default_opts();
    dsi_server_opts *o = &s->o;
    apply_defaults(o);
    if (o->port < 0 || o->port > 65535) {
        int port = o->port;
        free(s);
        return dsi_error(DSI_EINVAL, "bad port %d", port);
    }
    s->created = (long)time(NULL);
    s->id_nonce = id_nonce();
    pthread_mutex_init(&s->reg_mu, NULL);
    dsi__metrics_init(&s->metrics);
    int rc = open_model(s);
    if (!rc) rc = dsi__billing_start(s);
    struct sockaddr_storage ss;
    int v6 = 0;
    if (!rc) rc = bind_addr(o->host, o->port, &ss, &v6);
    if (!rc) rc = dsi__pd_start(s);
    if (!rc) rc = dsi_sched_start(s->sched);
    if (rc) { server_free(s); return rc; }
    unsigned flags = MHD_USE_AUTO_INTERNAL_THREAD | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ITC | MHD_USE_ERROR_LOG |
                     (v6 ? MHD_USE_IPv6 : 0);
    s->mhd = MHD_start_daemon(flags, 0, NULL, NULL, handler, s, MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&ss,
                              MHD_OPTION_THREAD_POOL_SIZE, (unsigned)o->http_threads,
                              MHD_OPTION_NOTIFY_COMPLETED, completed, s, MHD_OPTION_CONNECTION_TIMEOUT, 300u,
                              MHD_OPTION_CONNECTION_LIMIT, 4096u,
                              MHD_OPTION_EXTERNAL_LOGGER, mhd_log, NULL, MHD_OPTION_END);
    if (!s->mhd) {
        rc = dsi_error(DSI_EIO, "cannot listen on %s:%d (%s)", o->host, o->port, errno ? strerror(errno) : "libmicrohttpd");
        server_free(s);
        return rc;
    }
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(s->mhd, MHD_DAEMON_INFO_BIND_PORT);
    s->port = di ? di->port : o->port;
    if (pthread_create(&s->watchdog, NULL, watchdog, s) == 0) s->watchdog_started = 1;
    *out = s;
    return DSI_OK;
}

int dsi_server_port(const dsi_server *s) { return s->port; }
const char *dsi_server_model_name(const dsi_server *s) { return s->model_name; }

int dsi_server_add_metrics_hook(dsi_server *s, dsi_metrics_hook fn, void *ctx) {
    if (s->metrics.n_hooks >= 8) return dsi_error(DSI_ERANGE, "too many metrics hooks");
    s->metrics.hook_ctx[s->metrics.n_hooks] = ctx;
    s->metrics.hooks[s->metrics.n_hooks++] = fn;
    return DSI_OK;
}

int dsi_server_add_request_hook(dsi_server *s, dsi_request_hook fn, void *ctx) {
    dsi_server_metrics *m = &s->metrics;
    if (m->n_req_hooks >= 8) return dsi_error(DSI_ERANGE, "too many request hooks");
    m->req_hook_ctx[m->n_req_hooks] = ctx;
    m->req_hooks[m->n_req_hooks++] = fn;
    return DSI_OK;
}

void dsi_server_stop(dsi_server *s, double drain_timeout_s) {
    if (!s) return;
    atomic_store(&s->draining, 1);
    MHD_socket lfd = MHD_quiesce_daemon(s->mhd); /* no new connections from here on */
    if (lfd != MHD_INVALID_SOCKET) close(lfd);
    /* in-flight requests finish (or are cancelled at the deadline); every
     * suspended connection is resumed by its FINISH */
    double t0 = dsi_now();
    dsi__pd_wait_parked(s, drain_timeout_s); /* decode role: KV on its way still makes it in */
    dsi_sched_stop(s->sched, drain_timeout_s > 0, DSI_MAX(0.0, drain_timeout_s - (dsi_now() - t0)));
    dsi__pd_stop(s); /* what is still parked finishes with an error before MHD flushes */
    /* let MHD send what the finished requests queued */
    double end = dsi_now() + 5.0;
    while (atomic_load(&s->n_conns) > 0 && dsi_now() < end) {
        struct timespec ts = {0, 10 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    server_free(s);
}
