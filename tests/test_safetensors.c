/* safetensors reader and writer: round trips, checkpoint directories (single
 * file, sharded with an index, and the ways an index can disagree with its
 * shards), hostile headers, every truncation of a small file, and a seeded
 * mutation fuzz loop. Every rejected input must come back as an error that
 * names the file (and the tensor, where one is involved), never a crash. */
#define _GNU_SOURCE
#include "test_util.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <stdint.h>

#include "dsinfer/safetensors.h"

#define HOSTILE "hostile.safetensors"

/* ------------------------------------------------------------------ helpers */

/* [8-byte LE length = declared][json][data_len bytes of 0xab], malloc'ed. */
static uint8_t *mk_file_len(uint64_t declared, const char *json, size_t data_len, size_t *len) {
    size_t jl = strlen(json);
    *len = 8 + jl + data_len;
    uint8_t *b = malloc(*len ? *len : 1);
    for (int i = 0; i < 8; i++) b[i] = (uint8_t)(declared >> (8 * i));
    memcpy(b + 8, json, jl);
    memset(b + 8 + jl, 0xab, data_len);
    return b;
}
static uint8_t *mk_file(const char *json, size_t data_len, size_t *len) {
    return mk_file_len(strlen(json), json, data_len, len);
}

/* Everything a successfully opened set promises, checked against the buffer
 * it was opened from. Returns 0 (and says why) on the first broken promise. */
static int set_consistent(const dsi_st_set *s, const uint8_t *buf, size_t len, const char *name) {
    size_t total = 0;
    for (int i = 0; i < dsi_st_count(s); i++) {
        const dsi_tensor *t = dsi_st_at(s, i);
        if (!t || !t->name || dsi_st_find(s, t->name) != t) { fprintf(stderr, "  tensor %d not findable\n", i); return 0; }
        if (t->n_dims < 0 || t->n_dims > DSI_MAX_DIMS || (unsigned)t->dtype >= DSI_DTYPE_COUNT) return 0;
        unsigned __int128 numel = 1;
        for (int d = 0; d < t->n_dims; d++) {
            if (t->shape[d] < 0) return 0;
            numel *= (uint64_t)t->shape[d];
        }
        if (numel * dsi_dtype_size(t->dtype) != t->size_bytes) { fprintf(stderr, "  %s: size mismatch\n", t->name); return 0; }
        const uint8_t *p = t->data;
        if (p < buf + 8 || p > buf + len || t->size_bytes > (size_t)(buf + len - p)) {
            fprintf(stderr, "  %s: view outside the buffer\n", t->name);
            return 0;
        }
        if (name && (!t->file || strcmp(t->file, name))) return 0;
        total += t->size_bytes;
    }
    return total == dsi_st_total_bytes(s);
}

/* Opens json+data from memory and expects failure with `code` (0: any error),
 * the message naming the file and `tensor` (if not NULL). */
static void expect_bad_buf(const uint8_t *src, size_t len, int code, const char *tensor, const char *what) {
    uint8_t *buf = malloc(len ? len : 1); /* exact size: ASan sees any over-read */
    memcpy(buf, src, len);
    dsi_st_set *s = (dsi_st_set *)(uintptr_t)1;
    int rc = dsi_st_open_memory(buf, len, HOSTILE, &s);
    if (rc >= 0 || (code && rc != code)) {
        fprintf(stderr, "  case '%s': got %s (%s), expected %s\n", what, dsi_status_name(rc), dsi_last_error(),
                code ? dsi_status_name(code) : "an error");
        fail();
    }
    assert_null(s);
    if (!tu_msg_has(HOSTILE, tensor, NULL)) { fprintf(stderr, "  case '%s'\n", what); fail(); }
    free(buf);
}
static void expect_bad(const char *json, size_t data_len, int code, const char *tensor) {
    size_t len;
    uint8_t *b = mk_file(json, data_len, &len);
    expect_bad_buf(b, len, code, tensor, json);
    free(b);
}
static void expect_ok(const char *json, size_t data_len, int n_tensors) {
    size_t len;
    uint8_t *b = mk_file(json, data_len, &len);
    dsi_st_set *s = NULL;
    int rc = dsi_st_open_memory(b, len, HOSTILE, &s);
    if (rc) fprintf(stderr, "  '%s': %s\n", json, dsi_last_error());
    assert_int_equal(rc, DSI_OK);
    assert_int_equal(dsi_st_count(s), n_tensors);
    assert_true(set_consistent(s, b, len, HOSTILE));
    dsi_st_close(s);
    free(b);
}

/* A deterministic payload for tensor k of `bytes` bytes. */
static void fill(uint8_t *p, size_t bytes, int k) {
    for (size_t i = 0; i < bytes; i++) p[i] = (uint8_t)(i * 31 + k * 7 + 1);
}

/* Adds name with dtype/shape and the fill() payload. */
static void add(dsi_st_writer *w, const char *name, dsi_dtype dt, int nd, const int64_t *shape, int k) {
    size_t bytes = dsi_dtype_size(dt);
    for (int d = 0; d < nd; d++) bytes *= (size_t)shape[d];
    uint8_t *p = malloc(bytes ? bytes : 1);
    fill(p, bytes, k);
    assert_int_equal(dsi_st_writer_add(w, name, dt, nd, shape, p), DSI_OK);
    free(p);
}

