/* Tokenizer: golden encode/decode/chat against Hugging Face `tokenizers` and Jinja2,
 * round-trip and streaming properties on random text, heap BPE against the naive
 * reference, errors, concurrency, and a bounded fuzz of the loader and the encoder. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <cjson/cJSON.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "dsinfer/tokenizer.h"
#include "tokenizer/tokenizer_impl.h"

#define GOLDEN DSI_TEST_DATA "/golden/tokenizer"

static dsi_tokenizer *g_tok;

static char *slurp(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = malloc((size_t)n + 1);
    assert_non_null(b);
    assert_int_equal(fread(b, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    b[n] = '\0';
    if (len) *len = (size_t)n;
    return b;
}

static int setup(void **state) { return dsi_tokenizer_load(GOLDEN, &g_tok) == DSI_OK ? 0 : -1; }
static int teardown(void **state) {
    dsi_tokenizer_destroy(g_tok);
    return 0;
}

static void assert_ids(const int32_t *ids, size_t n, const cJSON *expect) {
    assert_int_equal(n, (size_t)cJSON_GetArraySize(expect));
    size_t i = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, expect) assert_int_equal(ids[i++], e->valueint);
}

/* ---- golden ----------------------------------------------------------------------------- */

static void test_golden_encode_decode(void **state) {
    char *js = slurp(GOLDEN "/golden.json", NULL);
    cJSON *root = cJSON_Parse(js), *c;
    assert_non_null(root);
    int cases = 0;
    cJSON_ArrayForEach(c, cJSON_GetObjectItem(root, "encode")) {
        const char *text = cJSON_GetObjectItem(c, "text")->valuestring;
        int32_t *ids;
        size_t n;
        assert_int_equal(dsi_tokenizer_encode(g_tok, text, strlen(text), 0, &ids, &n), DSI_OK);
        assert_ids(ids, n, cJSON_GetObjectItem(c, "ids"));
        char *dec;
        size_t dl;
        assert_int_equal(dsi_tokenizer_decode(g_tok, ids, n, 0, &dec, &dl), DSI_OK);
        assert_string_equal(dec, cJSON_GetObjectItem(c, "decoded")->valuestring);
        free(dec);
        free(ids);
        assert_int_equal(dsi_tokenizer_encode(g_tok, text, strlen(text), DSI_TOK_ADD_BOS, &ids, &n), DSI_OK);
        assert_ids(ids, n, cJSON_GetObjectItem(c, "ids_with_bos"));
        free(ids);
        cases++;
    }
    assert_int_equal(cases, 20);
    cJSON_Delete(root);
    free(js);
}

static void test_golden_chat(void **state) {
    char *js = slurp(GOLDEN "/golden.json", NULL);
    cJSON *root = cJSON_Parse(js), *c;
    int cases = 0;
    cJSON_ArrayForEach(c, cJSON_GetObjectItem(root, "chat")) {
        char *text;
        size_t len, n;
        int32_t *ids;
        assert_int_equal(dsi_chat_render_cjson(g_tok, cJSON_GetObjectItem(c, "messages"), 1, &text, &len), DSI_OK);
        assert_string_equal(text, cJSON_GetObjectItem(c, "rendered")->valuestring);
        assert_int_equal(dsi_tokenizer_encode(g_tok, text, len, 0, &ids, &n), DSI_OK);
        assert_ids(ids, n, cJSON_GetObjectItem(c, "ids"));
        free(ids);
        free(text);
        cases++;
    }
    assert_int_equal(cases, 3);
    cJSON_Delete(root);
    free(js);
}

/* The string field `key` of o (malloc'd copy), from `key`_hex when present (texts with
 * NUL, which cJSON strings cannot hold). */
static char *json_text(const cJSON *o, const char *key, size_t *len) {
    char hk[64];
    snprintf(hk, sizeof hk, "%s_hex", key);
    const cJSON *h = cJSON_GetObjectItem(o, hk);
    if (cJSON_IsString(h)) {
        size_t n = strlen(h->valuestring) / 2;
        char *b = malloc(n + 1);
        for (size_t i = 0; i < n; i++) {
            unsigned v;
            sscanf(h->valuestring + 2 * i, "%2x", &v);
            b[i] = (char)v;
        }
        b[n] = '\0';
        *len = n;
        return b;
    }
    const char *s = cJSON_GetObjectItem(o, key)->valuestring;
    *len = strlen(s);
    return strdup(s);
}

/* 431 random and adversarial strings (all whitespace kinds, digits of other scripts,
 * CJK edges, controls, special-token fragments) and 150 random id sequences, with the
 * outputs of Hugging Face `tokenizers` 0.23.2 (tests/data/tokenizer/gen_random_hf.js). */
static void test_hf_random_cases(void **state) {
    char *js = slurp(DSI_TEST_DATA "/tokenizer/random_hf.json", NULL);
    cJSON *root = cJSON_Parse(js), *c;
    assert_non_null(root);
    int cases = 0;
    cJSON_ArrayForEach(c, cJSON_GetObjectItem(root, "encode")) {
        size_t len;
        char *text = json_text(c, "text", &len);
        int32_t *ids;
        size_t n;
        assert_int_equal(dsi_tokenizer_encode(g_tok, text, len, 0, &ids, &n), DSI_OK);
        assert_ids(ids, n, cJSON_GetObjectItem(c, "ids"));
        free(ids);
        assert_int_equal(dsi_tokenizer_encode(g_tok, text, len, DSI_TOK_ADD_BOS, &ids, &n), DSI_OK);
        assert_ids(ids, n, cJSON_GetObjectItem(c, "ids_with_bos"));
        free(ids);
        free(text);
        cases++;
    }
    assert_true(cases >= 400);
    cJSON_ArrayForEach(c, cJSON_GetObjectItem(root, "decode")) {
        const cJSON *list = cJSON_GetObjectItem(c, "ids"), *e;
        int32_t ids[64];
        size_t n = 0;
        cJSON_ArrayForEach(e, list) ids[n++] = e->valueint;
        for (int skip = 0; skip < 2; skip++) {
            char *text, *want;
            size_t len, want_len;
            want = json_text(c, skip ? "skip_special" : "text", &want_len);
            assert_int_equal(dsi_tokenizer_decode(g_tok, ids, n, skip ? DSI_TOK_SKIP_SPECIAL : 0, &text, &len), DSI_OK);
            assert_int_equal(len, want_len);
            assert_memory_equal(text, want, len);
            free(text);
            free(want);
        }
    }
    cJSON_Delete(root);
    free(js);
}

