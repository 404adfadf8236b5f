/* The server started in-process (as `dsinfer demo` and tests do): a request
 * over loopback, the /metrics and per-request hooks, stop with drain, the
 * JSON writer's escaping of hostile bytes, and the OpenAI request parser's
 * refusal of hostile bodies. */
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
#include "dsinfer/tokenizer.h"
#include "server/server_impl.h"
#include "test_http.h"

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

    char *r = test_http(port, "POST", "/v1/completions", NULL,
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

    r = test_http(port, "GET", "/metrics", NULL, NULL);
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
    r = test_http(port, "POST", "/v1/completions", NULL, body);
    assert_non_null(r);
    assert_true(strstr(r, "HTTP/1.1 400") || strstr(r, "HTTP/1.1 200"));
    free(r);
    free(body);
    dsi_server_stop(s, 5.0);
    dsi_server_stop(NULL, 0);
}

/* The "id" of a response (copied into out), or "" when there is none. */
static void response_id(const char *r, char *out, size_t cap) {
    const char *p = r ? strstr(r, "\"id\":\"") : NULL;
    out[0] = 0;
    if (!p) return;
    p += 6;
    size_t n = strcspn(p, "\"");
    if (n >= cap) n = cap - 1;
    memcpy(out, p, n);
    out[n] = 0;
}

/* Ids were the start second plus a per-instance counter: two instances
 * started in the same second (decode instances behind one router) repeated
 * each other's ids. */
/* config.json's eos_token_id as a list: every id ends a generation (the
 * server's stop ids hold each once, in order). */
static void test_eos_list(void **state) {
    char dir[] = "/tmp/dsi-eos-XXXXXX", path[512], src[512];
    assert_non_null(mkdtemp(dir));
    const char *files[] = {"model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                           "model-00003-of-00003.safetensors", "model.safetensors.index.json",
                           "tokenizer.json", "tokenizer_config.json"};
    for (int i = 0; i < 6; i++) {
        snprintf(src, sizeof src, "%s/golden/%s/%s", DSI_TEST_DATA, i < 4 ? "tiny-fp8" : "tokenizer", files[i]);
        snprintf(path, sizeof path, "%s/%s", dir, files[i]);
        assert_int_equal(symlink(src, path), 0);
    }
    snprintf(src, sizeof src, "%s/golden/tiny-fp8/config.json", DSI_TEST_DATA);
    FILE *f = fopen(src, "rb");
    assert_non_null(f);
    static char cfg[1 << 16];
    size_t n = fread(cfg, 1, sizeof cfg - 1, f);
    fclose(f);
    cfg[n] = 0;
    char *at = strstr(cfg, "\"eos_token_id\": 1,");
    assert_non_null(at);
    snprintf(path, sizeof path, "%s/config.json", dir);
    f = fopen(path, "wb");
    assert_non_null(f);
    fprintf(f, "%.*s\"eos_token_id\": [1, 5, 1],%s", (int)(at - cfg), cfg, at + strlen("\"eos_token_id\": 1,"));
    fclose(f);

    dsi_server_opts o = dsi_server_default_opts();
    o.port = 0;
    o.threads = 1;
    o.kv_blocks = 16;
    o.model_dir = dir;
    dsi_server *s;
    int rc = dsi_server_start(&o, &s);
    if (rc) fprintf(stderr, "  %s\n", dsi_last_error());
    assert_int_equal(rc, DSI_OK);
    assert_int_equal(s->api.n_eos, 2);
    assert_int_equal(s->api.eos_ids[0], 1);
    assert_int_equal(s->api.eos_ids[1], 5);
    dsi_server_stop(s, 5.0);
    for (int i = 0; i < 6; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, files[i]);
        unlink(path);
    }
    snprintf(path, sizeof path, "%s/config.json", dir);
    unlink(path);
    rmdir(dir);
}

