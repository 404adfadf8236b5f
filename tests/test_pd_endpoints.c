/* The instance endpoints a router calls (/internal/...), against an
 * in-process server: a prefill whose decode address accepts and never
 * answers must not hold the HTTP threads (every other request waited behind
 * the handshake before), its failure comes back as a 502 naming the address,
 * and with --api-key the endpoints want the key. */
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
#include <unistd.h>

#include "dsinfer/pd.h"
#include "dsinfer/server.h"

/* One request with Connection: close (and an Authorization header when
 * `key` is set); the whole response, malloc'ed, or NULL. */
static char *http(int port, const char *method, const char *path, const char *key, const char *body) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) { close(fd); return NULL; }
    char req[1024], auth[256] = "";
    if (key) snprintf(auth, sizeof auth, "Authorization: Bearer %s\r\n", key);
    size_t blen = body ? strlen(body) : 0;
    int n = snprintf(req, sizeof req, "%s %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n%sContent-Length: %zu\r\n\r\n",
                     method, path, auth, blen);
    if (send(fd, req, n, 0) != n || (blen && send(fd, body, blen, 0) != (ssize_t)blen)) { close(fd); return NULL; }
    size_t cap = 1 << 16, len = 0;
    char *out = malloc(cap);
    ssize_t k;
    while ((k = recv(fd, out + len, cap - 1 - len, 0)) > 0) {
        len += k;
        if (len + 1 == cap) out = realloc(out, cap *= 2);
    }
    out[len] = 0;
    close(fd);
    return out;
}

typedef struct prefill_call {
    int port;
    char path[256];
    char *reply;
    atomic_int done;
} prefill_call;

static void *prefill_thread(void *arg) {
    prefill_call *p = arg;
    p->reply = http(p->port, "POST", p->path, NULL, "{\"prompt\":[1,2,3],\"max_tokens\":2}");
    atomic_store(&p->done, 1);
    return NULL;
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
    prefill_call calls[N];
    pthread_t t[N];
    for (int i = 0; i < N; i++) {
        calls[i] = (prefill_call){.port = port};
        snprintf(calls[i].path, sizeof calls[i].path,
                 "/internal/prefill?api=completions&xfer=%x&decode=127.0.0.1:%d", 0x100 + i, hole_port);
        atomic_init(&calls[i].done, 0);
        assert_int_equal(pthread_create(&t[i], NULL, prefill_thread, &calls[i]), 0);
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
    char *r = http(port, "GET", "/health", NULL, NULL);
    assert_non_null(r);
    assert_non_null(strstr(r, "HTTP/1.1 200"));
    free(r);
    r = http(port, "POST", "/v1/completions", NULL, "{\"prompt\":[1,2],\"max_tokens\":2,\"temperature\":0}");
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
        pthread_join(t[i], NULL);
        assert_non_null(calls[i].reply);
        assert_non_null(strstr(calls[i].reply, "HTTP/1.1 502"));
        assert_non_null(strstr(calls[i].reply, where));
        free(calls[i].reply);
    }
    /* and nothing listening there at all: the same, at once */
    close(hole);
    char path[256];
    snprintf(path, sizeof path, "/internal/prefill?api=completions&xfer=7&decode=127.0.0.1:%d", hole_port);
    r = http(port, "POST", path, NULL, "{\"prompt\":[1,2,3],\"max_tokens\":2}");
    assert_non_null(r);
    assert_non_null(strstr(r, "HTTP/1.1 502"));
    free(r);
    /* a malformed address is the request's fault */
    r = http(port, "POST", "/internal/prefill?api=completions&xfer=8&decode=nowhere", NULL, "{\"prompt\":[1]}");
    assert_non_null(r);
    assert_non_null(strstr(r, "HTTP/1.1 400"));
    free(r);
    r = http(port, "GET", "/health", NULL, NULL);
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
        char *r = http(port, method, paths[i], NULL, body);
        assert_non_null(r);
        assert_non_null(strstr(r, "HTTP/1.1 401"));
        free(r);
        r = http(port, method, paths[i], "wrong", body);
        assert_non_null(strstr(r, "HTTP/1.1 401"));
        free(r);
    }
    char *r = http(port, "GET", "/internal/load", "sekret", NULL);
    assert_non_null(strstr(r, "HTTP/1.1 200"));
    assert_non_null(strstr(r, "\"role\":\"both\""));
    free(r);
    r = http(port, "POST", "/internal/match?api=completions", "sekret", "{\"prompt\":[1,2]}");
    assert_non_null(strstr(r, "HTTP/1.1 200"));
    assert_non_null(strstr(r, "\"n_prompt\":2"));
    free(r);
    r = http(port, "GET", "/health", NULL, NULL); /* probes stay open */
    assert_non_null(strstr(r, "HTTP/1.1 200"));
    free(r);
    dsi_server_stop(s, 5.0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_prefill_handshake_off_http_threads),
        cmocka_unit_test(test_internal_endpoints_want_the_key),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