/* Tool calls, tool outputs and each template's quirks, for the golden template and the
 * other DeepSeek-V3/R1 templates, rendered by Jinja2 (tests/data/tokenizer/gen_chat_extra.py);
 * a conversation Jinja2 rejects must be rejected too. */
static void test_chat_extra_jinja(void **state) {
    char *js = slurp(DSI_TEST_DATA "/tokenizer/chat_extra.json", NULL);
    size_t tl;
    char *tj = slurp(GOLDEN "/tokenizer.json", &tl), *golden_cfg = slurp(GOLDEN "/tokenizer_config.json", NULL);
    cJSON *root = cJSON_Parse(js), *tmpl, *c;
    int n_templates = 0;
    cJSON_ArrayForEach(tmpl, cJSON_GetObjectItem(root, "templates")) {
        const char *name = tmpl->string, *where = tmpl->valuestring;
        char *cfg;
        if (!strcmp(where, "golden")) {
            cfg = strdup(golden_cfg);
        } else { /* the golden config with this template swapped in */
            char path[512];
            snprintf(path, sizeof path, "%s/tokenizer/%s", DSI_TEST_DATA, where);
            char *text = slurp(path, NULL);
            cJSON *conf = cJSON_Parse(golden_cfg);
            cJSON_ReplaceItemInObject(conf, "chat_template", cJSON_CreateString(text));
            cfg = cJSON_PrintUnformatted(conf);
            cJSON_Delete(conf);
            free(text);
        }
        dsi_tokenizer *t;
        assert_int_equal(dsi_tokenizer_load_json(tj, tl, cfg, strlen(cfg), &t), DSI_OK);
        assert_non_null(dsi_chat_template_name(t));
        assert_string_equal(dsi_chat_template_name(t), name);
        { /* the first case ends with a generation prompt: does it open <think>? */
            const char *r0 = cJSON_GetObjectItem(cJSON_GetObjectItem(cJSON_GetArrayItem(cJSON_GetObjectItem(root, "cases"), 0), "rendered"), name)->valuestring;
            size_t l0 = strlen(r0);
            assert_int_equal(dsi_chat_prompt_opens_reasoning(t), l0 >= 8 && !strcmp(r0 + l0 - 8, "<think>\n"));
        }
        int cases = 0;
        cJSON_ArrayForEach(c, cJSON_GetObjectItem(root, "cases")) {
            char *text;
            size_t len;
            int gen = cJSON_IsTrue(cJSON_GetObjectItem(c, "add_generation_prompt"));
            const cJSON *want = cJSON_GetObjectItem(cJSON_GetObjectItem(c, "rendered"), name);
            int rc = dsi_chat_render_cjson(t, cJSON_GetObjectItem(c, "messages"), gen, &text, &len);
            const char *cname = cJSON_GetObjectItem(c, "name")->valuestring;
            if (cJSON_IsNull(want)) {
                if (rc == DSI_OK) fail_msg("%s / %s: Jinja2 rejects it, we rendered '%s'", name, cname, text);
                assert_int_equal(rc, DSI_EINVAL);
                continue;
            }
            if (rc) fail_msg("%s / %s: %s", name, cname, dsi_last_error());
            if (strcmp(text, want->valuestring))
                fail_msg("%s / %s (gen %d):\n got  '%s'\n want '%s'", name, cname, gen, text, want->valuestring);
            free(text);
            cases++;
        }
        assert_true(cases >= 20);
        dsi_tokenizer_destroy(t);
        free(cfg);
        n_templates++;
    }
    assert_int_equal(n_templates, 5);
    cJSON_Delete(root);
    free(js);
    free(tj);
    free(golden_cfg);
}

/* Copies of a template that differ only in layout (indentation, trim markers, a raw
 * newline instead of the \n escape in a literal) are the same template; a changed
 * literal is not. */
static void test_chat_fingerprint(void **state) {
    char *t = slurp(DSI_TEST_DATA "/tokenizer/templates/deepseek-v3-0324.jinja", NULL);
    uint64_t base = dsi__chat_fingerprint(t);
    size_t n = strlen(t);
    char *v = malloc(4 * n + 16), *o = v;
    for (const char *p = t; *p; p++) { /* raw newlines for "\n", spaces after tags, trim markers */
        if (p[0] == '\\' && p[1] == 'n') *o++ = '\n', p++;
        else if (p[0] == '%' && p[1] == '}' && p > t && p[-1] != '-') memcpy(o, "-%}\n  ", 6), o += 6, p++;
        else *o++ = *p;
    }
    *o = '\0';
    assert_true(dsi__chat_fingerprint(v) == base);
    char *w = strdup(t), *q = strstr(w, "'\\n\\n'");
    assert_non_null(q);
    q[3] = ' '; /* '\n\n' -> '\n n' */
    assert_true(dsi__chat_fingerprint(w) != base);
    free(t);
    free(v);
    free(w);
}

static void test_chat_struct_api_and_errors(void **state) {
    dsi_chat_tool_call call = {"function", "f", "{}"};
    dsi_chat_message m[] = {{"user", "hi", NULL, 0}, {"assistant", NULL, &call, 1}, {"tool", "1", NULL, 0}};
    char *text;
    size_t len;
    assert_int_equal(dsi_chat_render(g_tok, m, 3, 1, &text, &len), DSI_OK);
    assert_string_equal(text, "<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>"
                              "function<｜tool▁sep｜>f\n```json\n{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>"
                              "<｜end▁of▁sentence｜><｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>1<｜tool▁output▁end｜>"
                              "<｜tool▁outputs▁end｜>");
    assert_int_equal(len, strlen(text));
    free(text);
    /* content parts are joined; bad shapes are clear errors */
    const char *parts = "[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"a\"},{\"type\":\"text\",\"text\":\"b\"}]}]";
    assert_int_equal(dsi_chat_render_json(g_tok, parts, strlen(parts), 0, &text, &len), DSI_OK);
    assert_string_equal(text, "<｜begin▁of▁sentence｜><｜User｜>ab");
    free(text);
    const char *bad[] = {"{", "[1]", "[{\"role\":\"user\"}]", "[{\"role\":\"assistant\"}]", "[{\"role\":\"user\",\"content\":5}]",
                         "[{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[{\"type\":\"function\"}]}]",
                         "[{\"role\":\"tool\",\"content\":null}]", "[{\"role\":\"user\",\"content\":[{\"type\":\"image_url\"}]}]"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        text = (char *)1;
        assert_int_equal(dsi_chat_render_json(g_tok, bad[i], strlen(bad[i]), 1, &text, &len), DSI_EINVAL);
        assert_null(text);
        assert_true(strlen(dsi_last_error()) > 0);
    }
}