static void test_ids_unique_across_instances(void **state) {
    (void)state;
    dsi_server_opts o = dsi_server_default_opts();
    o.port = 0;
    o.threads = 1;
    o.kv_blocks = 16;
    dsi_server *s[2];
    char id[2][2][64];
    for (int i = 0; i < 2; i++) assert_int_equal(dsi_server_start(&o, &s[i]), DSI_OK);
    for (int i = 0; i < 2; i++)
        for (int chat = 0; chat < 2; chat++) {
            char *r = test_http(dsi_server_port(s[i]), "POST", chat ? "/v1/chat/completions" : "/v1/completions",
                                NULL,
                                chat ? "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"max_tokens\":1}"
                                     : "{\"prompt\":[1,2],\"max_tokens\":1}");
            assert_non_null(r);
            assert_non_null(strstr(r, "HTTP/1.1 200"));
            response_id(r, id[i][chat], sizeof id[i][chat]);
            free(r);
            assert_true(!strncmp(id[i][chat], chat ? "chatcmpl-" : "cmpl-", chat ? 9 : 5));
        }
    assert_string_not_equal(id[0][0], id[1][0]);
    assert_string_not_equal(id[0][1], id[1][1]);
    assert_string_not_equal(id[0][0] + 5, id[0][1] + 9); /* the counter still moves within one instance */
    for (int i = 0; i < 2; i++) dsi_server_stop(s[i], 5.0);
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


/* ---- dsi__api_parse: hostile bodies ------------------------------------------- */

static dsi_tokenizer *g_tok;
static dsi_api_ctx g_api;
static char g_msg[512];
static const char *g_param;

static int api_setup(void **state) {
    if (dsi_tokenizer_load(DSI_TEST_DATA "/golden/tokenizer", &g_tok) != DSI_OK) return -1;
    g_api = (dsi_api_ctx){.tok = g_tok, .model_name = "m", .vocab = dsi_tokenizer_vocab_size(g_tok),
                          .max_model_len = 64, .default_max_tokens = 16};
    return 0;
}

static int api_teardown(void **state) {
    dsi_tokenizer_destroy(g_tok);
    return 0;
}

/* Parses body[0..len) and returns the HTTP status (0 on success); the request,
 * message and parameter land in *r, g_msg and g_param. */
static int parse_n(const char *body, size_t len, int chat, dsi_api_req *r) {
    g_msg[0] = 0;
    return dsi__api_parse(&g_api, body, len, chat, r, g_msg, sizeof g_msg, &g_param);
}

static int parse(const char *body, int chat, dsi_api_req *r) { return parse_n(body, strlen(body), chat, r); }

/* Parses and frees; returns the status. */
static int status_of(const char *body, int chat) {
    dsi_api_req r;
    int st = parse(body, chat, &r);
    dsi__api_req_free(&r);
    return st;
}

/* The tokens of a prompt string parsed alone (malloc'ed). */
static size_t prompt_tokens(const char *body, int32_t **ids) {
    dsi_api_req r;
    assert_int_equal(parse(body, 0, &r), 0);
    size_t n = r.n_prompt;
    *ids = r.prompt;
    r.prompt = NULL;
    dsi__api_req_free(&r);
    return n;
}

/* The text pipeline is NUL-terminated: a NUL must be refused, not silently
 * cut the prompt short ("a\u0000bcdef" once ran as "a"). */
static void test_api_parse_nul_and_escapes(void **state) {
    assert_int_equal(status_of("{\"prompt\":\"a\\u0000bcdef\"}", 0), 400);
    assert_non_null(strstr(g_msg, "NUL characters (\\u0000) are not supported"));
    assert_int_equal(status_of("{\"messages\":[{\"role\":\"user\",\"content\":\"a\\u0000b\"}]}", 1), 400);
    assert_non_null(strstr(g_msg, "\\u0000"));

    /* a raw NUL byte, even in the middle of a string */
    static const char raw_nul[] = "{\"prompt\":\"a\0bcdef\"}";
    dsi_api_req r;
    assert_int_equal(parse_n(raw_nul, sizeof raw_nul - 1, 0, &r), 400);
    assert_non_null(strstr(g_msg, "not valid JSON (a NUL byte at byte 12)"));
    dsi__api_req_free(&r);
    static const char nul_after[] = "{\"prompt\":\"abc\"}\0";
    assert_int_equal(parse_n(nul_after, sizeof nul_after - 1, 0, &r), 400);
    assert_non_null(strstr(g_msg, "NUL byte at byte 16"));
    dsi__api_req_free(&r);

    /* \u without 4 hex digits (cJSON decodes it as a NUL) */
    assert_int_equal(status_of("{\"prompt\":\"a\\uZZZZb\"}", 0), 400);
    assert_non_null(strstr(g_msg, "not valid JSON"));
    assert_non_null(strstr(g_msg, "byte 12"));
    assert_int_equal(status_of("{\"prompt\":\"a\\u00\"}", 0), 400);
    assert_int_equal(status_of("{\"prompt\":\"a\\q\"}", 0), 400);

    /* raw control characters inside a string are not JSON (RFC 8259) */
    assert_int_equal(status_of("{\"prompt\":\"a\x01z\"}", 0), 400);
    assert_non_null(strstr(g_msg, "control character 0x01"));
    assert_int_equal(status_of("{\"prompt\":\"line\nbreak\"}", 0), 400);

    /* ...but whitespace between tokens is, and so are valid escapes */
    assert_int_equal(status_of("{\n\t\"prompt\" :\r\n \"a\\u00e9\\n\\t\\\"\\\\\\/b\"}", 0), 0);
    /* an escaped backslash followed by the letters u0000 is text, not a NUL */
    int32_t *ids;
    size_t n = prompt_tokens("{\"prompt\":\"\\\\u0000 xyz\"}", &ids);
    int32_t *want;
    size_t n_want;
    assert_int_equal(dsi_tokenizer_encode(g_tok, "\\u0000 xyz", 10, DSI_TOK_ADD_BOS, &want, &n_want), DSI_OK);
    assert_int_equal(n, n_want);
    assert_memory_equal(ids, want, n * sizeof *ids);
    free(ids);
    free(want);
}

static void test_api_parse_trailing_data(void **state) {
    assert_int_equal(status_of("{\"prompt\":\"a\"}xyz", 0), 400);
    assert_non_null(strstr(g_msg, "byte 14"));
    assert_int_equal(status_of("{\"prompt\":\"a\"}}}}", 0), 400);
    assert_int_equal(status_of("{\"prompt\":\"a\"} {}", 0), 400);
    assert_int_equal(status_of("{\"prompt\":\"a\"} \r\n\t", 0), 0);
}

/* max_tokens far past any context once was clamped to 1e9 and the error quoted
 * the clamped sum ("you requested 1000000007 tokens") */
static void test_api_parse_huge_max_tokens(void **state) {
    assert_int_equal(status_of("{\"prompt\":[1,2,3,4,5,6,7],\"max_tokens\":1e30}", 0), 400);
    assert_string_equal(g_param, "max_tokens");
    assert_non_null(strstr(g_msg, "too large"));
    assert_null(strstr(g_msg, "1000000"));
    assert_int_equal(status_of("{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"max_completion_tokens\":1e300}", 1),
                     400);
    assert_string_equal(g_param, "max_completion_tokens");
    assert_non_null(strstr(g_msg, "too large"));
    /* an ordinary overshoot keeps the exact figures */
    assert_int_equal(status_of("{\"prompt\":[1,2,3,4,5,6,7],\"max_tokens\":2000000000}", 0), 400);
    assert_non_null(strstr(g_msg, "you requested 2000000007 tokens (7 in the prompt, 2000000000 for the completion)"));
}

/* A malformed max_tokens is refused even when max_completion_tokens, which
 * takes precedence, is also given. */
static void test_api_parse_max_tokens_both(void **state) {
    const char *hi = "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],";
    char body[256];
    snprintf(body, sizeof body, "%s\"max_tokens\":\"x\",\"max_completion_tokens\":2}", hi);
    assert_int_equal(status_of(body, 1), 400);
    assert_string_equal(g_param, "max_tokens");
    snprintf(body, sizeof body, "%s\"max_tokens\":0,\"max_completion_tokens\":2}", hi);
    assert_int_equal(status_of(body, 1), 400);
    assert_string_equal(g_param, "max_tokens");
    snprintf(body, sizeof body, "%s\"max_tokens\":2,\"max_completion_tokens\":1.5}", hi);
    assert_int_equal(status_of(body, 1), 400);
    assert_string_equal(g_param, "max_completion_tokens");

    dsi_api_req r;
    snprintf(body, sizeof body, "%s\"max_tokens\":5,\"max_completion_tokens\":2}", hi);
    assert_int_equal(parse(body, 1, &r), 0);
    assert_int_equal(r.max_tokens, 2);
    dsi__api_req_free(&r);
    snprintf(body, sizeof body, "%s\"max_tokens\":5,\"max_completion_tokens\":null}", hi);
    assert_int_equal(parse(body, 1, &r), 0);
    assert_int_equal(r.max_tokens, 5);
    dsi__api_req_free(&r);
}

static void test_api_parse_roles(void **state) {
    assert_int_equal(status_of("{\"messages\":[{\"role\":\"bogus\",\"content\":\"hi\"}]}", 1), 400);
    assert_string_equal(g_param, "messages");
    assert_non_null(strstr(g_msg, "bogus"));
    assert_int_equal(status_of("{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"},{\"role\":\"\",\"content\":\"x\"}]}", 1),
                     400);
    assert_string_equal(g_param, "messages");
    assert_non_null(strstr(g_msg, "messages[1]"));
    assert_int_equal(status_of("{\"messages\":[{\"role\":\"User\",\"content\":\"hi\"}]}", 1), 400);

    assert_int_equal(status_of("{\"messages\":[{\"role\":\"system\",\"content\":\"s\"},{\"role\":\"user\",\"content\":\"hi\"},"
                               "{\"role\":\"assistant\",\"content\":\"yo\"},{\"role\":\"tool\",\"content\":\"42\"}]}",
                               1),
                     0);
    /* developer: OpenAI's newer name for system instructions, rendered as system */
    dsi_api_req dev, sys;
    assert_int_equal(parse("{\"messages\":[{\"role\":\"developer\",\"content\":\"Be brief.\"},"
                           "{\"role\":\"user\",\"content\":\"hi\"}]}",
                           1, &dev),
                     0);
    assert_int_equal(parse("{\"messages\":[{\"role\":\"system\",\"content\":\"Be brief.\"},"
                           "{\"role\":\"user\",\"content\":\"hi\"}]}",
                           1, &sys),
                     0);
    assert_int_equal(dev.n_prompt, sys.n_prompt);
    assert_memory_equal(dev.prompt, sys.prompt, sys.n_prompt * sizeof *sys.prompt);
    dsi__api_req_free(&dev);
    dsi__api_req_free(&sys);
}

/* A prompt of exactly max_model_len tokens: the error says it leaves no room,
 * rather than "maximum 64 ... your prompt has 64". */
static void test_api_parse_prompt_fills_context(void **state) {
    char body[512];
    int n = sprintf(body, "{\"prompt\":[");
    for (int i = 0; i < 64; i++) n += sprintf(body + n, "%s%d", i ? "," : "", 10 + i);
    sprintf(body + n, "]}");
    assert_int_equal(status_of(body, 0), 400);
    assert_string_equal(g_param, "prompt");
    assert_non_null(strstr(g_msg, "your prompt has 64 tokens, which leaves no room for a completion"));

    /* one token less leaves room for exactly one */
    sprintf(strrchr(body, ','), "]}");
    dsi_api_req r;
    assert_int_equal(parse(body, 0, &r), 0);
    assert_int_equal(r.n_prompt, 63);
    assert_int_equal(r.max_tokens, 1);
    dsi__api_req_free(&r);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_json_escaping),
        cmocka_unit_test(test_in_process_server),
        cmocka_unit_test(test_ids_unique_across_instances),
        cmocka_unit_test(test_eos_list),
    };
    const struct CMUnitTest api_tests[] = {
        cmocka_unit_test(test_api_parse_nul_and_escapes),
        cmocka_unit_test(test_api_parse_trailing_data),
        cmocka_unit_test(test_api_parse_huge_max_tokens),
        cmocka_unit_test(test_api_parse_max_tokens_both),
        cmocka_unit_test(test_api_parse_roles),
        cmocka_unit_test(test_api_parse_prompt_fills_context),
    };
    int failed = cmocka_run_group_tests(tests, NULL, NULL);
    return failed + cmocka_run_group_tests(api_tests, api_setup, api_teardown);
}
