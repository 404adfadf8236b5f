/* The instance endpoints a router uses (behind --api-key when one is set: the
 * router sends its own --api-key, so give both the same key; without one,
 * bind instances to a private network):
 *   GET  /internal/load                 live load, role, KV port (the heartbeat)
 *   POST /internal/match?api=A          OpenAI body -> prompt length and how many
 *                                        leading prompt tokens this instance holds
 *   POST /internal/prefill?api=A&xfer=X&decode=HOST:PORT
 *                                        compute the prompt's KV and first token,
 *                                        push the KV to the decode instance
 *   POST /internal/decode?api=A&xfer=X  (server.c) decode once KV X arrives
 * A is "completions" or "chat". */
#include "server/server_impl.h"

#include <microhttpd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int reply(struct MHD_Connection *mc, int status, dsi_sbuf *b) {
    struct MHD_Response *r = MHD_create_response_from_buffer(b->len, b->p ? b->p : (void *)"", MHD_RESPMEM_MUST_COPY);
    if (!r) return MHD_NO;
    MHD_add_response_header(r, "Content-Type", "application/json");
    enum MHD_Result ok = MHD_queue_response(mc, status, r);
    MHD_destroy_response(r);
    return ok;
}

static int reply_error(struct MHD_Connection *mc, int status, const char *msg) {
    dsi_sbuf b = {0};
    dsi__api_error_json(&b, status, msg, NULL);
    int ok = reply(mc, status, &b);
    dsi__sbuf_free(&b);
    return ok;
}

static const char *role_name(int role) {
    return role == DSI_ROLE_PREFILL ? "prefill" : role == DSI_ROLE_DECODE ? "decode" : "both";
}

static int handle_load(dsi_server *s, dsi_conn *c) {
    dsi_sched_stats st;
    dsi_sched_get_stats(s->sched, &st);
    dsi_sbuf b = {0};
    dsi__sbuf_printf(&b,
                     "{\"role\":\"%s\",\"draining\":%d,\"running\":%d,\"waiting\":%d,\"in_flight\":%d,"
                     "\"kv_blocks_total\":%d,\"kv_blocks_used\":%d,\"kv_tokens\":%lld,\"block_tokens\":%d,"
                     "\"kv_port\":%d,\"max_num_seqs\":%d,\"prompt_tokens\":%llu,\"computed_tokens\":%llu,"
                     "\"model\":",
                     role_name(s->o.role), atomic_load(&s->draining), st.n_running, st.n_waiting,
                     atomic_load(&s->metrics.in_flight), st.kv_blocks_total, st.kv_blocks_used,
                     (long long)st.kv_blocks_used * DSI_KV_BLOCK_TOKENS, DSI_KV_BLOCK_TOKENS, dsi__pd_kv_port(s),
                     s->o.max_num_seqs > 0 ? s->o.max_num_seqs : 64, (unsigned long long)st.prompt_tokens,
                     (unsigned long long)st.computed_tokens);
    dsi__sbuf_json_str(&b, s->model_name, strlen(s->model_name));
    dsi__sbuf_puts(&b, "}");
    int ok = b.oom ? reply_error(c->mc, 500, "out of memory") : reply(c->mc, 200, &b);
    dsi__sbuf_free(&b);
    return ok;
}

/* Parses the OpenAI body into c->rq; on failure answers and returns 0. */
static int parse(dsi_server *s, dsi_conn *c, int *answered) {
    const char *api = MHD_lookup_connection_value(c->mc, MHD_GET_ARGUMENT_KIND, "api");
    int chat = api && !strcmp(api, "chat");
    char msg[512];
    const char *param = NULL;
    int st = dsi__api_parse(&s->api, c->body ? c->body : "", c->body_len, chat, &c->rq, msg, sizeof msg, &param);
    if (!st) return 1;
    dsi_sbuf b = {0};
    dsi__api_error_json(&b, st, msg, param);
    *answered = reply(c->mc, st, &b);
    dsi__sbuf_free(&b);
    return 0;
}