/* ---- accessors and errors -------------------------------------------------------------------- */

static void test_accessors(void **state) {
    assert_int_equal(dsi_tokenizer_vocab_size(g_tok), 2000);
    assert_int_equal(dsi_tokenizer_bos_id(g_tok), 0);
    assert_int_equal(dsi_tokenizer_eos_id(g_tok), 1);
    assert_int_equal(dsi_tokenizer_add_bos_default(g_tok), 1);
    assert_int_equal(dsi_tokenizer_token_id(g_tok, "<｜User｜>"), 3);
    assert_int_equal(dsi_tokenizer_token_id(g_tok, "</think>"), 6);
    assert_int_equal(dsi_tokenizer_token_id(g_tok, "<｜NoSuch｜>"), DSI_ENOTFOUND);
    assert_non_null(strstr(dsi_last_error(), "NoSuch"));
    assert_true(dsi_tokenizer_is_special(g_tok, 4));
    assert_false(dsi_tokenizer_is_special(g_tok, 100));
    size_t n;
    const char *b = dsi_tokenizer_token_bytes(g_tok, 236, &n);
    assert_int_equal(n, 1);
    assert_int_equal(b[0], ' ');
    assert_null(dsi_tokenizer_token_bytes(g_tok, 5000, &n));
}

static void test_encode_decode_errors(void **state) {
    int32_t *ids;
    size_t n;
    const char *bad[] = {"\xff", "ab\xc3", "\xed\xa0\x80", "\xc0\xaf", "\xf4\x90\x80\x80", "ok\x80ok"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        assert_int_equal(dsi_tokenizer_encode(g_tok, bad[i], strlen(bad[i]), 0, &ids, &n), DSI_EINVAL);
        assert_non_null(strstr(dsi_last_error(), "UTF-8"));
    }
    int32_t badids[] = {5, 2000};
    char *text;
    assert_int_equal(dsi_tokenizer_decode(g_tok, badids, 2, 0, &text, &n), DSI_ERANGE);
    badids[1] = -1;
    assert_int_equal(dsi_tokenizer_decode(g_tok, badids, 2, 0, &text, &n), DSI_ERANGE);
    /* specials as plain text, and skipping specials on decode */
    const char *s = "<｜User｜>hi";
    assert_int_equal(dsi_tokenizer_encode(g_tok, s, strlen(s), DSI_TOK_PLAIN_SPECIAL, &ids, &n), DSI_OK);
    assert_true(n > 3);
    for (size_t i = 0; i < n; i++) assert_int_not_equal(ids[i], 3);
    assert_int_equal(dsi_tokenizer_decode(g_tok, ids, n, 0, &text, NULL), DSI_OK);
    assert_string_equal(text, s);
    free(text);
    free(ids);
    assert_int_equal(dsi_tokenizer_encode(g_tok, s, strlen(s), DSI_TOK_ADD_BOS, &ids, &n), DSI_OK);
    assert_int_equal(dsi_tokenizer_decode(g_tok, ids, n, DSI_TOK_SKIP_SPECIAL, &text, NULL), DSI_OK);
    assert_string_equal(text, "hi");
    free(text);
    free(ids);
    /* invalid UTF-8 produced by partial tokens decodes lossily */
    int32_t partial[] = {178, 131}; /* first two bytes of 深 */
    assert_int_equal(dsi_tokenizer_decode(g_tok, partial, 2, 0, &text, &n), DSI_OK);
    assert_string_equal(text, "\xef\xbf\xbd");
    free(text);
}

/* Loads tokenizer.json text with optional config; returns status. */
static int load_mem(const char *tj, const char *cfg, dsi_tokenizer **t) {
    return dsi_tokenizer_load_json(tj, strlen(tj), cfg, cfg ? strlen(cfg) : 0, t);
}

static void test_chat_template_required(void **state) {
    size_t tl;
    char *tj = slurp(GOLDEN "/tokenizer.json", &tl);
    dsi_tokenizer *t;
    char *text;
    size_t len;
    dsi_chat_message m = {"user", "x", NULL, 0};
    assert_int_equal(dsi_tokenizer_load_json(tj, tl, NULL, 0, &t), DSI_OK);
    assert_int_equal(dsi_tokenizer_bos_id(t), 0); /* from the post-processor */
    assert_int_equal(dsi_chat_render(t, &m, 1, 1, &text, &len), DSI_EUNSUPPORTED);
    assert_non_null(strstr(dsi_last_error(), "no chat_template"));
    dsi_tokenizer_destroy(t);
    const char *other = "{\"bos_token\":\"<｜begin▁of▁sentence｜>\",\"chat_template\":\"{{ messages }}\"}";
    assert_int_equal(dsi_tokenizer_load_json(tj, tl, other, strlen(other), &t), DSI_OK);
    assert_int_equal(dsi_chat_render(t, &m, 1, 1, &text, &len), DSI_EUNSUPPORTED);
    assert_non_null(strstr(dsi_last_error(), "unrecognised"));
    dsi_tokenizer_destroy(t);
    const char *unknown_bos = "{\"bos_token\":\"<s>\"}";
    assert_int_equal(dsi_tokenizer_load_json(tj, tl, unknown_bos, strlen(unknown_bos), &t), DSI_EFORMAT);
    assert_non_null(strstr(dsi_last_error(), "<s>"));
    assert_null(t);
    assert_int_equal(dsi_tokenizer_load("/nonexistent-dir", &t), DSI_ENOTFOUND);

    /* bos_token as an AddedToken object, and the template in chat_template.jinja */
    char dir[] = "/tmp/dsi_tok_XXXXXX", path[256];
    assert_non_null(mkdtemp(dir));
    const char *cfg = "{\"bos_token\":{\"__type\":\"AddedToken\",\"content\":\"<｜begin▁of▁sentence｜>\"},"
                      "\"eos_token\":\"<｜end▁of▁sentence｜>\"}";
    char *golden_cfg = slurp(GOLDEN "/tokenizer_config.json", NULL);
    cJSON *gc = cJSON_Parse(golden_cfg);
    const char *files[3][2] = {{"tokenizer.json", tj}, {"tokenizer_config.json", cfg},
                               {"chat_template.jinja", cJSON_GetObjectItem(gc, "chat_template")->valuestring}};
    for (int i = 0; i < 3; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, files[i][0]);
        FILE *f = fopen(path, "wb");
        assert_non_null(f);
        fputs(files[i][1], f);
        fclose(f);
    }
    assert_int_equal(dsi_tokenizer_load(dir, &t), DSI_OK);
    assert_int_equal(dsi_tokenizer_bos_id(t), 0);
    assert_string_equal(dsi_chat_template_name(t), "deepseek-r1-distill");
    assert_int_equal(dsi_chat_render(t, &m, 1, 1, &text, &len), DSI_OK);
    assert_string_equal(text, "<｜begin▁of▁sentence｜><｜User｜>x<｜Assistant｜><think>\n");
    free(text);
    dsi_tokenizer_destroy(t);
    for (int i = 0; i < 3; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, files[i][0]);
        remove(path);
    }
    rmdir(dir);
    cJSON_Delete(gc);
    free(golden_cfg);
    free(tj);
}