/* One tensor per dtype and rank 0..4, plus empty tensors. */
static dsi_st_writer *rich_writer(void) {
    dsi_st_writer *w = dsi_st_writer_create();
    assert_non_null(w);
    int k = 0;
    char name[64];
    for (int dt = 0; dt < DSI_DTYPE_COUNT; dt++)
        for (int nd = 0; nd <= DSI_MAX_DIMS; nd++) {
            int64_t shape[DSI_MAX_DIMS] = {3, 2, 5, 1};
            snprintf(name, sizeof name, "t.%s.rank%d", dsi_dtype_name(dt), nd);
            add(w, name, (dsi_dtype)dt, nd, shape, k++);
        }
    int64_t empty1[1] = {0}, empty3[3] = {4, 0, 7};
    add(w, "empty.1d", DSI_F32, 1, empty1, k++);
    add(w, "empty.3d", DSI_BF16, 3, empty3, k++);
    add(w, "unicode.\xe6\xa8\xa1\xe5\x9e\x8b.weight", DSI_F16, 1, (int64_t[]){6}, k++);
    return w;
}

/* Checks that `s` holds exactly what rich_writer() wrote. */
static void check_rich(const dsi_st_set *s, const dsi_st_writer *w) {
    assert_int_equal(dsi_st_count(s), dsi_st_writer_count(w));
    for (int i = 0; i < dsi_st_writer_count(w); i++) {
        const char *n = dsi_st_writer_name(w, i);
        const dsi_tensor *t = dsi_st_find(s, n);
        assert_non_null(t);
        size_t bytes = t->size_bytes;
        uint8_t *want = malloc(bytes ? bytes : 1);
        fill(want, bytes, i);
        assert_memory_equal(t->data, want, bytes);
        free(want);
    }
    const dsi_tensor *t = dsi_st_find(s, "t.BF16.rank3");
    assert_non_null(t);
    assert_int_equal(t->dtype, DSI_BF16);
    assert_int_equal(t->n_dims, 3);
    assert_true(t->shape[0] == 3 && t->shape[1] == 2 && t->shape[2] == 5);
    assert_int_equal(t->size_bytes, 3 * 2 * 5 * 2);
    t = dsi_st_find(s, "t.F64.rank0"); /* a scalar: one element */
    assert_true(t && t->n_dims == 0 && t->size_bytes == 8);
    t = dsi_st_find(s, "empty.3d");
    assert_true(t && t->n_dims == 3 && t->shape[1] == 0 && t->size_bytes == 0);
    assert_null(dsi_st_find(s, "t.BF16.rank9"));
    assert_int_equal(dsi_st_total_bytes(s), dsi_st_writer_bytes(w));
}

/* ------------------------------------------------------------- round trips */

static void test_dtype_names(void **state) {
    for (int i = 0; i < DSI_DTYPE_COUNT; i++) assert_true(dsi_dtype_size(i) > 0);
    assert_string_equal(dsi_dtype_name(DSI_F8_E4M3), "F8_E4M3");
    assert_int_equal(dsi_dtype_size(DSI_F64), 8);
    assert_string_equal(dsi_dtype_name(DSI_DTYPE_COUNT), "?");
    assert_int_equal(dsi_dtype_size((dsi_dtype)-1), 0);
}

static void test_roundtrip_memory(void **state) {
    dsi_st_writer *w = rich_writer();
    void *buf;
    size_t len;
    assert_int_equal(dsi_st_writer_serialize(w, &buf, &len), DSI_OK);
    dsi_st_set *s;
    assert_int_equal(dsi_st_open_memory(buf, len, "mem", &s), DSI_OK);
    check_rich(s, w);
    assert_true(set_consistent(s, buf, len, "mem"));
    /* the data section starts 8-byte aligned (the writer pads the header) */
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | ((uint8_t *)buf)[i];
    assert_int_equal(hlen % 8, 0);
    dsi_st_close(s);
    free(buf);
    dsi_st_writer_destroy(w);
}

static void test_roundtrip_file(void **state) {
    char *dir = tu_mkdtemp("st");
    char path[512];
    snprintf(path, sizeof path, "%s/x.safetensors", dir);
    dsi_st_writer *w = rich_writer();
    assert_int_equal(dsi_st_writer_save(w, path), DSI_OK);
    dsi_st_set *s;
    assert_int_equal(dsi_st_open_file(path, &s), DSI_OK);
    check_rich(s, w);
    assert_string_equal(dsi_st_find(s, "empty.1d")->file, path);
    dsi_st_close(s);
    /* an empty writer makes a valid file with no tensors */
    dsi_st_writer *e = dsi_st_writer_create();
    assert_int_equal(dsi_st_writer_save(e, path), DSI_OK);
    assert_int_equal(dsi_st_open_file(path, &s), DSI_OK);
    assert_int_equal(dsi_st_count(s), 0);
    assert_null(dsi_st_find(s, "t.F32.rank1"));
    dsi_st_close(s);
    dsi_st_writer_destroy(e);
    /* saving into a missing directory fails cleanly and leaves no temp file */
    snprintf(path, sizeof path, "%s/nodir/x.safetensors", dir);
    assert_int_equal(dsi_st_writer_save(w, path), DSI_EIO);
    dsi_st_writer_destroy(w);
    tu_rmtree(dir);
    free(dir);
}