static int handle_match(dsi_server *s, dsi_conn *c) {
    int ans;
    if (!parse(s, c, &ans)) return ans;
    int n = (int)c->rq.n_prompt;
    uint64_t *h = malloc(sizeof(uint64_t) * (n / DSI_KV_BLOCK_TOKENS + 1));
    if (!h) return reply_error(c->mc, 500, "out of memory");
    int nh = dsi__pd_prompt_hashes(s, c->rq.prompt, n, h);
    int held = dsi__pd_held_blocks(s, h, nh);
    free(h);
    dsi_sbuf b = {0};
    dsi__sbuf_printf(&b, "{\"n_prompt\":%d,\"cached_tokens\":%d,\"max_tokens\":%d,\"stream\":%s}", n,
                     held * DSI_KV_BLOCK_TOKENS, c->rq.max_tokens, c->rq.stream ? "true" : "false");
    int ok = reply(c->mc, 200, &b);
    dsi__sbuf_free(&b);
    return ok;
}

static int handle_prefill(dsi_server *s, dsi_conn *c) {
    if (s->o.role == DSI_ROLE_DECODE) return reply_error(c->mc, 400, "this instance has role decode");
    if (atomic_load(&s->draining)) return reply_error(c->mc, 503, "the server is shutting down");
    const char *dec = MHD_lookup_connection_value(c->mc, MHD_GET_ARGUMENT_KIND, "decode");
    const char *xs = MHD_lookup_connection_value(c->mc, MHD_GET_ARGUMENT_KIND, "xfer");
    uint64_t xfer = xs ? strtoull(xs, NULL, 16) : 0;
    if (!dec || !xfer) return reply_error(c->mc, 400, "/internal/prefill needs decode=HOST:PORT and xfer=ID");
    int ans;
    if (!parse(s, c, &ans)) return ans;
    int rc = dsi__pd_prefill(c, dec, xfer);
    if (rc) {
        int code = rc == DSI_EBUSY ? 429 : rc == DSI_ECANCELED ? 503 : rc == DSI_EINVAL ? 400 : 502;
        return reply_error(c->mc, code, dsi_last_error());
    }
    pthread_mutex_lock(&c->mu);
    if (!c->finished) {
        c->suspended = 1;
        MHD_suspend_connection(c->mc);
        pthread_mutex_unlock(&c->mu);
        return MHD_YES;
    }
    c->state = DSI_CONN_DONE;
    pthread_mutex_unlock(&c->mu);
    return reply(c->mc, c->final_status, &c->out);
}

int dsi__pd_route(dsi_server *s, dsi_conn *c, const char *url, const char *method) {
    int is_post = !strcmp(method, "POST");
    if (!strcmp(url, "/internal/load")) {
        int is_get = !strcmp(method, "GET") || !strcmp(method, "HEAD");
        return is_get ? handle_load(s, c) : reply_error(c->mc, 405, "use GET for this endpoint");
    }
    int match = !strcmp(url, "/internal/match"), prefill = !strcmp(url, "/internal/prefill");
    if ((match || prefill) && !is_post) return reply_error(c->mc, 405, "use POST for this endpoint");
    if (match) return handle_match(s, c);
    if (prefill) return handle_prefill(s, c);
    return reply_error(c->mc, 404, "no such internal endpoint");
}

int dsi_server_role_parse(const char *s) {
    if (!s) return -1;
    if (!strcmp(s, "both")) return DSI_ROLE_BOTH;
    if (!strcmp(s, "prefill")) return DSI_ROLE_PREFILL;
    if (!strcmp(s, "decode")) return DSI_ROLE_DECODE;
    return -1;
}

int dsi_server_kv_port(const dsi_server *s) { return dsi__pd_kv_port(s); }
