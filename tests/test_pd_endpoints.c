/* The instance endpoints a router calls (/internal/...), against an
 * in-process server: a prefill whose decode address accepts and never
 * answers must not hold the HTTP threads (every other request waited behind
 * the handshake before), its failure comes back as a 502 naming the address,
 * and with --api-key the endpoints want the key. Wrong methods get 405. The
 * decode side of the KV transfer: a FIRST claiming more cached tokens than the
 * prompt is refused (a proxy between real prefill and decode instances
 * rewrites it), receiver threads are capped, and KV that never comes ends a
 * parked request with 504. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "dsinfer/pd.h"
#include "test_http.h"
#include "dsinfer/server.h"
#include "server/server_impl.h" /* dsi__pd_park_timeout_s */

typedef struct bg_call {
    int port;
    char path[256];
    const char *body;
    char *reply;
    atomic_int done;
    pthread_t t;
} bg_call;

static void *bg_thread(void *arg) {
    bg_call *b = arg;
    b->reply = test_http(b->port, "POST", b->path, NULL, b->body);
    atomic_store(&b->done, 1);
    return NULL;
}

/* POSTs `body` to `path` on a thread of its own (join b->t, read b->reply). */
static void bg_post(bg_call *b, int port, const char *path, const char *body) {
    b->port = port;
    snprintf(b->path, sizeof b->path, "%s", path);
    b->body = body;
    b->reply = NULL;
    atomic_init(&b->done, 0);
    assert_int_equal(pthread_create(&b->t, NULL, bg_thread, b), 0);
}

static void test_prefill_handshake_off_http_threads(void **state) {
    (void)state;
    dsi_server_opts o = dsi_server_default_opts();
    o.port = 0;
    o.threads = 1;
    o.kv_blocks = 64;
    o.http_threads = 2;
    dsi_server *s;
    assert_int_equal(dsi_server_start(&o, &s), DSI_OK);
    int port = dsi_server_port(s);

    /* the "decode instance": a socket that accepts and never answers */
    int hole, hole_port;
    assert_int_equal(dsi_pd_listen("127.0.0.1", 0, &hole, &hole_port), DSI_OK);
    enum { N = 2 };
    bg_call calls[N];
    for (int i = 0; i < N; i++) {
        char path[256];
        snprintf(path, sizeof path, "/internal/prefill?api=completions&xfer=%x&decode=127.0.0.1:%d", 0x100 + i,
                 hole_port);
        bg_post(&calls[i], port, path, "{\"prompt\":[1,2,3],\"max_tokens\":2}");
    }
    /* both handshakes under way (each waits up to 10 s for the SKIP): with
     * them on the HTTP threads, both of those were blocked from here on */
    int held[N];
    for (int i = 0; i < N; i++) {
        struct pollfd pf = {.fd = hole, .events = POLLIN};
        assert_int_equal(poll(&pf, 1, 20000), 1);
        held[i] = accept(hole, NULL, NULL);
        assert_true(held[i] >= 0);
    }
    char *r = test_http(port, "GET", "/health", NULL, NULL);
    assert_non_null(r);
    assert_non_null(strstr(r, "HTTP/1.1 200"));
    free(r);
    r = test_http(port, "POST", "/v1/completions", NULL, "{\"prompt\":[1,2],\"max_tokens\":2,\"temperature\":0}");
    assert_non_null(r);
    assert_non_null(strstr(r, "HTTP/1.1 200"));
    free(r);
    /* ... answered while both transfers still wait on the silent peer */
    for (int i = 0; i < N; i++) assert_false(atomic_load(&calls[i].done));

    /* the peer hangs up: each transfer fails with a 502 naming it */
    for (int i = 0; i < N; i++) close(held[i]);
    char where[64];
    snprintf(where, sizeof where, "decode instance 127.0.0.1:%d", hole_port);
    for (int i = 0; i < N; i++) {
        pthread_join(calls[i].t, NULL);
        assert_non_null(calls[i].reply);
        assert_non_null(strstr(calls[i].reply, "HTTP/1.1 502"));
        assert_non_null(strstr(calls[i].reply, where));
        free(calls[i].reply);
    }
    /* and nothing listening there at all: the same, at once */
    close(hole);
    char path[256];
    snprintf(path, sizeof path, "/internal/prefill?api=completions&xfer=7&decode=127.0.0.1:%d", hole_port);
    r = test_http(port, "POST", path, NULL, "{\"prompt\":[1,2,3],\"max_tokens\":2}");
    assert_non_null(r);
    assert_non_null(strstr(r, "HTTP/1.1 502"));
    free(r);
    /* a malformed address is the request's fault */
    r = test_http(port, "POST", "/internal/prefill?api=completions&xfer=8&decode=nowhere", NULL, "{\"prompt\":[1]}");
    assert_non_null(r);
    assert_non_null(strstr(r, "HTTP/1.1 400"));
    free(r);
    r = test_http(port, "GET", "/health", NULL, NULL);
    assert_non_null(strstr(r, "HTTP/1.1 200"));
    free(r);
    dsi_server_stop(s, 5.0);
}