static void test_loader_errors(void **state) {
    dsi_tokenizer *t;
    struct {
        const char *json;
        int rc;
    } cases[] = {
        {"", DSI_EFORMAT},
        {"[]", DSI_EFORMAT},
        {"{\"model\":{\"type\":\"BPE\",\"vocab\":{}}}", DSI_EFORMAT},
        {"{\"model\":{\"type\":\"WordPiece\",\"vocab\":{\"a\":0}}}", DSI_EUNSUPPORTED},
        {"{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":-1}}}", DSI_EFORMAT},
        {"{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":1e12}}}", DSI_EFORMAT},
        {"{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0,\"b\":0}}}", DSI_EFORMAT},
        {"{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0,\"b\":1},\"merges\":[\"a c\"]}}", DSI_EFORMAT},
        {"{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0,\"b\":1},\"merges\":[\"a b\"]}}", DSI_EFORMAT},
        {"{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0,\"b\":1},\"merges\":[\"ab\"]}}", DSI_EFORMAT},
        {"{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0,\"b\":1},\"merges\":[[\"a\"]]}}", DSI_EFORMAT},
        {"{\"model\":{\"vocab\":{\"a\":0}},\"pre_tokenizer\":{\"type\":\"Split\",\"pattern\":{\"Regex\":\"(\"},\"behavior\":\"Isolated\"}}", DSI_EFORMAT},
        {"{\"model\":{\"vocab\":{\"a\":0}},\"pre_tokenizer\":{\"type\":\"Split\",\"pattern\":{\"Regex\":\"a\"},\"behavior\":\"Sideways\"}}", DSI_EFORMAT},
        {"{\"model\":{\"vocab\":{\"a\":0}},\"pre_tokenizer\":{\"type\":\"Whitespace\"}}", DSI_EUNSUPPORTED},
        {"{\"model\":{\"vocab\":{\"a\":0}},\"normalizer\":{\"type\":\"NFC\"}}", DSI_EUNSUPPORTED},
        {"{\"model\":{\"vocab\":{\"a\":0}},\"normalizer\":{\"type\":\"Sequence\",\"normalizers\":[{\"type\":\"NFC\"}]}}", DSI_EUNSUPPORTED},
        {"{\"model\":{\"vocab\":{\"a\":0}},\"decoder\":{\"type\":\"WordPiece\"}}", DSI_EUNSUPPORTED},
        {"{\"model\":{\"vocab\":{\"a\":0}},\"added_tokens\":[{\"id\":\"x\",\"content\":\"q\"}]}", DSI_EFORMAT},
        {"{\"model\":{\"vocab\":{\"a\":0},\"unk_token\":\"zz\"}}", DSI_EFORMAT},
        {"{\"model\":{\"vocab\":{\"a\":0}},\"post_processor\":{\"type\":\"TemplateProcessing\",\"single\":[{\"SpecialToken\":{\"id\":\"<s>\"}}]}}", DSI_EFORMAT},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        t = (dsi_tokenizer *)1;
        int rc = load_mem(cases[i].json, NULL, &t);
        if (rc != cases[i].rc) fail_msg("case %zu: got %d (%s)", i, rc, dsi_last_error());
        assert_null(t);
        assert_true(strlen(dsi_last_error()) > 0);
    }
    /* null where a list may be: nothing there */
    assert_int_equal(load_mem("{\"model\":{\"vocab\":{\"a\":0},\"merges\":null},\"added_tokens\":null}", NULL, &t), DSI_OK);
    dsi_tokenizer_destroy(t);
}

/* Split behaviours, String patterns, lstrip/rstrip: pieces show through merges that
 * only apply inside a piece. */
static void test_split_behaviors(void **state) {
    static const char *names[] = {"Isolated", "Removed", "MergedWithPrevious", "MergedWithNext", "Contiguous"};
    static const char *expect[] = {"a|-|-|b", "a|b", "a-|-|b", "a|-|-b", "a|--|b"};
    for (int k = 0; k < 5; k++) {
        char js[1024];
        snprintf(js, sizeof js,
                 "{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0,\"b\":1,\"-\":2,\"a-\":3,\"-b\":4,\"--\":5},"
                 "\"merges\":[\"a -\",\"- b\",\"- -\"]},\"pre_tokenizer\":{\"type\":\"Split\","
                 "\"pattern\":{\"String\":\"-\"},\"behavior\":\"%s\",\"invert\":false}}", names[k]);
        dsi_tokenizer *t;
        if (load_mem(js, NULL, &t)) fail_msg("%s", dsi_last_error());
        int32_t *ids;
        size_t n;
        assert_int_equal(dsi_tokenizer_encode(t, "a--b", 4, 0, &ids, &n), DSI_OK);
        static const char *spell[] = {"a", "b", "-", "a-", "-b", "--"};
        char got[64] = "";
        for (size_t i = 0; i < n; i++) {
            if (i) strcat(got, "|");
            strcat(got, spell[ids[i]]);
        }
        if (strcmp(got, expect[k])) fail_msg("%s: got %s want %s", names[k], got, expect[k]);
        free(ids);
        dsi_tokenizer_destroy(t);
    }
    /* Digits pre-tokenizer and an empty normalizer Sequence (as DeepSeek-V3 ships) */
    for (int individual = 0; individual < 2; individual++) {
        char js[1024];
        snprintf(js, sizeof js,
                 "{\"normalizer\":{\"type\":\"Sequence\",\"normalizers\":[]},\"model\":{\"type\":\"BPE\","
                 "\"vocab\":{\"1\":0,\"2\":1,\"12\":2,\"x\":3,\"x1\":4},\"merges\":[\"1 2\",\"x 1\"]},"
                 "\"pre_tokenizer\":{\"type\":\"Digits\",\"individual_digits\":%s}}", individual ? "true" : "false");
        dsi_tokenizer *t;
        if (load_mem(js, NULL, &t)) fail_msg("%s", dsi_last_error());
        int32_t *ids;
        size_t n;
        assert_int_equal(dsi_tokenizer_encode(t, "x12", 3, 0, &ids, &n), DSI_OK);
        /* x|12 -> [x, 12]; individual: x|1|2 -> [x, 1, 2]; never the cross-piece x1 */
        assert_int_equal(n, individual ? 3 : 2);
        assert_int_equal(ids[0], 3);
        assert_int_equal(ids[1], individual ? 0 : 2);
        free(ids);
        dsi_tokenizer_destroy(t);
    }
    /* lstrip/rstrip added tokens absorb surrounding whitespace */
    const char *js = "{\"model\":{\"type\":\"BPE\",\"vocab\":{\"x\":0,\" \":1,\"<m>\":2}},"
                     "\"added_tokens\":[{\"id\":2,\"content\":\"<m>\",\"lstrip\":true,\"rstrip\":true,\"special\":true}]}";
    dsi_tokenizer *t;
    if (load_mem(js, NULL, &t)) fail_msg("%s", dsi_last_error());
    int32_t *ids;
    size_t n;
    assert_int_equal(dsi_tokenizer_encode(t, "x  <m>  x", 9, 0, &ids, &n), DSI_OK);
    assert_int_equal(n, 3);
    assert_int_equal(ids[0], 0);
    assert_int_equal(ids[1], 2);
    assert_int_equal(ids[2], 0);
    free(ids);
    dsi_tokenizer_destroy(t);
}

