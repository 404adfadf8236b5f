/* Router policies: the prefill and decode load balancers (unit cases and a
 * deterministic simulation on mixed-length workloads against round-robin),
 * the health state machine, the autoscaler, the KV-transfer hint set and the
 * router's HTTP client against a tiny in-test server. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "dsinfer/pd.h"
#include "dsinfer/router.h"
#include "router/router_impl.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* ---------------------------------------------------------------- LB unit cases */

static void test_attn_work(void **st) {
    (void)st;
    assert_true(dsi_lb_attn_work(0, 100) == 100 * 50.0);
    assert_true(dsi_lb_attn_work(1000, 10) == 10 * 1005.0);
    assert_true(dsi_lb_attn_work(5, 0) == 0);
}

static void test_prefill_prefers_prefix_holder(void **st) {
    (void)st;
    dsi_lb_inst p[3] = {{.eligible = 1}, {.eligible = 1}, {.eligible = 1}};
    p[2].cached_tokens = 1024;
    assert_int_equal(dsi_lb_pick_prefill(p, 3, 1100), 2); /* idle pool: the holder */
    /* ... unless it is already the busiest by far */
    p[2].attn_load = 5e7;
    p[2].input_tokens = 20000;
    p[0].attn_load = p[1].attn_load = 1e5;
    p[0].input_tokens = p[1].input_tokens = 500;
    int i = dsi_lb_pick_prefill(p, 3, 1100);
    assert_true(i == 0 || i == 1);
    /* the lighter of two instances without the prefix */
    p[0].attn_load = 2e5;
    assert_int_equal(dsi_lb_pick_prefill(p, 3, 1100), 1);
    /* ineligible instances are never picked; none eligible -> -1 */
    p[1].eligible = 0;
    assert_int_equal(dsi_lb_pick_prefill(p, 3, 1100), 0);
    p[0].eligible = p[2].eligible = 0;
    assert_int_equal(dsi_lb_pick_prefill(p, 3, 1100), -1);
}

static void test_prefill_balances_tokens_too(void **st) {
    (void)st;
    /* equal attention work, unequal input tokens: the one with fewer tokens */
    dsi_lb_inst p[2] = {{.eligible = 1, .attn_load = 1e6, .input_tokens = 4000},
                        {.eligible = 1, .attn_load = 1e6, .input_tokens = 1000}};
    assert_int_equal(dsi_lb_pick_prefill(p, 2, 200), 1);
}

static void test_decode_lb(void **st) {
    (void)st;
    dsi_lb_inst d[3] = {{.eligible = 1, .kv_tokens = 9000, .n_requests = 3},
                        {.eligible = 1, .kv_tokens = 1000, .n_requests = 3},
                        {.eligible = 1, .kv_tokens = 5000, .n_requests = 3}};
    assert_int_equal(dsi_lb_pick_decode(d, 3, 500), 1);
    /* equal KV, fewer requests wins */
    d[0].kv_tokens = d[1].kv_tokens = d[2].kv_tokens = 4000;
    d[2].n_requests = 1;
    assert_int_equal(dsi_lb_pick_decode(d, 3, 500), 2);
    d[2].eligible = 0;
    int i = dsi_lb_pick_decode(d, 3, 500);
    assert_true(i == 0 || i == 1);
    unsigned cur = 0;
    assert_int_equal(dsi_lb_pick_round_robin(d, 3, &cur), 0);
    assert_int_equal(dsi_lb_pick_round_robin(d, 3, &cur), 1);
    assert_int_equal(dsi_lb_pick_round_robin(d, 3, &cur), 0); /* 2 is ineligible */
}

/* ---------------------------------------------------------------- the simulation */