static void test_writer_rejects_bad_input(void **state) {
    dsi_st_writer *w = dsi_st_writer_create();
    float x[4] = {0};
    assert_int_equal(dsi_st_writer_add(w, "a", DSI_F32, 5, (int64_t[]){1, 1, 1, 1, 1}, x), DSI_EINVAL);
    assert_int_equal(dsi_st_writer_add(w, "a", DSI_F32, -1, NULL, x), DSI_EINVAL);
    assert_int_equal(dsi_st_writer_add(w, "neg", DSI_F32, 2, (int64_t[]){-2, -2}, x), DSI_EINVAL);
    assert_true(tu_msg_has("neg", NULL, NULL));
    assert_int_equal(dsi_st_writer_add(w, "a", DSI_DTYPE_COUNT, 1, (int64_t[]){1}, x), DSI_EINVAL);
    assert_int_equal(dsi_st_writer_add(w, "huge", DSI_F32, 2, (int64_t[]){1ll << 40, 1ll << 40}, x), DSI_EINVAL);
    assert_int_equal(dsi_st_writer_count(w), 0);
    /* an empty tensor needs no data */
    assert_int_equal(dsi_st_writer_add(w, "e", DSI_F32, 1, (int64_t[]){0}, NULL), DSI_OK);
    assert_int_equal(dsi_st_writer_count(w), 1);
    dsi_st_writer_destroy(w);
    dsi_st_writer_destroy(NULL);
}

static void test_null_and_bounds(void **state) {
    dsi_st_close(NULL);
    assert_null(dsi_st_find(NULL, "x"));
    assert_int_equal(dsi_st_count(NULL), 0);
    assert_null(dsi_st_at(NULL, 0));
    assert_int_equal(dsi_st_total_bytes(NULL), 0);
    size_t len;
    uint8_t *b = mk_file("{\"a\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2]}}", 2, &len);
    dsi_st_set *s;
    assert_int_equal(dsi_st_open_memory(b, len, "m", &s), DSI_OK);
    assert_null(dsi_st_at(s, -1));
    assert_null(dsi_st_at(s, 1));
    assert_non_null(dsi_st_at(s, 0));
    dsi_st_close(s);
    free(b);
}

/* ------------------------------------------------------ checkpoint folders */

static void save_shard(const char *dir, const char *file, const char *const *names, int n, int k0) {
    dsi_st_writer *w = dsi_st_writer_create();
    for (int i = 0; i < n; i++) add(w, names[i], DSI_F32, 2, (int64_t[]){2, 3}, k0 + i);
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, file);
    assert_int_equal(dsi_st_writer_save(w, path), DSI_OK);
    dsi_st_writer_destroy(w);
}

static void write_text(const char *dir, const char *file, const char *text) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, file);
    assert_int_equal(tu_write_file(path, text, strlen(text)), 0);
}

static const char *const SH1[] = {"a.weight", "b.weight"};
static const char *const SH2[] = {"c.weight"};
#define INDEX_OK                                                                                              \
    "{\"metadata\":{},\"weight_map\":{\"a.weight\":\"s-1.safetensors\",\"b.weight\":\"s-1.safetensors\"," \
    "\"c.weight\":\"s-2.safetensors\"}}"

static void expect_dir_error(const char *dir, int code, const char *n1, const char *n2, const char *n3) {
    dsi_st_set *s = (dsi_st_set *)(uintptr_t)1;
    int rc = dsi_st_open_dir(dir, &s);
    if (rc != code) fprintf(stderr, "  got %s: %s\n", dsi_status_name(rc), dsi_last_error());
    assert_int_equal(rc, code);
    assert_null(s);
    const char *msg = dsi_last_error();
    assert_true(tu_msg_has(n1, n2, n3));
    (void)msg;
}

static void test_dir_single_file(void **state) {
    char *dir = tu_mkdtemp("st");
    save_shard(dir, "model.safetensors", SH1, 2, 0);
    save_shard(dir, "ignored.safetensors", SH2, 1, 5); /* model.safetensors wins */
    dsi_st_set *s;
    assert_int_equal(dsi_st_open_dir(dir, &s), DSI_OK);
    assert_int_equal(dsi_st_count(s), 2);
    assert_non_null(dsi_st_find(s, "b.weight"));
    assert_null(dsi_st_find(s, "c.weight"));
    dsi_st_close(s);
    tu_rmtree(dir);
    free(dir);
}