/* Every Split behaviour with and without invert, String and Regex patterns, and
 * lstrip/rstrip/non-special added tokens, against Hugging Face `tokenizers`
 * (tests/data/tokenizer/gen_behaviors_hf.js). */
static void test_hf_behaviors(void **state) {
    char *js = slurp(DSI_TEST_DATA "/tokenizer/behaviors_hf.json", NULL);
    cJSON *root = cJSON_Parse(js), *c;
    assert_non_null(root);
    cJSON *model = cJSON_GetObjectItem(root, "model"), *configs = cJSON_GetObjectItem(root, "configs");
    int n_cfg = cJSON_GetArraySize(configs), cases = 0;
    dsi_tokenizer **toks = calloc(n_cfg, sizeof *toks);
    for (int k = 0; k < n_cfg; k++) {
        cJSON *cfg = cJSON_Duplicate(cJSON_GetArrayItem(configs, k), 1);
        cJSON_AddItemToObject(cfg, "model", cJSON_Duplicate(model, 1));
        char *text = cJSON_PrintUnformatted(cfg);
        if (load_mem(text, NULL, &toks[k])) fail_msg("config %d: %s", k, dsi_last_error());
        free(text);
        cJSON_Delete(cfg);
    }
    cJSON_ArrayForEach(c, cJSON_GetObjectItem(root, "cases")) {
        int k = cJSON_GetObjectItem(c, "config")->valueint;
        const char *text = cJSON_GetObjectItem(c, "text")->valuestring;
        int32_t *ids;
        size_t n;
        assert_int_equal(dsi_tokenizer_encode(toks[k], text, strlen(text), 0, &ids, &n), DSI_OK);
        assert_ids(ids, n, cJSON_GetObjectItem(c, "ids"));
        free(ids);
        cases++;
    }
    assert_true(cases >= 300);
    for (int k = 0; k < n_cfg; k++) dsi_tokenizer_destroy(toks[k]);
    free(toks);
    cJSON_Delete(root);
    free(js);
}

/* ByteLevel's GPT-2 regex, ignore_merges, a BOS+EOS template and a char-level model
 * with unk_token, against Hugging Face `tokenizers` (gen_variants_hf.js): each variant
 * patches the golden tokenizer.json or is a whole small one. */
static void test_hf_variants(void **state) {
    char *js = slurp(DSI_TEST_DATA "/tokenizer/variants_hf.json", NULL), *golden = slurp(GOLDEN "/tokenizer.json", NULL);
    cJSON *root = cJSON_Parse(js), *v, *c, *it;
    dsi_tokenizer *toks[8] = {0};
    int k = 0, add_special[8] = {0}, cases = 0;
    cJSON_ArrayForEach(v, cJSON_GetObjectItem(root, "variants")) {
        cJSON *json = cJSON_IsObject(cJSON_GetObjectItem(v, "whole")) ? cJSON_Duplicate(cJSON_GetObjectItem(v, "whole"), 1)
                                                                      : cJSON_Parse(golden);
        cJSON_ArrayForEach(it, cJSON_GetObjectItem(v, "patch")) cJSON_ReplaceItemInObject(json, it->string, cJSON_Duplicate(it, 1));
        cJSON_ArrayForEach(it, cJSON_GetObjectItem(v, "model_patch"))
            cJSON_ReplaceItemInObject(cJSON_GetObjectItem(json, "model"), it->string, cJSON_Duplicate(it, 1));
        char *text = cJSON_PrintUnformatted(json);
        if (load_mem(text, NULL, &toks[k])) fail_msg("%s: %s", cJSON_GetObjectItem(v, "name")->valuestring, dsi_last_error());
        add_special[k] = cJSON_IsTrue(cJSON_GetObjectItem(v, "add_special"));
        free(text);
        cJSON_Delete(json);
        k++;
    }
    assert_int_equal(k, 4);
    cJSON_ArrayForEach(c, cJSON_GetObjectItem(root, "cases")) {
        int vi = cJSON_GetObjectItem(c, "variant")->valueint;
        const char *text = cJSON_GetObjectItem(c, "text")->valuestring;
        int32_t *ids;
        size_t n;
        assert_int_equal(dsi_tokenizer_encode(toks[vi], text, strlen(text), add_special[vi] ? DSI_TOK_ADD_BOS : 0, &ids, &n), DSI_OK);
        assert_ids(ids, n, cJSON_GetObjectItem(c, "ids"));
        free(ids);
        cases++;
    }
    assert_true(cases >= 200);
    for (int i = 0; i < k; i++) dsi_tokenizer_destroy(toks[i]);
    cJSON_Delete(root);
    free(js);
    free(golden);
}

/* ---- random text properties ------------------------------------------------------------------ */

static uint64_t g_rng = 0x243F6A8885A308D3ull;
static uint32_t rnd(void) {
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return (uint32_t)(g_rng >> 11);
}