static uint64_t rng_next(uint64_t *s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static int uniform(uint64_t *s, int lo, int hi) { return lo + (int)(rng_next(s) % (uint64_t)(hi - lo + 1)); }

#define SIM_P 4
#define SIM_N 4000
#define SIM_QMAX SIM_N

typedef struct simq {
    double w[SIM_QMAX], t[SIM_QMAX]; /* FIFO of (remaining attention work, input tokens) */
    int head, tail;
    double load_w, load_t, assigned_w, assigned_t;
} simq;

/* Requests arrive one per tick; each prefill instance works off its queue at
 * the same rate (attention work per tick), so the loads the balancer sees
 * are live: what was routed and is not done yet. The workload is mixed: a
 * quarter long prompts (2000-6000 tokens), the rest short (64-512); in the
 * "jobs" order each long prompt is followed by three short ones (a client
 * that sends a document and then its questions), in the "iid" order the kind
 * is drawn per request. Returns busiest/mean of the core-attention work each
 * instance received over the run (and of input tokens in *tok_ratio). */
static double simulate(int use_lb, int jobs, double *tok_ratio) {
    static simq q[SIM_P];
    memset(q, 0, sizeof q);
    uint64_t seed = 20250227;
    int lens[SIM_N];
    double mean_w = 0;
    for (int i = 0; i < SIM_N; i++) {
        int is_long = jobs ? i % 4 == 0 : rng_next(&seed) % 4 == 0;
        lens[i] = is_long ? uniform(&seed, 2000, 6000) : uniform(&seed, 64, 512);
        mean_w += dsi_lb_attn_work(0, lens[i]) / SIM_N;
    }
    double rate = mean_w / (0.9 * SIM_P); /* the pool runs at 90% utilisation */
    unsigned cursor = 0;
    for (int i = 0; i < SIM_N; i++) {
        dsi_lb_inst li[SIM_P];
        for (int k = 0; k < SIM_P; k++)
            li[k] = (dsi_lb_inst){.eligible = 1, .attn_load = q[k].load_w, .input_tokens = q[k].load_t};
        int k = use_lb ? dsi_lb_pick_prefill(li, SIM_P, lens[i]) : dsi_lb_pick_round_robin(li, SIM_P, &cursor);
        double w = dsi_lb_attn_work(0, lens[i]);
        q[k].w[q[k].tail] = w;
        q[k].t[q[k].tail++] = lens[i];
        q[k].load_w += w;
        q[k].load_t += lens[i];
        q[k].assigned_w += w;
        q[k].assigned_t += lens[i];
        for (int j = 0; j < SIM_P; j++) { /* one tick of work */
            double budget = rate;
            while (budget > 0 && q[j].head < q[j].tail) {
                double d = DSI_MIN(budget, q[j].w[q[j].head]);
                q[j].w[q[j].head] -= d;
                q[j].load_w -= d;
                budget -= d;
                if (q[j].w[q[j].head] <= 0) q[j].load_t -= q[j].t[q[j].head++];
            }
        }
    }
    double mw = 0, xw = 0, mt = 0, xt = 0;
    for (int k = 0; k < SIM_P; k++) {
        mw += q[k].assigned_w / SIM_P;
        mt += q[k].assigned_t / SIM_P;
        xw = DSI_MAX(xw, q[k].assigned_w);
        xt = DSI_MAX(xt, q[k].assigned_t);
    }
    *tok_ratio = xt / mt;
    return xw / mw;
}

static void test_lb_simulation(void **st) {
    (void)st;
    double t_lb, t_rr, t_lb2, t_rr2;
    double lb = simulate(1, 1, &t_lb), rr = simulate(0, 1, &t_rr);
    double lb2 = simulate(1, 0, &t_lb2), rr2 = simulate(0, 0, &t_rr2);
    printf("prefill LB simulation, %d instances, %d requests (25%% long 2000-6000 tokens, 75%% short 64-512), 90%% load\n",
           SIM_P, SIM_N);
    printf("  busiest/mean core-attention load   jobs order: LB %.3f  round-robin %.3f\n", lb, rr);
    printf("  busiest/mean input tokens          jobs order: LB %.3f  round-robin %.3f\n", t_lb, t_rr);
    printf("  busiest/mean core-attention load   iid order:  LB %.3f  round-robin %.3f\n", lb2, rr2);
    printf("  busiest/mean input tokens          iid order:  LB %.3f  round-robin %.3f\n", t_lb2, t_rr2);
    assert_true(lb <= 1.1);
    assert_true(rr >= 1.5);
    assert_true(t_lb <= 1.1);
    assert_true(lb2 <= 1.1);
    assert_true(lb2 <= rr2);
}

/* ---------------------------------------------------------------- health, autoscaler */

static void test_health(void **st) {
    (void)st;
    dsi_health h = {0};
    assert_false(dsi_health_routable(&h)); /* joining: not yet */
    assert_true(dsi_health_observe(&h, 1, 1.0, 3));
    assert_int_equal(h.state, DSI_INST_UP);
    assert_true(dsi_health_observe(&h, 0, 1.2, 3));
    assert_int_equal(h.state, DSI_INST_SUSPECT);
    assert_true(dsi_health_routable(&h));
    assert_false(dsi_health_observe(&h, 0, 1.4, 3));
    assert_true(dsi_health_observe(&h, 0, 1.6, 3)); /* third miss */
    assert_int_equal(h.state, DSI_INST_DEAD);
    assert_false(dsi_health_routable(&h));
    assert_false(dsi_health_observe(&h, 0, 1.8, 3));
    assert_true(dsi_health_observe(&h, 1, 2.0, 3)); /* it came back */
    assert_int_equal(h.state, DSI_INST_UP);
    assert_int_equal(h.misses, 0);
    assert_string_equal(dsi_inst_state_name(DSI_INST_DEAD), "dead");
}

static void test_autoscaler(void **st) {
    (void)st;
    dsi_autoscale_policy p = {.up_util = 0.8, .down_util = 0.3, .hold_s = 2, .cooldown_s = 5, .min_instances = 1,
                              .max_instances = 4};
    dsi_autoscale_state s;
    dsi_autoscale_init(&s);
    assert_int_equal(dsi_autoscale_decide(&p, &s, 0, 0.9, 2, 2), 0);   /* must stay high for hold_s */
    assert_int_equal(dsi_autoscale_decide(&p, &s, 1, 0.9, 2, 2), 0);
    assert_int_equal(dsi_autoscale_decide(&p, &s, 2.5, 0.9, 2, 2), 1); /* up */
    assert_int_equal(dsi_autoscale_decide(&p, &s, 3, 0.95, 3, 1), 0);  /* cooldown */
    assert_int_equal(dsi_autoscale_decide(&p, &s, 6, 0.95, 3, 0), 0);  /* no standby left */
    /* the band between the thresholds changes nothing (hysteresis) */
    for (double t = 10; t < 30; t += 1) assert_int_equal(dsi_autoscale_decide(&p, &s, t, 0.5, 3, 1), 0);
    /* a dip shorter than hold_s does nothing; a long one scales down */
    assert_int_equal(dsi_autoscale_decide(&p, &s, 30, 0.1, 3, 1), 0);
    assert_int_equal(dsi_autoscale_decide(&p, &s, 31, 0.5, 3, 1), 0);
    assert_int_equal(dsi_autoscale_decide(&p, &s, 32, 0.1, 3, 1), 0);
    assert_int_equal(dsi_autoscale_decide(&p, &s, 34.5, 0.1, 3, 1), -1);
    /* never below min_instances */
    dsi_autoscale_init(&s);
    assert_int_equal(dsi_autoscale_decide(&p, &s, 0, 0.0, 1, 3), 0);
    assert_int_equal(dsi_autoscale_decide(&p, &s, 10, 0.0, 1, 3), 0);
}

/* ---------------------------------------------------------------- hint set, address parsing */

static void test_hashset(void **st) {
    (void)st;
    dsi_pd_hashset *h;
    assert_int_equal(dsi_pd_hashset_create(4, &h), DSI_OK);
    uint64_t chain[5] = {11, 22, 0, 44, 55};
    for (int i = 0; i < 3; i++) dsi_pd_hashset_add(h, chain[i]);
    assert_int_equal(dsi_pd_hashset_leading(h, chain, 5), 3);
    dsi_pd_hashset_add(h, 44);
    dsi_pd_hashset_add(h, 55); /* capacity 4: 11 is forgotten */
    assert_false(dsi_pd_hashset_contains(h, 11));
    assert_true(dsi_pd_hashset_contains(h, 55));
    assert_int_equal(dsi_pd_hashset_leading(h, chain, 5), 0);
    for (int i = 0; i < 100; i++) dsi_pd_hashset_add(h, 1000 + i % 7);
    assert_true(dsi_pd_hashset_contains(h, 1000 + 99 % 7));
    assert_false(dsi_pd_hashset_contains(h, 22));
    dsi_pd_hashset_destroy(h);
    assert_int_not_equal(dsi_pd_hashset_create(0, &h), DSI_OK);

    char host[64];
    int port;
    assert_int_equal(dsi_pd_split_hostport("http://127.0.0.1:8001", host, sizeof host, &port), DSI_OK);
    assert_string_equal(host, "127.0.0.1");
    assert_int_equal(port, 8001);
    assert_int_equal(dsi_pd_split_hostport("[::1]:9", host, sizeof host, &port), DSI_OK);
    assert_string_equal(host, "::1");
    assert_int_not_equal(dsi_pd_split_hostport("localhost", host, sizeof host, &port), DSI_OK);
    assert_int_not_equal(dsi_pd_split_hostport("h:99999", host, sizeof host, &port), DSI_OK);
    assert_int_not_equal(dsi_pd_split_hostport("h:", host, sizeof host, &port), DSI_OK);
}

/* ---------------------------------------------------------------- HTTP client */

typedef struct srv_arg { int lfd; const char *reply; char req[4096]; } srv_arg;

static void *one_shot_server(void *arg) {
    srv_arg *a = arg;
    int fd = accept(a->lfd, NULL, NULL);
    /* the whole request: the client sends the head and the body apart */
    size_t len = 0;
    for (;;) {
        ssize_t n = recv(fd, a->req + len, sizeof a->req - 1 - len, 0);
        if (n <= 0) break;
        len += n;
        a->req[len] = 0;
        const char *end = strstr(a->req, "\r\n\r\n"), *cl = strstr(a->req, "Content-Length: ");
        if (end && (!cl || (size_t)(end + 4 - a->req) + strtoul(cl + 16, NULL, 10) <= len)) break;
        if (len == sizeof a->req - 1) break;
    }
    a->req[len] = 0;
    dsi_pd_send_all(fd, a->reply, strlen(a->reply));
    close(fd);
    return NULL;
}

/* Serves one canned reply and reads it back with the client; the request
 * the server saw goes to `req` (when not NULL). */
static int fetch_as(const char *reply, const char *bearer, int *status, dsi_rbuf *body, char *req, size_t req_cap) {
    srv_arg a = {.reply = reply};
    int port;
    assert_int_equal(dsi_pd_listen("127.0.0.1", 0, &a.lfd, &port), DSI_OK);
    pthread_t t;
    pthread_create(&t, NULL, one_shot_server, &a);
    int rc = dsi__hc_call("127.0.0.1", port, "POST", "/x", "{}", 2, bearer, 5.0, status, body);
    pthread_join(t, NULL);
    close(a.lfd);
    if (req) snprintf(req, req_cap, "%s", a.req);
    return rc;
}

static int fetch(const char *reply, int *status, dsi_rbuf *body) { return fetch_as(reply, NULL, status, body, NULL, 0); }

static void test_http_client(void **st) {
    (void)st;
    int status;
    dsi_rbuf b = {0};
    assert_int_equal(fetch("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", &status, &b), DSI_OK);
    assert_int_equal(status, 200);
    assert_string_equal(b.p, "hello");
    dsi__rbuf_free(&b);
    assert_int_equal(fetch("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\ndata:\r\n3\r\n x\n\r\n0\r\n\r\n",
                           &status, &b), DSI_OK);
    assert_string_equal(b.p, "data: x\n");
    dsi__rbuf_free(&b);
    /* a chunked body cut before its last chunk is an error, not a short answer */
    assert_int_not_equal(fetch("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\ndata:\r\n", &status, &b),
                         DSI_OK);
    dsi__rbuf_free(&b);
    assert_int_equal(fetch("HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nno", &status, &b), DSI_OK);
    assert_int_equal(status, 404);
    dsi__rbuf_free(&b);
    assert_int_not_equal(fetch("garbage\r\n\r\n", &status, &b), DSI_OK);
    dsi__rbuf_free(&b);
    /* nothing listening: a connection error, quickly */
    int lfd, port;
    dsi_pd_listen("127.0.0.1", 0, &lfd, &port);
    close(lfd);
    assert_int_not_equal(dsi__hc_call("127.0.0.1", port, "GET", "/", NULL, 0, NULL, 1.0, &status, &b), DSI_OK);
    dsi__rbuf_free(&b);
}

/* The router's --api-key goes to the instances as a bearer token, and no
 * Authorization header goes without one. */
static void test_http_client_bearer(void **st) {
    (void)st;
    int status;
    dsi_rbuf b = {0};
    char req[4096];
    const char *ok = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    assert_int_equal(fetch_as(ok, "k-123", &status, &b, req, sizeof req), DSI_OK);
    assert_non_null(strstr(req, "\r\nAuthorization: Bearer k-123\r\n"));
    assert_non_null(strstr(req, "\r\n\r\n{}"));
    dsi__rbuf_free(&b);
    assert_int_equal(fetch_as(ok, NULL, &status, &b, req, sizeof req), DSI_OK);
    assert_null(strstr(req, "Authorization"));
    dsi__rbuf_free(&b);
    assert_int_equal(fetch_as(ok, "", &status, &b, req, sizeof req), DSI_OK);
    assert_null(strstr(req, "Authorization"));
    dsi__rbuf_free(&b);
}

/* Instance URLs in one spelling: the same instance written two ways was two
 * members of the pool; other schemes, paths and quotes are refused. */
static void test_instance_urls(void **st) {
    (void)st;
    char u[192];
    const char *same[] = {"http://127.0.0.1:8001", "127.0.0.1:8001", "http://127.0.0.1:8001/", "127.0.0.1:8001/"};
    for (int i = 0; i < 4; i++) {
        assert_int_equal(dsi__router_canon_url(same[i], u, sizeof u), DSI_OK);
        assert_string_equal(u, "http://127.0.0.1:8001");
    }
    assert_int_equal(dsi__router_canon_url("http://[::1]:9/", u, sizeof u), DSI_OK);
    assert_string_equal(u, "http://[::1]:9");
    const char *bad[] = {"ftp://h:1", "https://h:1", "http://h:1/v1", "http://h", "http://a\"b:1", "h:1 ", "h:0",
                         "h:99999", "", "http://", "http://h:1//"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        assert_int_not_equal(dsi__router_canon_url(bad[i], u, sizeof u), DSI_OK);
    char longurl[400];
    memset(longurl, 'a', sizeof longurl);
    memcpy(longurl + sizeof longurl - 6, ":8001", 6);
    assert_int_not_equal(dsi__router_canon_url(longurl, u, sizeof u), DSI_OK);
}

/* Slots: a URL that left and joins again gets its slot back; past MAX_INST
 * an idle slot that left is reused (after 64 leaves nothing could join). */
static void test_instance_slots(void **st) {
    (void)st;
    dsi_router *r = calloc(1, sizeof *r);
    char u[64];
    for (int i = 0; i < MAX_INST; i++) {
        snprintf(u, sizeof u, "127.0.0.1:%d", 9000 + i);
        assert_int_equal(dsi__router_add_inst(r, u, ROLE_D, 1), i);
    }
    assert_int_equal(dsi__router_add_inst(r, "127.0.0.1:9999", ROLE_D, 1), -1); /* full */
    assert_int_equal(dsi__router_find_inst(r, "http://127.0.0.1:9005/", ROLE_D), 5);
    assert_int_equal(dsi__router_find_inst(r, "127.0.0.1:9005", ROLE_P), -1);
    for (int cycle = 0; cycle < 100; cycle++) { /* leave and join again, as the admin endpoint does */
        int i = dsi__router_find_inst(r, "127.0.0.1:9005", ROLE_D);
        assert_int_equal(i, 5);
        r->in[i].left = 1, r->in[i].member = 0;
        assert_int_equal(dsi__router_find_inst(r, "127.0.0.1:9005", ROLE_D), -1);
        assert_int_equal(dsi__router_add_inst(r, "http://127.0.0.1:9005", ROLE_D, 1), 5);
    }
    /* a new URL takes a slot that left, but not one the router still has a request in */
    r->in[7].left = 1, r->in[7].member = 0, r->in[7].inflight = 1;
    assert_int_equal(dsi__router_add_inst(r, "127.0.0.1:9999", ROLE_D, 1), -1);
    r->in[7].inflight = 0;
    assert_int_equal(dsi__router_add_inst(r, "127.0.0.1:9999", ROLE_P, 1), 7);
    assert_string_equal(r->in[7].url, "http://127.0.0.1:9999");
    assert_int_equal(r->in[7].role, ROLE_P);
    assert_false(r->in[7].left);
    assert_int_equal(r->n_in, MAX_INST);
    free(r);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_attn_work),
        cmocka_unit_test(test_prefill_prefers_prefix_holder),
        cmocka_unit_test(test_prefill_balances_tokens_too),
        cmocka_unit_test(test_decode_lb),
        cmocka_unit_test(test_lb_simulation),
        cmocka_unit_test(test_health),
        cmocka_unit_test(test_autoscaler),
        cmocka_unit_test(test_hashset),
        cmocka_unit_test(test_http_client),
        cmocka_unit_test(test_http_client_bearer),
        cmocka_unit_test(test_instance_urls),
        cmocka_unit_test(test_instance_slots),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