/* With an API key the router's endpoints want it too: /internal/prefill
 * computes and connects to the address a request names. */
static void test_internal_endpoints_want_the_key(void **state) {
    (void)state;
    dsi_server_opts o = dsi_server_default_opts();
    o.port = 0;
    o.threads = 1;
    o.kv_blocks = 64;
    o.api_key = "sekret";
    dsi_server *s;
    assert_int_equal(dsi_server_start(&o, &s), DSI_OK);
    int port = dsi_server_port(s);
    const char *paths[] = {"/internal/load", "/internal/match?api=completions",
                           "/internal/prefill?api=completions&xfer=1&decode=127.0.0.1:9"};
    for (int i = 0; i < 3; i++) {
        const char *method = i ? "POST" : "GET", *body = i ? "{\"prompt\":[1,2]}" : NULL;
        char *r = test_http(port, method, paths[i], NULL, body);
        assert_non_null(r);
        assert_non_null(strstr(r, "HTTP/1.1 401"));
        free(r);
        r = test_http(port, method, paths[i], "wrong", body);
        assert_non_null(strstr(r, "HTTP/1.1 401"));
        free(r);
    }
    char *r = test_http(port, "GET", "/internal/load", "sekret", NULL);
    assert_non_null(strstr(r, "HTTP/1.1 200"));
    assert_non_null(strstr(r, "\"role\":\"both\""));
    free(r);
    r = test_http(port, "POST", "/internal/match?api=completions", "sekret", "{\"prompt\":[1,2]}");
    assert_non_null(strstr(r, "HTTP/1.1 200"));
    assert_non_null(strstr(r, "\"n_prompt\":2"));
    free(r);
    r = test_http(port, "GET", "/health", NULL, NULL); /* probes stay open */
    assert_non_null(strstr(r, "HTTP/1.1 200"));
    free(r);
    dsi_server_stop(s, 5.0);
}

/* The endpoints that take a body answer other methods with 405, as the /v1
 * ones do (404 made a client look for a missing route). */
static void test_internal_endpoints_want_post(void **state) {
    (void)state;
    dsi_server_opts o = dsi_server_default_opts();
    o.port = 0;
    o.threads = 1;
    o.kv_blocks = 16;
    dsi_server *s;
    assert_int_equal(dsi_server_start(&o, &s), DSI_OK);
    int port = dsi_server_port(s);
    const char *paths[] = {"/internal/prefill?api=completions&xfer=1&decode=127.0.0.1:9",
                           "/internal/match?api=completions", "/internal/decode?api=completions&xfer=1"};
    const char *methods[] = {"GET", "PUT", "DELETE"};
    for (int i = 0; i < 3; i++)
        for (int m = 0; m < 3; m++) {
            char *r = test_http(port, methods[m], paths[i], NULL, NULL);
            assert_non_null(r);
            assert_non_null(strstr(r, "HTTP/1.1 405"));
            assert_non_null(strstr(r, "use POST for this endpoint"));
            free(r);
        }
    char *r = test_http(port, "POST", "/internal/nothing", NULL, "{}");
    assert_non_null(strstr(r, "HTTP/1.1 404"));
    free(r);
    r = test_http(port, "DELETE", "/internal/load", NULL, NULL); /* the heartbeat's: GET */
    assert_non_null(strstr(r, "HTTP/1.1 405"));
    assert_non_null(strstr(r, "use GET for this endpoint"));
    free(r);
    r = test_http(port, "GET", "/internal/load", NULL, NULL);
    assert_non_null(strstr(r, "HTTP/1.1 200"));
    free(r);
    dsi_server_stop(s, 5.0);
}

/* Copies one KV wire message from `from` to `to`; a FIRST gets its
 * cached_tokens replaced when cached >= 0. Its type, or 0 on failure. */