static size_t put_cp(char *o, uint32_t cp) {
    if (cp < 0x80) return o[0] = (char)cp, 1;
    if (cp < 0x800) return o[0] = (char)(0xC0 | cp >> 6), o[1] = (char)(0x80 | (cp & 63)), 2;
    if (cp < 0x10000) return o[0] = (char)(0xE0 | cp >> 12), o[1] = (char)(0x80 | (cp >> 6 & 63)), o[2] = (char)(0x80 | (cp & 63)), 3;
    o[0] = (char)(0xF0 | cp >> 18), o[1] = (char)(0x80 | (cp >> 12 & 63));
    o[2] = (char)(0x80 | (cp >> 6 & 63)), o[3] = (char)(0x80 | (cp & 63));
    return 4;
}

/* Random valid UTF-8 of up to max_chars characters, biased to the cases the
 * pre-tokenizer distinguishes. Returns its length; o needs 4*max_chars+64 bytes. */
static size_t random_text(char *o, size_t max_chars) {
    static const char *frags[] = {"<｜User｜>", "<think>", "</think>", "<｜", "\r\n", "  ", "don't", "1234"};
    static const uint32_t ws[] = {0x20, 0x09, 0x0A, 0x0D, 0x0B, 0x0C, 0x85, 0xA0, 0x2009, 0x3000, 0x2028, 0x200D, 0xFE0F};
    size_t n = rnd() % (max_chars + 1), len = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t r = rnd() % 100, cp;
        if (r < 35) cp = 0x20 + rnd() % 95;
        else if (r < 45) cp = ws[rnd() % (sizeof ws / sizeof *ws)];
        else if (r < 52) cp = '0' + rnd() % 10;
        else if (r < 60) cp = 0xC0 + rnd() % 0x1C0;
        else if (r < 63) cp = 0x300 + rnd() % 0x70;
        else if (r < 73) cp = 0x4E00 + rnd() % 0x51A6;
        else if (r < 78) cp = 0x3040 + rnd() % 0xC0;
        else if (r < 83) cp = 0x1F300 + rnd() % 0x400;
        else if (r < 88) {
            const char *f = frags[rnd() % (sizeof frags / sizeof *frags)];
            memcpy(o + len, f, strlen(f));
            len += strlen(f);
            continue;
        } else {
            do cp = rnd() % 0x110000;
            while (cp >= 0xD800 && cp <= 0xDFFF);
        }
        len += put_cp(o + len, cp);
    }
    return len;
}

static void test_roundtrip_and_naive_reference(void **state) {
    char *buf = malloc(4 * 300 + 64);
    for (int it = 0; it < 3000; it++) {
        size_t len = random_text(buf, 300);
        int32_t *a, *b;
        size_t na, nb;
        unsigned flags = (it & 1) ? DSI_TOK_ADD_BOS : 0;
        assert_int_equal(dsi_tokenizer_encode(g_tok, buf, len, flags, &a, &na), DSI_OK);
        assert_int_equal(dsi__encode_ex(g_tok, buf, len, flags, DSI__BPE_NAIVE, 0, &b, &nb), DSI_OK);
        assert_int_equal(na, nb);
        assert_memory_equal(a, b, na * sizeof *a);
        char *text;
        size_t tl;
        assert_int_equal(dsi_tokenizer_decode(g_tok, a, na, DSI_TOK_SKIP_SPECIAL * 0, &text, &tl), DSI_OK);
        size_t skip = (flags & DSI_TOK_ADD_BOS) ? strlen("<｜begin▁of▁sentence｜>") : 0;
        assert_int_equal(tl, len + skip);
        assert_memory_equal(text + skip, buf, len);
        free(text);
        free(a);
        free(b);
    }
    free(buf);
}

static int valid_utf8(const char *s, size_t n) { return dsi__utf8_invalid_at(s, n) == n; }

/* Streaming output equals one-shot decode, each piece valid UTF-8, for real token
 * sequences and for random ids (which produce broken byte sequences). */
static void test_detok_streaming(void **state) {
    char *buf = malloc(4 * 200 + 64), *acc = malloc(64 * 1024);
    for (int it = 0; it < 1500; it++) {
        int32_t *ids;
        size_t n;
        if (it % 2 == 0) {
            size_t len = random_text(buf, 200);
            assert_int_equal(dsi_tokenizer_encode(g_tok, buf, len, 0, &ids, &n), DSI_OK);
        } else {
            n = rnd() % 60;
            ids = malloc((n + 1) * sizeof *ids);
            for (size_t i = 0; i < n; i++) ids[i] = (int32_t)(rnd() % 2000);
        }
        unsigned flags = (it % 3 == 0) ? DSI_TOK_SKIP_SPECIAL : 0;
        dsi_detok *d;
        assert_int_equal(dsi_detok_create(g_tok, flags, &d), DSI_OK);
        size_t al = 0, pl;
        const char *piece;
        for (size_t i = 0; i < n; i++) {
            assert_int_equal(dsi_detok_push(d, ids[i], &piece, &pl), DSI_OK);
            assert_true(valid_utf8(piece, pl));
            memcpy(acc + al, piece, pl);
            al += pl;
        }
        assert_int_equal(dsi_detok_push(d, 99999, &piece, &pl), DSI_ERANGE);
        assert_int_equal(dsi_detok_flush(d, &piece, &pl), DSI_OK);
        memcpy(acc + al, piece, pl);
        al += pl;
        char *whole;
        size_t wl;
        assert_int_equal(dsi_tokenizer_decode(g_tok, ids, n, flags, &whole, &wl), DSI_OK);
        assert_int_equal(al, wl);
        assert_memory_equal(acc, whole, wl);
        free(whole);
        free(ids);
        dsi_detok_destroy(d);
    }
    dsi_detok_destroy(NULL);
    free(buf);
    free(acc);
}

/* ---- reasoning split ----------------------------------------------------------------------------- */

static void split_all(const char *s, int starts, size_t chunk, char *reas, char *cont) {
    dsi_reasoning *r;
    dsi_reasoning_delta d;
    assert_int_equal(dsi_reasoning_create(starts, &r), DSI_OK);
    size_t n = strlen(s), rl = 0, cl = 0;
    for (size_t i = 0; i <= n; i += chunk) {
        size_t k = DSI_MIN(chunk, n - i);
        assert_int_equal(dsi_reasoning_push(r, s + i, k, &d), DSI_OK);
        memcpy(reas + rl, d.reasoning, d.reasoning_len), rl += d.reasoning_len;
        memcpy(cont + cl, d.content, d.content_len), cl += d.content_len;
    }
    assert_int_equal(dsi_reasoning_finish(r, &d), DSI_OK);
    memcpy(reas + rl, d.reasoning, d.reasoning_len), rl += d.reasoning_len;
    memcpy(cont + cl, d.content, d.content_len), cl += d.content_len;
    reas[rl] = cont[cl] = '\0';
    dsi_reasoning_destroy(r);
}