static void test_dir_sharded(void **state) {
    char *dir = tu_mkdtemp("st");
    save_shard(dir, "s-1.safetensors", SH1, 2, 0);
    save_shard(dir, "s-2.safetensors", SH2, 1, 2);
    write_text(dir, "model.safetensors.index.json", INDEX_OK);
    dsi_st_set *s;
    assert_int_equal(dsi_st_open_dir(dir, &s), DSI_OK);
    assert_int_equal(dsi_st_count(s), 3);
    const dsi_tensor *c = dsi_st_find(s, "c.weight");
    assert_non_null(c);
    assert_non_null(strstr(c->file, "s-2.safetensors"));
    uint8_t want[24];
    fill(want, 24, 2);
    assert_memory_equal(c->data, want, 24);
    dsi_st_close(s);

    /* the index names a tensor no shard has */
    write_text(dir, "model.safetensors.index.json",
               "{\"weight_map\":{\"a.weight\":\"s-1.safetensors\",\"b.weight\":\"s-1.safetensors\","
               "\"c.weight\":\"s-2.safetensors\",\"ghost.weight\":\"s-2.safetensors\"}}");
    expect_dir_error(dir, DSI_ENOTFOUND, "ghost.weight", "s-2.safetensors", NULL);

    /* the index points a tensor at the wrong shard */
    write_text(dir, "model.safetensors.index.json",
               "{\"weight_map\":{\"a.weight\":\"s-2.safetensors\",\"b.weight\":\"s-1.safetensors\","
               "\"c.weight\":\"s-2.safetensors\"}}");
    expect_dir_error(dir, DSI_EFORMAT, "a.weight", "s-1.safetensors", "s-2.safetensors");

    /* a tensor stored in two shards */
    const char *const dup[] = {"c.weight", "a.weight"};
    save_shard(dir, "s-2.safetensors", dup, 2, 2);
    write_text(dir, "model.safetensors.index.json", INDEX_OK);
    expect_dir_error(dir, DSI_EFORMAT, "a.weight", "s-1.safetensors", "s-2.safetensors");
    save_shard(dir, "s-2.safetensors", SH2, 1, 2);

    /* a shard the index names does not exist */
    write_text(dir, "model.safetensors.index.json",
               "{\"weight_map\":{\"a.weight\":\"s-1.safetensors\",\"c.weight\":\"s-3.safetensors\"}}");
    expect_dir_error(dir, DSI_ENOTFOUND, "s-3.safetensors", NULL, NULL);

    /* shard names may not leave the folder */
    write_text(dir, "model.safetensors.index.json", "{\"weight_map\":{\"a.weight\":\"../s-1.safetensors\"}}");
    expect_dir_error(dir, DSI_EFORMAT, "a.weight", "model.safetensors.index.json", NULL);
    write_text(dir, "model.safetensors.index.json", "{\"weight_map\":{\"a.weight\":7}}");
    expect_dir_error(dir, DSI_EFORMAT, "a.weight", "model.safetensors.index.json", NULL);
    write_text(dir, "model.safetensors.index.json", "{\"weight_map\":{\"a.weight\":\"..\"}}");
    expect_dir_error(dir, DSI_EFORMAT, "a.weight", NULL, NULL);
    write_text(dir, "model.safetensors.index.json", "{\"weight_map\":{\"a.weight\":\"\"}}");
    expect_dir_error(dir, DSI_EIO, dir, NULL, NULL); /* "dir/" is not a regular file */

    /* a broken index */
    write_text(dir, "model.safetensors.index.json", "{\"weight_map\": [");
    expect_dir_error(dir, DSI_EFORMAT, "model.safetensors.index.json", NULL, NULL);
    write_text(dir, "model.safetensors.index.json", "");
    expect_dir_error(dir, DSI_EFORMAT, "model.safetensors.index.json", NULL, NULL);
    /* an index that exists but cannot be read is an error, not "no index"
     * (which fell back to every *.safetensors in the folder) */
    char ipath[512];
    snprintf(ipath, sizeof ipath, "%s/model.safetensors.index.json", dir);
    write_text(dir, "model.safetensors.index.json", INDEX_OK);
    if (geteuid() != 0) { /* root reads a mode-000 file */
        assert_int_equal(chmod(ipath, 0), 0);
        expect_dir_error(dir, DSI_EIO, "model.safetensors.index.json", "Permission denied", NULL);
        assert_int_equal(chmod(ipath, 0644), 0);
    } else {
        printf("  (running as root: the unreadable-index case is skipped)\n");
    }
    /* one past the size read: it was cut there and then 'no weight_map object' (sparse: no bytes written) */
    assert_int_equal(truncate(ipath, (64 << 20) + 1), 0);
    expect_dir_error(dir, DSI_EFORMAT, "model.safetensors.index.json", "64 MiB", NULL);

    /* a truncated shard behind a valid index */
    write_text(dir, "model.safetensors.index.json", INDEX_OK);
    char path[512];
    snprintf(path, sizeof path, "%s/s-1.safetensors", dir);
    size_t len = 0;
    uint8_t *b = tu_read_file(path, &len);
    assert_non_null(b);
    assert_int_equal(tu_write_file(path, b, len - 1), 0);
    free(b);
    expect_dir_error(dir, DSI_ERANGE, "s-1.safetensors", "b.weight", NULL);

    /* without an index and model.safetensors: every *.safetensors, sorted */
    unlink(path);
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    unlink(path);
    save_shard(dir, "s-1.safetensors", SH1, 2, 0);
    assert_int_equal(dsi_st_open_dir(dir, &s), DSI_OK);
    assert_int_equal(dsi_st_count(s), 3);
    assert_non_null(strstr(dsi_st_at(s, 0)->file, "s-1.safetensors"));
    dsi_st_close(s);
    tu_rmtree(dir);
    free(dir);
}