static uint32_t relay(int from, int to, long long cached) {
    uint32_t type;
    uint64_t len;
    if (dsi_pd_recv_hdr(from, &type, &len, 20.0)) return 0;
    char *buf = malloc(len ? len : 1);
    if (!buf || dsi_pd_recv_all(from, buf, len, 20.0)) { free(buf); return 0; }
    if (type == DSI_PD_FIRST && cached >= 0 && len == sizeof(dsi_pd_first))
        ((dsi_pd_first *)buf)->cached_tokens = (uint32_t)cached;
    int rc = dsi_pd_send_msg(to, type, buf, len, NULL, 0);
    free(buf);
    return rc ? 0 : type;
}

/* A FIRST saying a million of a 3-token prompt's tokens were cached made
 * usage report prompt_cache_hit_tokens -1 (and a miss larger than the
 * prompt). The decode side now refuses it: the prefill side answers 502, the
 * request stays parked, and a good retry (as the router makes) completes it
 * with sane usage. */
static void test_decode_refuses_bad_cached_tokens(void **state) {
    (void)state;
    dsi_server_opts o = dsi_server_default_opts();
    o.port = 0;
    o.threads = 1;
    o.kv_blocks = 64;
    dsi_server *dec, *pre;
    o.role = DSI_ROLE_DECODE;
    assert_int_equal(dsi_server_start(&o, &dec), DSI_OK);
    o.role = DSI_ROLE_PREFILL;
    assert_int_equal(dsi_server_start(&o, &pre), DSI_OK);
    int kv_port = dsi_server_kv_port(dec);
    assert_true(kv_port > 0);
    int hole, hole_port;
    assert_int_equal(dsi_pd_listen("127.0.0.1", 0, &hole, &hole_port), DSI_OK);

    const char *body = "{\"prompt\":[1,2,3],\"max_tokens\":2,\"temperature\":0,\"ignore_eos\":true}";
    char path[256];
    bg_call d, p;
    bg_post(&d, dsi_server_port(dec), "/internal/decode?api=completions&xfer=abc", body);
    snprintf(path, sizeof path, "/internal/prefill?api=completions&xfer=abc&decode=127.0.0.1:%d", hole_port);
    bg_post(&p, dsi_server_port(pre), path, body);

    /* the proxy: prefill -> here -> decode, FIRST rewritten */
    struct pollfd pf = {.fd = hole, .events = POLLIN};
    assert_int_equal(poll(&pf, 1, 20000), 1);
    int from_p = accept(hole, NULL, NULL), to_d;
    assert_true(from_p >= 0);
    assert_int_equal(dsi_pd_connect("127.0.0.1", kv_port, 2.0, &to_d), DSI_OK);
    assert_int_equal(relay(from_p, to_d, -1), DSI_PD_HELLO);
    assert_int_equal(relay(to_d, from_p, -1), DSI_PD_SKIP);
    uint32_t t;
    while ((t = relay(from_p, to_d, 1000000)) == DSI_PD_BLOCK) {}
    assert_int_equal(t, DSI_PD_FIRST);
    assert_int_equal(relay(to_d, from_p, -1), DSI_PD_ACK);
    close(from_p);
    close(to_d);
    close(hole);
    pthread_join(p.t, NULL);
    assert_non_null(p.reply);
    assert_non_null(strstr(p.reply, "HTTP/1.1 502"));
    assert_non_null(strstr(p.reply, "refused the request (EINVAL)"));
    free(p.reply);
    assert_false(atomic_load(&d.done)); /* still parked */

    /* the retry, straight to the decode instance */
    snprintf(path, sizeof path, "/internal/prefill?api=completions&xfer=abc&decode=127.0.0.1:%d", kv_port);
    bg_post(&p, dsi_server_port(pre), path, body);
    pthread_join(p.t, NULL);
    assert_non_null(strstr(p.reply, "HTTP/1.1 200"));
    free(p.reply);
    pthread_join(d.t, NULL);
    assert_non_null(d.reply);
    assert_non_null(strstr(d.reply, "HTTP/1.1 200"));
    assert_non_null(strstr(d.reply, "\"prompt_cache_hit_tokens\":0,\"prompt_cache_miss_tokens\":3"));
    free(d.reply);
    dsi_server_stop(pre, 5.0);
    dsi_server_stop(dec, 5.0);
}

/* Each KV connection had a thread of its own, without limit (2,000 idle
 * connections made 2,006 threads). Past the cap (16 with max_num_seqs 1)
 * a connection is answered SKIP EBUSY and closed at once; slots come back
 * when connections end. */