static void test_reasoning_split(void **state) {
    struct {
        const char *in;
        int starts;
        const char *reasoning, *content;
    } cases[] = {
        {"Let me think.\n</think>\n\nThe answer is 4.", 1, "Let me think.\n", "\n\nThe answer is 4."},
        {"<think>\nhmm</think>ok", 1, "\nhmm", "ok"},
        {"<think>\nhmm</think>ok <think>x</think>", 0, "\nhmm", "ok <think>x</think>"},
        {"plain answer", 0, "", "plain answer"},
        {"still thinking </thi", 1, "still thinking </thi", ""},
        {"<thi", 0, "", "<thi"},
        {"<think>", 0, "", ""},
        {"a < b </ c </think", 1, "a < b </ c </think", ""},
        {"</think></think>", 1, "", "</think>"},
        {"", 1, "", ""},
    };
    char reas[256], cont[256];
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++)
        for (size_t chunk = 1; chunk <= 9; chunk += 2) {
            split_all(cases[i].in, cases[i].starts, chunk, reas, cont);
            if (strcmp(reas, cases[i].reasoning) || strcmp(cont, cases[i].content))
                fail_msg("case %zu chunk %zu: reasoning '%s' content '%s'", i, chunk, reas, cont);
        }
    dsi_reasoning *r;
    dsi_reasoning_delta d;
    assert_int_equal(dsi_reasoning_create(1, &r), DSI_OK);
    assert_false(dsi_reasoning_in_content(r));
    assert_int_equal(dsi_reasoning_push(r, "x</think>y", 10, &d), DSI_OK);
    assert_true(dsi_reasoning_in_content(r));
    dsi_reasoning_destroy(r);
    dsi_reasoning_destroy(NULL);
}

/* ---- concurrency ---------------------------------------------------------------------------------- */

typedef struct job {
    const char *text;
    size_t len;
    const int32_t *expect;
    size_t n_expect;
    int failures;
} job;

static void *encode_many(void *p) {
    job *j = p;
    for (int it = 0; it < 40; it++) {
        int32_t *ids;
        size_t n;
        if (dsi_tokenizer_encode(g_tok, j->text, j->len, 0, &ids, &n) != DSI_OK || n != j->n_expect ||
            memcmp(ids, j->expect, n * sizeof *ids))
            j->failures++;
        free(ids);
    }
    return NULL;
}

static void test_concurrent_encode(void **state) {
    enum { T = 4 };
    char *texts[T];
    job jobs[T];
    pthread_t th[T];
    for (int t = 0; t < T; t++) {
        texts[t] = malloc(4 * 3000 + 64);
        size_t len = 0;
        while (len < 4000) len += random_text(texts[t] + len, 50);
        int32_t *ids;
        size_t n;
        assert_int_equal(dsi__encode_ex(g_tok, texts[t], len, 0, DSI__BPE_NAIVE, 0, &ids, &n), DSI_OK);
        jobs[t] = (job){texts[t], len, ids, n, 0};
    }
    for (int t = 0; t < T; t++) assert_int_equal(pthread_create(&th[t], NULL, encode_many, &jobs[t]), 0);
    for (int t = 0; t < T; t++) {
        pthread_join(th[t], NULL);
        assert_int_equal(jobs[t].failures, 0);
        free((void *)jobs[t].expect);
        free(texts[t]);
    }
}

/* ---- fuzz ------------------------------------------------------------------------------------------ */

static void exercise(dsi_tokenizer *t) {
    char buf[512];
    for (int k = 0; k < 4; k++) {
        size_t len = random_text(buf, 100);
        int32_t *ids;
        size_t n;
        if (dsi_tokenizer_encode(t, buf, len, DSI_TOK_ADD_BOS, &ids, &n) == DSI_OK) {
            char *text;
            if (dsi_tokenizer_decode(t, ids, n, 0, &text, NULL) == DSI_OK) free(text);
            free(ids);
        }
    }
}

/* Mutated tokenizer.json files (byte flips, deletions, duplications, truncations)
 * must load or fail cleanly; whatever loads must encode and decode. */
static void test_fuzz_loader(void **state) {
    size_t tl;
    char *orig = slurp(GOLDEN "/tokenizer.json", &tl);
    /* a small file makes each iteration cheap; the big one is mutated too, less often */
    const char *small =
        "{\"added_tokens\":[{\"id\":5,\"content\":\"<s>\",\"special\":true}],\"normalizer\":null,"
        "\"pre_tokenizer\":{\"type\":\"Sequence\",\"pretokenizers\":[{\"type\":\"Split\",\"pattern\":{\"Regex\":"
        "\"\\\\p{N}{1,3}\"},\"behavior\":\"Isolated\",\"invert\":false},{\"type\":\"ByteLevel\",\"add_prefix_space\":"
        "false,\"use_regex\":false}]},\"post_processor\":{\"type\":\"TemplateProcessing\",\"single\":[{\"SpecialToken\":"
        "{\"id\":\"<s>\"}},{\"Sequence\":{\"id\":\"A\"}}],\"special_tokens\":{\"<s>\":{\"ids\":[5]}}},\"decoder\":"
        "{\"type\":\"ByteLevel\"},\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0,\"b\":1,\"ab\":2,\"Ġ\":3,\"Ġab\":4},"
        "\"merges\":[\"a b\",[\"Ġ\",\"ab\"]]}}";
    size_t sl = strlen(small);
    dsi_tokenizer *t;
    assert_int_equal(dsi_tokenizer_load_json(small, sl, NULL, 0, &t), DSI_OK);
    dsi_tokenizer_destroy(t);
    char *m = malloc(2 * tl + 16);
    int loaded = 0;
    for (int it = 0; it < 6000; it++) {
        const char *src = it % 40 == 0 ? orig : small;
        size_t n = it % 40 == 0 ? tl : sl;
        memcpy(m, src, n);
        int edits = 1 + rnd() % 4;
        for (int e = 0; e < edits && n > 2; e++) {
            size_t p = rnd() % n, q = rnd() % n, k = 1 + rnd() % 8;
            switch (rnd() % 5) {
            case 0: m[p] = (char)rnd(); break;
            case 1: m[p] = "{}[]\":,0-9aé\\"[rnd() % 13]; break;
            case 2: /* delete k bytes */
                k = DSI_MIN(k, n - p);
                memmove(m + p, m + p + k, n - p - k), n -= k;
                break;
            case 3: /* copy a span elsewhere */
                k = DSI_MIN(k, DSI_MIN(n - p, n - q));
                if (n + k <= 2 * tl) {
                    char span[8];
                    memcpy(span, m + p, k);
                    memmove(m + q + k, m + q, n - q);
                    memcpy(m + q, span, k);
                    n += k;
                }
                break;
            default: n = p + 1; break; /* truncate */
            }
        }
        if (dsi_tokenizer_load_json(m, n, NULL, 0, &t) == DSI_OK) {
            loaded++;
            exercise(t);
            dsi_tokenizer_destroy(t);
        } else {
            assert_true(strlen(dsi_last_error()) > 0);
        }
    }
    assert_true(loaded > 0); /* some mutations (in strings) keep the file loadable */
    free(m);
    free(orig);
}