static void test_dir_missing(void **state) {
    char *dir = tu_mkdtemp("st");
    expect_dir_error(dir, DSI_ENOTFOUND, dir, NULL, NULL); /* empty folder */
    char sub[512];
    snprintf(sub, sizeof sub, "%s/none", dir);
    expect_dir_error(sub, DSI_ENOTFOUND, sub, NULL, NULL);
    dsi_st_set *s = (dsi_st_set *)(uintptr_t)1;
    assert_int_equal(dsi_st_open_file(sub, &s), DSI_ENOTFOUND);
    assert_null(s);
    assert_true(tu_msg_has(sub, NULL, NULL));
    assert_int_equal(dsi_st_open_file(dir, &s), DSI_EIO); /* a folder is not a file */
    /* FIFOs must not block (alarm: a hang fails the test) */
    snprintf(sub, sizeof sub, "%s/pipe.safetensors", dir);
    assert_int_equal(mkfifo(sub, 0600), 0);
    alarm(20);
    assert_int_equal(dsi_st_open_file(sub, &s), DSI_EIO);
    assert_true(tu_msg_has(sub, "not a regular file", NULL));
    expect_dir_error(dir, DSI_EIO, "pipe.safetensors", NULL, NULL); /* found by the *.safetensors scan */
    unlink(sub);
    snprintf(sub, sizeof sub, "%s/model.safetensors.index.json", dir);
    assert_int_equal(mkfifo(sub, 0600), 0);
    expect_dir_error(dir, DSI_EIO, "model.safetensors.index.json", NULL, NULL);
    alarm(0);
    unlink(sub);
    snprintf(sub, sizeof sub, "%s/empty.safetensors", dir);
    assert_int_equal(tu_write_file(sub, "", 0), 0);
    assert_int_equal(dsi_st_open_file(sub, &s), DSI_EFORMAT);
    assert_true(tu_msg_has("empty.safetensors", NULL, NULL));
    tu_rmtree(dir);
    free(dir);
}

/* ---------------------------------------------------------- hostile headers */

static void test_hostile_lengths(void **state) {
    uint8_t small[8] = {0};
    for (size_t n = 0; n < 8; n++) expect_bad_buf(small, n, DSI_EFORMAT, NULL, "shorter than 8 bytes");
    const char *j = "{\"a\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2]}}";
    size_t len = 0, jl = strlen(j);
    uint64_t lens[] = {jl + 3, jl + 100, 1ull << 32, 1ull << 63, UINT64_MAX, UINT64_MAX - 7, 0, 1};
    for (size_t i = 0; i < sizeof lens / sizeof lens[0]; i++) {
        uint8_t *b = mk_file_len(lens[i], j, 2, &len);
        expect_bad_buf(b, len, DSI_EFORMAT, NULL, "header length");
        free(b);
    }
    /* a declared length shorter than the JSON cuts it: not JSON any more */
    uint8_t *b = mk_file_len(jl - 1, j, 2, &len);
    expect_bad_buf(b, len, DSI_EFORMAT, NULL, "cut JSON");
    free(b);
    /* 300 MB declared and present would be implausible: the length check needs no data */
    b = mk_file_len(300u << 20, j, 0, &len);
    expect_bad_buf(b, len, DSI_EFORMAT, NULL, "header longer than the file");
    free(b);
}

static void test_hostile_json(void **state) {
    const char *bad[] = {"{abc", "[]", "[{\"a\":1}]", "null", "42", "\"str\"", "{\"a\":", "{}}", "  ", "{\"a\" 1}",
                         "{} x"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) expect_bad(bad[i], 0, DSI_EFORMAT, NULL);
    /* nesting far past any stack: cJSON's depth limit turns it into an error */
    size_t n = 200000;
    char *deep = malloc(2 * n + 16);
    strcpy(deep, "{\"a\":");
    memset(deep + 5, '[', n);
    memset(deep + 5 + n, ']', n);
    strcpy(deep + 5 + 2 * n, "}");
    expect_bad(deep, 0, DSI_EFORMAT, NULL);
    free(deep);
    /* valid but empty, padded, with metadata */
    expect_ok("{}", 0, 0);
    expect_ok("{}      ", 0, 0);
    expect_ok("{\"__metadata__\":{\"format\":\"pt\"}}", 0, 0);
    expect_ok(" {\"__metadata__\":{},\"x\":{\"dtype\":\"I64\",\"shape\":[],\"data_offsets\":[0,8]}} ", 8, 1);
}

