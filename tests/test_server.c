/* The server started in-process (as `dsinfer demo` and tests do): a request
 * over loopback, the /metrics and per-request hooks, stop with drain, and the
 * JSON writer's escaping of hostile bytes. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "dsinfer/server.h"
#include "server/server_impl.h"

/* Sends one request with Connection: close and returns the whole response
 * (malloc'ed), or NULL. */
static char *http(int port, const char *method, const char *path, const char *body) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) { close(fd); return NULL; }
    char req[512];
    size_t blen = body ? strlen(body) : 0;
    int n = snprintf(req, sizeof req, "%s %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %zu\r\n\r\n",
                     method, path, blen);
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

static void metrics_hook(void *ctx, void (*write)(void *w, const char *text, size_t len), void *w) {
    const char *t = "# HELP test_hook_value A hook line.\n# TYPE test_hook_value gauge\ntest_hook_value 42\n";
    write(w, t, strlen(t));
}

static dsi_request_record g_rec;
static int g_n_rec;
static void request_hook(void *ctx, const dsi_request_record *r) {
    g_rec = *r;
    g_n_rec++;
}

static void test_in_process_server(void **state) {
    dsi_server_opts o = dsi_server_default_opts();
    o.port = 0;
    o.threads = 1;
    o.kv_blocks = 64;
    dsi_server *s;
    assert_int_equal(dsi_server_start(&o, &s), DSI_OK);
    assert_string_equal(dsi_server_model_name(s), "dsinfer-demo");
    int port = dsi_server_port(s);
    assert_true(port > 0);
    assert_int_equal(dsi_server_add_metrics_hook(s, metrics_hook, NULL), DSI_OK);
    assert_int_equal(dsi_server_add_request_hook(s, request_hook, NULL), DSI_OK);

    char *r = http(port, "POST", "/v1/completions",
                   "{\"prompt\":[1,2,3,4],\"max_tokens\":5,\"temperature\":0,\"ignore_eos\":true}");
    assert_non_null(r);
    assert_non_null(strstr(r, "HTTP/1.1 200"));
    assert_non_null(strstr(r, "\"completion_tokens\":5"));
    free(r);
    assert_int_equal(g_n_rec, 1);
    assert_int_equal(g_rec.prompt_tokens, 4);
    assert_int_equal(g_rec.completion_tokens, 5);
    assert_string_equal(g_rec.outcome, "length");
    assert_true(g_rec.ttft_s >= 0 && g_rec.duration_s >= g_rec.ttft_s);

    r = http(port, "GET", "/metrics", NULL);
    assert_non_null(r);
    assert_non_null(strstr(r, "\ntest_hook_value 42\n"));
    assert_non_null(strstr(r, "dsinfer_requests_total{outcome=\"length\"} 1\n"));
    assert_non_null(strstr(r, "dsinfer_kv_blocks_capacity 64\n"));
    free(r);

    /* a 64 KiB message of control and invalid bytes in a prompt string is
     * answered, not crashed on */
    char *body = malloc(70000);
    int n = sprintf(body, "{\"prompt\":\"");
    for (int i = 0; i < 65536; i++) body[n++] = (char)("\x01\xff\xc3\x28 a\\n"[i % 8]);
    n += sprintf(body + n, "\",\"max_tokens\":2}");
    r = http(port, "POST", "/v1/completions", body);
    assert_non_null(r);
    assert_true(strstr(r, "HTTP/1.1 400") || strstr(r, "HTTP/1.1 200"));
    free(r);
    free(body);
    dsi_server_stop(s, 5.0);
    dsi_server_stop(NULL, 0);
}

static void test_json_escaping(void **state) {
    dsi_sbuf b = {0};
    const char in[] = "a\"b\\c\n\x01\xff\xe2\x82\xac\xed\xa0\x80z";
    dsi__sbuf_json_str(&b, in, sizeof in - 1);
    assert_string_equal(b.p, "\"a\\\"b\\\\c\\n\\u0001\\ufffd\xe2\x82\xac\\ufffd\\ufffd\\ufffdz\"");
    dsi__sbuf_reset(&b);
    dsi__sbuf_json_num(&b, -1.0 / 0.0);
    assert_string_equal(b.p, "-9999");
    dsi__sbuf_free(&b);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_json_escaping),
        cmocka_unit_test(test_in_process_server),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