/* Counts the nodes of a cJSON tree and returns the k-th (pre-order) in *hit. */
static int nth_node(cJSON *n, int *k, cJSON **hit) {
    int c = 1;
    if ((*k)-- == 0) *hit = n;
    for (cJSON *ch = n->child; ch; ch = ch->next) c += nth_node(ch, k, hit);
    return c;
}

static cJSON *find_parent(cJSON *n, const cJSON *target) {
    for (cJSON *ch = n->child; ch; ch = ch->next) {
        if (ch == target) return n;
        cJSON *p = find_parent(ch, target);
        if (p) return p;
    }
    return NULL;
}

static cJSON *random_value(void) {
    static const double nums[] = {-1, 0, 1, 3, 1999, 2000, 1e9, 0.5, 16777216};
    switch (rnd() % 7) {
    case 0: return cJSON_CreateNumber(nums[rnd() % 9]);
    case 1: return cJSON_CreateString((const char *[]){"", "Ġ", "a b", "(", "BPE", "Isolated", "<｜User｜>"}[rnd() % 7]);
    case 2: return cJSON_CreateNull();
    case 3: return cJSON_CreateTrue();
    case 4: return cJSON_CreateArray();
    case 5: return cJSON_CreateObject();
    default: {
        cJSON *a = cJSON_CreateArray();
        cJSON_AddItemToArray(a, cJSON_CreateString("Ġ"));
        cJSON_AddItemToArray(a, cJSON_CreateNumber(1));
        return a;
    }
    }
}

/* Structure-aware: one random node of the golden tokenizer.json replaced by a value
 * of another type (or removed); the loader must reject or accept it cleanly. */
static void test_fuzz_loader_structured(void **state) {
    char *orig = slurp(GOLDEN "/tokenizer.json", NULL);
    cJSON *root = cJSON_Parse(orig);
    /* the vocabulary and merges are thousands of nodes: aim most edits elsewhere */
    int k = -1;
    cJSON *hit = NULL;
    int total = nth_node(root, &k, &hit);
    for (int it = 0; it < 250; it++) {
        cJSON *copy = cJSON_Duplicate(root, 1);
        int pick = rnd() % 2 ? (int)(rnd() % 200) : (int)(rnd() % total);
        hit = NULL;
        k = pick;
        nth_node(copy, &k, &hit);
        if (hit && hit != copy) {
            cJSON *parent = find_parent(copy, hit);
            if (parent && rnd() % 4 == 0) cJSON_Delete(cJSON_DetachItemViaPointer(parent, hit));
            else if (parent) cJSON_ReplaceItemViaPointer(parent, hit, random_value());
        }
        char *js = cJSON_PrintUnformatted(copy);
        dsi_tokenizer *t;
        if (dsi_tokenizer_load_json(js, strlen(js), NULL, 0, &t) == DSI_OK) {
            exercise(t);
            dsi_tokenizer_destroy(t);
        } else {
            assert_true(strlen(dsi_last_error()) > 0);
        }
        free(js);
        cJSON_Delete(copy);
    }
    cJSON_Delete(root);
    free(orig);
}

/* Random bytes, and long runs that stress the regexes' backtracking and the heap. */
static void test_fuzz_encoder(void **state) {
    char *buf = malloc(1 << 20);
    int ok = 0;
    for (int it = 0; it < 20000; it++) {
        size_t n = rnd() % 64;
        for (size_t i = 0; i < n; i++) buf[i] = (char)(rnd() % 3 ? rnd() : "\xe4\xb8\x80\xf0\x9f<|>"[rnd() % 8]);
        int32_t *ids;
        size_t k;
        int rc = dsi_tokenizer_encode(g_tok, buf, n, 0, &ids, &k);
        assert_true(rc == DSI_OK || rc == DSI_EINVAL);
        if (rc == DSI_OK) ok++, free(ids);
    }
    assert_true(ok > 0);
    const char *runs[] = {" ", "7", "a", "深", "\n", " \t", "é", "\xcc\x81", "!"};
    for (size_t r = 0; r < sizeof runs / sizeof *runs; r++) {
        size_t l = strlen(runs[r]), n = 0;
        while (n + l <= 300000) memcpy(buf + n, runs[r], l), n += l;
        int32_t *ids;
        size_t k;
        char *text;
        size_t tl;
        assert_int_equal(dsi_tokenizer_encode(g_tok, buf, n, 0, &ids, &k), DSI_OK);
        assert_int_equal(dsi_tokenizer_decode(g_tok, ids, k, 0, &text, &tl), DSI_OK);
        assert_int_equal(tl, n);
        assert_memory_equal(text, buf, n);
        free(text);
        free(ids);
    }
    free(buf);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_golden_encode_decode),
        cmocka_unit_test(test_golden_chat),
        cmocka_unit_test(test_hf_random_cases),
        cmocka_unit_test(test_chat_extra_jinja),
        cmocka_unit_test(test_chat_fingerprint),
        cmocka_unit_test(test_chat_struct_api_and_errors),
        cmocka_unit_test(test_accessors),
        cmocka_unit_test(test_encode_decode_errors),
        cmocka_unit_test(test_chat_template_required),
        cmocka_unit_test(test_loader_errors),
        cmocka_unit_test(test_split_behaviors),
        cmocka_unit_test(test_hf_behaviors),
        cmocka_unit_test(test_hf_variants),
        cmocka_unit_test(test_roundtrip_and_naive_reference),
        cmocka_unit_test(test_detok_streaming),
        cmocka_unit_test(test_reasoning_split),
        cmocka_unit_test(test_concurrent_encode),
        cmocka_unit_test(test_fuzz_loader),
        cmocka_unit_test(test_fuzz_loader_structured),
        cmocka_unit_test(test_fuzz_encoder),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