static void test_hostile_entries(void **state) {
#define T(fields) "{\"w\":{" fields "}}"
    /* missing or mistyped fields */
    expect_bad(T("\"shape\":[1],\"data_offsets\":[0,4]"), 4, DSI_EFORMAT, "'w'");
    expect_bad(T("\"dtype\":\"F32\",\"data_offsets\":[0,4]"), 4, DSI_EFORMAT, "'w'");
    expect_bad(T("\"dtype\":\"F32\",\"shape\":[1]"), 4, DSI_EFORMAT, "'w'");
    expect_bad(T("\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0]"), 4, DSI_EFORMAT, "'w'");
    expect_bad(T("\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4,8]"), 8, DSI_EFORMAT, "'w'");
    expect_bad(T("\"dtype\":32,\"shape\":[1],\"data_offsets\":[0,4]"), 4, DSI_EFORMAT, "'w'");
    expect_bad(T("\"dtype\":\"F32\",\"shape\":{\"0\":1},\"data_offsets\":[0,4]"), 4, DSI_EFORMAT, "'w'");
    expect_bad(T("\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":{\"a\":0,\"b\":4}"), 4, DSI_EFORMAT, "'w'");
    expect_bad("{\"w\":7}", 0, DSI_EFORMAT, "'w'");
    expect_bad("{\"w\":[\"F32\",[1],[0,4]]}", 4, DSI_EFORMAT, "'w'");
    expect_bad("{\"w\":null}", 0, DSI_EFORMAT, "'w'");
    /* dtypes */
    expect_bad(T("\"dtype\":\"F128\",\"shape\":[1],\"data_offsets\":[0,16]"), 16, DSI_EUNSUPPORTED, "'w'");
    expect_bad(T("\"dtype\":\"bf16\",\"shape\":[1],\"data_offsets\":[0,2]"), 2, DSI_EUNSUPPORTED, "'w'");
    expect_bad(T("\"dtype\":\"\",\"shape\":[1],\"data_offsets\":[0,2]"), 2, DSI_EUNSUPPORTED, "'w'");
    /* shapes */
    const char *shapes[] = {"[-1]", "[1.5]", "[1e300]", "[\"3\"]", "[null]", "[true]", "[[1]]", "[-0.5]",
                            "[9007199254740993]", "[4294967296,4294967296,4294967296]",
                            "[4611686018427387904,2]", "[1e16]"};
    char j[256];
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
        snprintf(j, sizeof j, T("\"dtype\":\"U8\",\"shape\":%s,\"data_offsets\":[0,0]"), shapes[i]);
        expect_bad(j, 0, DSI_EFORMAT, "'w'");
    }
    expect_bad(T("\"dtype\":\"U8\",\"shape\":[1,1,1,1,1],\"data_offsets\":[0,1]"), 1, DSI_EUNSUPPORTED, "'w'");
    /* numel fits but bytes do not match the offsets (2^31 x 2^31 x 4 bytes) */
    expect_bad(T("\"dtype\":\"F32\",\"shape\":[2147483648,2147483648],\"data_offsets\":[0,0]"), 0, DSI_EFORMAT, "'w'");
    /* data_offsets */
    const char *offs[] = {"[8,0]", "[0,1000]", "[-4,0]", "[0.5,4.5]", "[0,\"4\"]", "[null,4]", "[0,1e300]",
                          "[18446744073709551616,18446744073709551620]", "[4,12]", "[0,-4]"};
    for (size_t i = 0; i < sizeof offs / sizeof offs[0]; i++) {
        snprintf(j, sizeof j, T("\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":%s"), offs[i]);
        expect_bad(j, 8, DSI_ERANGE, "'w'");
    }
    expect_bad(T("\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,4]"), 8, DSI_EFORMAT, "'w'");
    expect_bad(T("\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,12]"), 12, DSI_EFORMAT, "'w'");
    expect_bad(T("\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,4]"), 4, DSI_EFORMAT, "'w'");
    /* the same name twice in one header */
    expect_bad("{\"w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
               "\"w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1,2]}}", 2, DSI_EFORMAT, "'w'");
    /* the good neighbours of the cases above do open */
    expect_ok(T("\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]"), 8, 1);
    expect_ok(T("\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]"), 12, 1);
    expect_ok(T("\"dtype\":\"F32\",\"shape\":[2.0],\"data_offsets\":[0,8.0]"), 8, 1);
    expect_ok(T("\"dtype\":\"U8\",\"shape\":[0,1000000000000],\"data_offsets\":[0,0]"), 0, 1);
    expect_ok("{\"\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1, 1);
#undef T
}

/* Non-UTF-8 tensor names: the header must be UTF-8 JSON (safetensors' rule);
 * raw bytes would otherwise end up in names and error messages. */
static void test_hostile_utf8(void **state) {
    const char *bad[] = {"\xff", "\xc0\xaf", "\xe0\x80\xaf", "\xed\xa0\x80", "\xf4\x90\x80\x80", "a\x80", "\xe6\xa8"};
    char j[256];
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        snprintf(j, sizeof j, "{\"w%s\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}", bad[i]);
        expect_bad(j, 1, DSI_EFORMAT, "UTF-8");
    }
    /* valid multi-byte names and escapes are fine */
    expect_ok("{\"\xe6\xa8\xa1\xf0\x9f\x98\x80\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1, 1);
    expect_ok("{\"\\u00e9\\ud83d\\ude00\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1, 1);
}

/* Every truncation of a valid file is an error naming the file: the last
 * tensor always ends at the end of the file, so no cut can leave it whole. */
static void test_every_truncation(void **state) {
    dsi_st_writer *w = rich_writer();
    void *full;
    size_t len;
    assert_int_equal(dsi_st_writer_serialize(w, &full, &len), DSI_OK);
    dsi_st_writer_destroy(w);
    for (size_t n = 0; n < len; n++) expect_bad_buf(full, n, 0, NULL, "truncation");
    /* the same through files on disk, at the interesting lengths */
    char *dir = tu_mkdtemp("st");
    char path[512];
    snprintf(path, sizeof path, "%s/cut.safetensors", dir);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | ((uint8_t *)full)[i];
    size_t cuts[] = {0, 1, 7, 8, 9, 8 + hlen / 2, 8 + hlen - 1, 8 + hlen, 8 + hlen + 1, len / 2, len - 1};
    for (size_t i = 0; i < sizeof cuts / sizeof cuts[0]; i++) {
        assert_int_equal(tu_write_file(path, full, cuts[i]), 0);
        dsi_st_set *s = (dsi_st_set *)(uintptr_t)1;
        assert_true(dsi_st_open_file(path, &s) < 0);
        assert_null(s);
        assert_true(tu_msg_has(path, NULL, NULL));
    }
    assert_int_equal(tu_write_file(path, full, len), 0);
    dsi_st_set *s;
    assert_int_equal(dsi_st_open_file(path, &s), DSI_OK);
    dsi_st_close(s);
    free(full);
    tu_rmtree(dir);
    free(dir);
}

/* ------------------------------------------------------------------ fuzzing */

static uint64_t rng_next(uint64_t *s) { /* xorshift64* */
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 0x2545f4914f6cdd1dull;
}
static size_t rng_below(uint64_t *s, size_t n) { return n ? (size_t)(rng_next(s) % n) : 0; }

typedef struct fz_buf {
    uint8_t *p;
    size_t len, cap;
} fz_buf;

static void fz_insert(fz_buf *b, size_t at, const void *src, size_t n) {
    if (b->len + n > b->cap) return;
    memmove(b->p + at + n, b->p + at, b->len - at);
    memcpy(b->p + at, src, n);
    b->len += n;
}

/* One random mutation: bit flips, byte sets/inserts/deletes, header-length
 * edits, truncation, chunk duplication, and splicing numbers into the JSON. */
static void mutate(fz_buf *b, uint64_t *rng) {
    static const uint8_t interesting[] = {0, 0xff, '"', '{', '}', '[', ']', ',', ':', '-', '9', '0', '.',
                                          'e', 0x80, 0xc0, '\\', ' ', 'n'};
    static const char *const numbers[] = {"-1", "1e308", "4294967296", "0.5", "18446744073709551616", "9e15",
                                          "-0", "1e-5", "99999999999999999999", "2147483648", "null", "\"F8_E4M3\""};
    size_t pos = rng_below(rng, b->len + 1);
    switch (rng_below(rng, 9)) {
    /* one rng call per statement: argument/operand order is unspecified in C,
     * and the loop must mutate identically under every compiler */
    case 0:
        if (b->len) {
            size_t at = rng_below(rng, b->len);
            b->p[at] ^= (uint8_t)(1u << rng_below(rng, 8));
        }
        break;
    case 1:
        if (b->len) {
            size_t at = rng_below(rng, b->len);
            b->p[at] = interesting[rng_below(rng, sizeof interesting)];
        }
        break;
    case 2: {
        uint8_t c = rng_below(rng, 2) ? interesting[rng_below(rng, sizeof interesting)] : (uint8_t)rng_next(rng);
        fz_insert(b, pos, &c, 1);
        break;
    }
    case 3: {
        size_t n = 1 + rng_below(rng, 8);
        if (pos + n <= b->len) {
            memmove(b->p + pos, b->p + pos + n, b->len - pos - n);
            b->len -= n;
        }
        break;
    }
    case 4: /* the length field: small deltas, random values, exact file-relative values */
        if (b->len >= 8) {
            uint64_t h = 0;
            for (int i = 7; i >= 0; i--) h = (h << 8) | b->p[i];
            switch (rng_below(rng, 4)) {
            case 0: h += (uint64_t)(int64_t)((int)rng_below(rng, 33) - 16); break;
            case 1: h = rng_next(rng); break;
            case 2: h = b->len - 8 - rng_below(rng, 4); break;
            default: h = rng_next(rng); h >>= rng_below(rng, 64); break;
            }
            for (int i = 0; i < 8; i++) b->p[i] = (uint8_t)(h >> (8 * i));
        }
        break;
    case 5:
        b->len = rng_below(rng, b->len + 1);
        break;
    case 6: { /* duplicate a chunk somewhere else */
        if (!b->len) break;
        size_t from = rng_below(rng, b->len), n = 1 + rng_below(rng, DSI_MIN(32, b->len - from));
        uint8_t tmp[32];
        memcpy(tmp, b->p + from, n);
        fz_insert(b, pos, tmp, n);
        break;
    }
    default: { /* overwrite a run of digits with a hostile number */
        size_t start = rng_below(rng, b->len ? b->len : 1);
        while (start < b->len && !(b->p[start] >= '0' && b->p[start] <= '9')) start++;
        if (start >= b->len) break;
        size_t end = start;
        while (end < b->len && b->p[end] >= '0' && b->p[end] <= '9') end++;
        memmove(b->p + start, b->p + end, b->len - end);
        b->len -= end - start;
        const char *num = numbers[rng_below(rng, sizeof numbers / sizeof numbers[0])];
        fz_insert(b, start, num, strlen(num));
        break;
    }
    }
}

static void test_fuzz_header(void **state) {
    /* seeds: the rich file, a small file, a hand-written header with metadata and padding */
    void *seeds[3];
    size_t seed_len[3];
    dsi_st_writer *w = rich_writer();
    assert_int_equal(dsi_st_writer_serialize(w, &seeds[0], &seed_len[0]), DSI_OK);
    dsi_st_writer_destroy(w);
    w = dsi_st_writer_create();
    add(w, "model.layers.0.mlp.down_proj.weight", DSI_F8_E4M3, 2, (int64_t[]){3, 4}, 1);
    add(w, "model.layers.0.mlp.down_proj.weight_scale_inv", DSI_F32, 2, (int64_t[]){1, 1}, 2);
    add(w, "model.norm.weight", DSI_BF16, 1, (int64_t[]){4}, 3);
    assert_int_equal(dsi_st_writer_serialize(w, &seeds[1], &seed_len[1]), DSI_OK);
    dsi_st_writer_destroy(w);
    seeds[2] = mk_file("{\"__metadata__\":{\"format\":\"pt\"}, \"a\": {\"dtype\": \"I32\", \"shape\": [2, 2], "
                       "\"data_offsets\": [0, 16]}, \"b\":{\"dtype\":\"F64\",\"shape\":[],\"data_offsets\":[16,24]}}   ",
                       24, &seed_len[2]);

    const int iterations = 400000;
    uint64_t rng = 0x9e3779b97f4a7c15ull;
    fz_buf b = {malloc(65536), 0, 65536};
    int n_ok = 0, n_err = 0, codes[16] = {0};
    for (int it = 0; it < iterations; it++) {
        int si = (int)rng_below(&rng, 3);
        memcpy(b.p, seeds[si], seed_len[si]);
        b.len = seed_len[si];
        int n_mut = 1 + (int)rng_below(&rng, 4);
        for (int m = 0; m < n_mut; m++) mutate(&b, &rng);
        uint8_t *buf = malloc(b.len ? b.len : 1); /* exact size for ASan */
        memcpy(buf, b.p, b.len);
        dsi_st_set *s = NULL;
        int rc = dsi_st_open_memory(buf, b.len, "fuzz.safetensors", &s);
        if (rc == DSI_OK) {
            n_ok++;
            if (!set_consistent(s, buf, b.len, "fuzz.safetensors")) {
                fprintf(stderr, "  iteration %d: inconsistent set\n", it);
                fail();
            }
            dsi_st_close(s);
        } else {
            n_err++;
            codes[-rc & 15]++;
            assert_null(s);
            if (!strstr(dsi_last_error(), "fuzz.safetensors")) {
                fprintf(stderr, "  iteration %d: %s: message does not name the file: %s\n", it, dsi_status_name(rc),
                        dsi_last_error());
                fail();
            }
        }
        free(buf);
    }
    printf("  fuzz: %d mutated headers, %d opened (consistent), %d rejected (EFORMAT %d, ERANGE %d, EUNSUPPORTED %d)\n",
           iterations, n_ok, n_err, codes[-DSI_EFORMAT], codes[-DSI_ERANGE], codes[-DSI_EUNSUPPORTED]);
    /* both outcomes must be common, or the mutator is not exercising the parser */
    assert_true(n_ok > iterations / 50);
    assert_true(n_err > iterations / 4);
    free(b.p);
    for (int i = 0; i < 3; i++) free(seeds[i]);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_dtype_names),
        cmocka_unit_test(test_roundtrip_memory),
        cmocka_unit_test(test_roundtrip_file),
        cmocka_unit_test(test_writer_rejects_bad_input),
        cmocka_unit_test(test_null_and_bounds),
        cmocka_unit_test(test_dir_single_file),
        cmocka_unit_test(test_dir_sharded),
        cmocka_unit_test(test_dir_missing),
        cmocka_unit_test(test_hostile_lengths),
        cmocka_unit_test(test_hostile_json),
        cmocka_unit_test(test_hostile_entries),
        cmocka_unit_test(test_hostile_utf8),
        cmocka_unit_test(test_every_truncation),
        cmocka_unit_test(test_fuzz_header),
    };
    return cmocka_run_group_tests_name("safetensors", tests, NULL, NULL);
}