static void test_kv_receivers_capped(void **state) {
    (void)state;
    dsi_server_opts o = dsi_server_default_opts();
    o.port = 0;
    o.threads = 1;
    o.kv_blocks = 16;
    o.max_num_seqs = 1;
    o.role = DSI_ROLE_DECODE;
    dsi_server *s;
    assert_int_equal(dsi_server_start(&o, &s), DSI_OK);
    int kv_port = dsi_server_kv_port(s);
    enum { CAP = 16 };
    int idle[CAP], fd;
    for (int i = 0; i < CAP; i++) assert_int_equal(dsi_pd_connect("127.0.0.1", kv_port, 2.0, &idle[i]), DSI_OK);
    uint32_t type;
    uint64_t len;
    dsi_pd_skip sk;
    assert_int_equal(dsi_pd_connect("127.0.0.1", kv_port, 2.0, &fd), DSI_OK);
    assert_int_equal(dsi_pd_recv_hdr(fd, &type, &len, 5.0), DSI_OK);
    assert_int_equal(type, DSI_PD_SKIP);
    assert_int_equal(len, sizeof sk);
    assert_int_equal(dsi_pd_recv_all(fd, &sk, sizeof sk, 5.0), DSI_OK);
    assert_int_equal(sk.status, DSI_EBUSY);
    char byte;
    assert_int_equal(dsi_pd_recv_all(fd, &byte, 1, 5.0), DSI_EPEER); /* and closed */
    close(fd);
    for (int i = 0; i < CAP; i++) { /* the first ones still wait for their HELLO */
        struct pollfd pf = {.fd = idle[i], .events = POLLIN};
        assert_int_equal(poll(&pf, 1, 0), 0);
        close(idle[i]);
    }
    /* their receivers see the close and end: a HELLO is read again (and its
     * wrong fingerprint refused) */
    int status = DSI_EBUSY;
    for (int tries = 0; tries < 100 && status == DSI_EBUSY; tries++) {
        assert_int_equal(dsi_pd_connect("127.0.0.1", kv_port, 2.0, &fd), DSI_OK);
        dsi_pd_hello h = {.xfer_id = 1, .fingerprint = 0, .n_prompt = 1, .n_blocks = 1, .n_layers = 1,
                          .block_tokens = 64, .kv_dim = 1, .n_hashes = 0};
        assert_int_equal(dsi_pd_send_msg(fd, DSI_PD_HELLO, &h, sizeof h, NULL, 0), DSI_OK);
        assert_int_equal(dsi_pd_recv_hdr(fd, &type, &len, 5.0), DSI_OK);
        assert_int_equal(type, DSI_PD_SKIP);
        assert_int_equal(dsi_pd_recv_all(fd, &sk, sizeof sk, 5.0), DSI_OK);
        status = sk.status;
        close(fd);
        if (status == DSI_EBUSY) nanosleep(&(struct timespec){0, 50 * 1000 * 1000}, NULL);
    }
    assert_int_equal(status, DSI_EINVAL);
    dsi_server_stop(s, 5.0);
}

/* A parked /internal/decode whose KV never comes: 504 (it was a 500, as if
 * this instance had failed). */
static void test_parked_decode_times_out_504(void **state) {
    (void)state;
    dsi_server_opts o = dsi_server_default_opts();
    o.port = 0;
    o.threads = 1;
    o.kv_blocks = 16;
    o.role = DSI_ROLE_DECODE;
    dsi_server *s;
    dsi__pd_park_timeout_s = 0.3;
    int rc = dsi_server_start(&o, &s);
    dsi__pd_park_timeout_s = 60.0;
    assert_int_equal(rc, DSI_OK);
    char *r = test_http(dsi_server_port(s), "POST", "/internal/decode?api=completions&xfer=77", NULL,
                   "{\"prompt\":[1,2,3],\"max_tokens\":2}");
    assert_non_null(r);
    assert_non_null(strstr(r, "HTTP/1.1 504"));
    assert_non_null(strstr(r, "never arrived"));
    free(r);
    dsi_server_stop(s, 5.0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_prefill_handshake_off_http_threads),
        cmocka_unit_test(test_internal_endpoints_want_the_key),
        cmocka_unit_test(test_internal_endpoints_want_post),
        cmocka_unit_test(test_decode_refuses_bad_cached_tokens),
        cmocka_unit_test(test_kv_receivers_capped),
        cmocka_unit_test(test_parked_decode_times_out_504),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
