/* Loading checkpoints: random-weight checkpoints written by dsi_make_model
 * (several shards) load and run; the same seed gives the same bytes; FP8 and
 * BF16 versions of one seed agree within FP8's quantisation error; the
 * in-memory demo model equals the same model on disk. Then copies of the
 * golden checkpoints are damaged one way at a time (a tensor removed, a wrong
 * shape, a wrong dtype, an FP8 weight without its scale, a truncated shard)
 * and each load must fail with an error naming the file and the tensor. */
#define _GNU_SOURCE
#include "test_util.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <dirent.h>
#include <math.h>
#include <cjson/cJSON.h>

#include "dsinfer/engine.h"
#include "dsinfer/model.h"
#include "kernels/dtype.h"
#include "model/model_impl.h"

#define SEED 7
#define SHARD_BYTES (1u << 20) /* tiny fp8 is ~9 MB: several shards */

static char *g_tmp; /* one temp folder for the whole file, removed at the end */

static int group_setup(void **state) {
    g_tmp = tu_mkdtemp("load");
    return g_tmp ? 0 : -1;
}
static int group_teardown(void **state) {
    tu_rmtree(g_tmp);
    free(g_tmp);
    return 0;
}

static const char *tmp_path(char *buf, size_t n, const char *leaf) {
    snprintf(buf, n, "%s/%s", g_tmp, leaf);
    return buf;
}

/* Logits for `n` fixed pseudo-random ids through a fresh engine; the
 * residual stream after each layer goes to `hidden` when not NULL
 * ([n_layers+1][n][hidden]). */
static float *run_logits_hidden(const dsi_model *m, int n, float *hidden) {
    const dsi_config *c = dsi_model_config(m);
    dsi_kv_pool *kv;
    assert_int_equal(dsi_kv_pool_create(c->n_layers, dsi_config_kv_dim(c), DSI_KV_BLOCK_TOKENS, 4, &kv), DSI_OK);
    dsi_engine *e;
    dsi_engine_opts o = {.n_threads = 2, .max_tokens = 64};
    assert_int_equal(dsi_engine_create(m, kv, &o, &e), DSI_OK);
    int32_t ids[64];
    for (int i = 0; i < n; i++) ids[i] = (int32_t)((i * 7919 + 13) % c->vocab_size);
    if (hidden) dsi_engine_capture_hidden(e, hidden, n);
    float *out = malloc(sizeof(float) * (size_t)n * c->vocab_size);
    assert_int_equal(dsi_engine_logits(e, ids, n, 0, -1, out), DSI_OK);
    dsi_engine_destroy(e);
    dsi_kv_pool_destroy(kv);
    return out;
}
static float *run_logits(const dsi_model *m, int n) { return run_logits_hidden(m, n, NULL); }

static double rel_rms(const float *a, const float *b, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        num += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
        den += (double)b[i] * b[i];
    }
    return sqrt(num / den);
}

/* Relative RMS between an FP8 matrix (dequantised with its block scales) and
 * the BF16 matrix made from the same seed. */
static double fp8_weight_error(const dsi_mat *q, const dsi_mat *w) {
    assert_int_equal(q->dtype, DSI_F8_E4M3);
    assert_int_equal(w->dtype, DSI_BF16);
    assert_true(q->rows == w->rows && q->cols == w->cols);
    double num = 0, den = 0;
    for (int r = 0; r < q->rows; r++)
        for (int c = 0; c < q->cols; c++) {
            float s = q->scale_inv[(r / q->block_rows) * q->scale_cols + c / q->block_cols];
            double x = dsi_e4m3_to_f32(((const uint8_t *)q->data)[(size_t)r * q->cols + c]) * s;
            double y = dsi_bf16_to_f32(((const uint16_t *)w->data)[(size_t)r * w->cols + c]);
            num += (x - y) * (x - y);
            den += y * y;
        }
    return sqrt(num / den);
}

static int count_shards(const char *dir) {
    DIR *d = opendir(dir);
    assert_non_null(d);
    int n = 0;
    struct dirent *de;
    while ((de = readdir(d)))
        if (!strncmp(de->d_name, "model-", 6) && strstr(de->d_name, ".safetensors")) n++;
    closedir(d);
    return n;
}

static void make(const char *leaf, int fp8, uint64_t seed) {
    dsi_config c;
    assert_int_equal(dsi_config_preset(DSI_PRESET_TINY, 0, fp8, &c), DSI_OK);
    char dir[512];
    int rc = dsi_make_model(&c, tmp_path(dir, sizeof dir, leaf), seed, SHARD_BYTES, 0);
    if (rc) fprintf(stderr, "  make-model: %s\n", dsi_last_error());
    assert_int_equal(rc, DSI_OK);
}

static void test_make_load_run(void **state) {
    make("fp8", 1, SEED);
    make("bf16", 0, SEED);
    char dir[512];
    dsi_model *m8, *m16;
    int n8 = count_shards(tmp_path(dir, sizeof dir, "fp8"));
    assert_int_equal(dsi_model_load(dir, NULL, &m8), DSI_OK);
    int n16 = count_shards(tmp_path(dir, sizeof dir, "bf16"));
    assert_int_equal(dsi_model_load(dir, NULL, &m16), DSI_OK);
    printf("  tiny fp8: %d shards, %.2f MB; tiny bf16: %d shards, %.2f MB\n", n8, dsi_model_total_bytes(m8) / 1e6, n16,
           dsi_model_total_bytes(m16) / 1e6);
    assert_true(n8 >= 3 && n16 > n8);
    const dsi_config *c = dsi_model_config(m8);
    assert_int_equal(c->fp8, 1);
    assert_int_equal(dsi_model_config(m16)->fp8, 0);
    assert_true(dsi_model_active_bytes_per_token(m8) > 0);
    assert_true(dsi_model_active_bytes_per_token(m8) < dsi_model_total_bytes(m8));
    assert_true(dsi_model_active_bytes_per_token(m8) < dsi_model_active_bytes_per_token(m16));
    assert_true(dsi_model_flops_per_token(m8) == dsi_model_flops_per_token(m16));
    assert_true(dsi_model_fingerprint(m8) != dsi_model_fingerprint(m16));
    assert_string_equal(dsi_model_name(m8), "fp8");

    /* FP8 against BF16 of the same seed, at three depths. (1) One weight:
     * weights are uniform in a 128x128 block whose amax maps to 448, and e4m3
     * spaces values 2^-3 of their binade apart, so the rounding error's RMS
     * is 2.56% of the weights' RMS (integrating spacing^2/12 over the
     * binades); the partial edge blocks of kv_a_proj (160 rows) included. */
    const dsi_layer *L8 = &m8->layers[0], *L16 = &m16->layers[0];
    double w_err[3] = {fp8_weight_error(&L8->gate, &L16->gate), fp8_weight_error(&L8->kv_a, &L16->kv_a),
                       fp8_weight_error(&m8->layers[1].exp_down[5], &m16->layers[1].exp_down[5])};
    for (int i = 0; i < 3; i++) assert_true(w_err[i] > 0.0236 && w_err[i] < 0.0276);
    /* (2) After the first layer: a few matmuls in a chain (q_a->q_b,
     * kv_a->kv_b, o_proj; gate/up->down), each adding ~2.6% in quadrature. */
    const int n = 12, V = c->vocab_size, D = c->hidden, NL = c->n_layers;
    float *h8 = malloc(sizeof(float) * (NL + 1) * n * D), *h16 = malloc(sizeof(float) * (NL + 1) * n * D);
    float *a = run_logits_hidden(m8, n, h8), *b = run_logits_hidden(m16, n, h16);
    for (int i = 0; i < n * V; i++) assert_true(isfinite(a[i]) && isfinite(b[i]));
    double l1 = rel_rms(h8 + (size_t)n * D, h16 + (size_t)n * D, (size_t)n * D);
    /* (3) The logits: random layers amplify the perturbation and flip some
     * expert choices. The oracle's own FP8/BF16 pair (tests/data/golden)
     * grows 6x from layer 1 (2.3%) to its logits (14% at 33 tokens); the
     * same growth from our layer-1 4.4% predicts ~0.27; measured 0.26 here
     * (0.21-0.27 over other seeds and lengths). Bound 0.4: 1.5x headroom for
     * kernel changes, while a wrong scale or block would give errors of order 1. */
    double rel = rel_rms(a, b, (size_t)n * V);
    printf("  fp8 vs bf16 (same seed): weights %.4f %.4f %.4f (bounds 0.0236-0.0276), layer-1 residual %.3f (bound 0.06),"
           " logits %.3f (bound 0.4) relative RMS\n", w_err[0], w_err[1], w_err[2], l1, rel);
    assert_true(l1 > 0.01 && l1 < 0.06);
    assert_true(rel > 0.01 && rel < 0.4);
    free(h8);
    free(h16);
    free(a);
    free(b);
    dsi_model_destroy(m8);
    dsi_model_destroy(m16);
    dsi_model_destroy(NULL);
}

static int files_equal(const char *d1, const char *d2, int *n_files) {
    DIR *d = opendir(d1);
    assert_non_null(d);
    struct dirent *de;
    int equal = 1;
    *n_files = 0;
    while ((de = readdir(d))) {
        if (de->d_name[0] == '.') continue;
        char p1[512], p2[512];
        snprintf(p1, sizeof p1, "%s/%s", d1, de->d_name);
        snprintf(p2, sizeof p2, "%s/%s", d2, de->d_name);
        size_t l1 = 0, l2 = 0;
        void *b1 = tu_read_file(p1, &l1), *b2 = tu_read_file(p2, &l2);
        assert_non_null(b1);
        if (!b2 || l1 != l2 || memcmp(b1, b2, l1)) equal = 0;
        free(b1);
        free(b2);
        (*n_files)++;
    }
    closedir(d);
    return equal;
}

static void test_deterministic(void **state) {
    make("det-a", 1, 42);
    make("det-b", 1, 42);
    make("det-c", 1, 43);
    char a[512], b[512], c[512];
    int n;
    assert_true(files_equal(tmp_path(a, sizeof a, "det-a"), tmp_path(b, sizeof b, "det-b"), &n));
    assert_true(n >= 5); /* config, index, shards */
    assert_false(files_equal(a, tmp_path(c, sizeof c, "det-c"), &n));
    /* the weights themselves differ, not just the seed in the index metadata */
    char p1[600], p2[600];
    snprintf(p1, sizeof p1, "%s/model-00001-of-%05d.safetensors", a, count_shards(a));
    snprintf(p2, sizeof p2, "%s/model-00001-of-%05d.safetensors", c, count_shards(c));
    size_t l1 = 0, l2 = 0;
    void *b1 = tu_read_file(p1, &l1), *b2 = tu_read_file(p2, &l2);
    assert_true(b1 && b2 && l1 == l2);
    assert_true(memcmp(b1, b2, l1) != 0);
    free(b1);
    free(b2);
    tu_rmtree(a);
    tu_rmtree(b);
    tu_rmtree(c);
}

/* The built-in demo path builds the same model as make-model + load. */
static void test_memory_equals_disk(void **state) {
    dsi_config c;
    assert_int_equal(dsi_config_preset(DSI_PRESET_TINY, 0, 1, &c), DSI_OK);
    dsi_model *mem, *disk;
    assert_int_equal(dsi_make_model_memory(&c, SEED, &mem), DSI_OK);
    make("mem-vs-disk", 1, SEED);
    char dir[512];
    assert_int_equal(dsi_model_load(tmp_path(dir, sizeof dir, "mem-vs-disk"), NULL, &disk), DSI_OK);
    const int n = 10;
    float *a = run_logits(mem, n), *b = run_logits(disk, n);
    assert_memory_equal(a, b, sizeof(float) * n * c.vocab_size);
    /* identity follows config and weights, not how they are stored */
    assert_true(dsi_model_fingerprint(mem) == dsi_model_fingerprint(disk));
    free(a);
    free(b);
    dsi_model_destroy(mem);
    dsi_model_destroy(disk);
    /* a different seed is a different model */
    assert_int_equal(dsi_make_model_memory(&c, SEED + 1, &mem), DSI_OK);
    a = run_logits(mem, 2);
    assert_int_equal(dsi_model_load(dir, NULL, &disk), DSI_OK);
    b = run_logits(disk, 2);
    assert_true(memcmp(a, b, sizeof(float) * 2 * c.vocab_size) != 0);
    assert_true(dsi_model_fingerprint(mem) != dsi_model_fingerprint(disk));
    free(a);
    free(b);
    dsi_model_destroy(mem);
    dsi_model_destroy(disk);
    /* an invalid config is refused before anything is generated */
    c.n_group = 3;
    assert_int_equal(dsi_make_model_memory(&c, SEED, &mem), DSI_EFORMAT);
    assert_null(mem);
}

/* Proportions unlike any preset (small vocab, one head): make-model's
 * scratch buffers once assumed the embedding was the largest matrix and
 * overflowed on q_a_proj / kv_a_proj. Both paths build and run it. */
static void test_odd_proportions(void **state) {
    dsi_config c;
    assert_int_equal(dsi_config_preset(DSI_PRESET_TINY, 0, 1, &c), DSI_OK);
    c.vocab_size = 64;
    c.n_heads = 1;
    c.dense_inter = 16;
    c.moe_inter = 16;
    c.n_shared_experts = 2;
    dsi_model *mem, *disk;
    int rc = dsi_make_model_memory(&c, SEED, &mem);
    if (rc) fprintf(stderr, "  %s\n", dsi_last_error());
    assert_int_equal(rc, DSI_OK);
    char dir[512];
    assert_int_equal(dsi_make_model(&c, tmp_path(dir, sizeof dir, "odd"), SEED, 64 << 10, 0), DSI_OK);
    assert_int_equal(dsi_model_load(dir, NULL, &disk), DSI_OK);
    float *a = run_logits(mem, 5), *b = run_logits(disk, 5);
    for (int i = 0; i < 5 * c.vocab_size; i++) assert_true(isfinite(a[i]));
    assert_memory_equal(a, b, sizeof(float) * 5 * c.vocab_size);
    free(a);
    free(b);
    dsi_model_destroy(mem);
    dsi_model_destroy(disk);
    tu_rmtree(dir);
    /* FP8 scale blocks other than DeepSeek's 128x128: the SIMD kernels give
     * the reference kernels' logits (an earlier AVX-512 kernel did not) */
    int blocks[][2] = {{64, 32}, {4, 4}, {128, 16}};
    for (int i = 0; i < 3; i++) {
        c.weight_block[0] = blocks[i][0];
        c.weight_block[1] = blocks[i][1];
        assert_int_equal(dsi_make_model_memory(&c, SEED, &mem), DSI_OK);
        setenv("DSI_KERNELS", "ref", 1);
        float *r = run_logits(mem, 5);
        unsetenv("DSI_KERNELS");
        float *f = run_logits(mem, 5);
        double num = 0, den = 0;
        for (int j = 0; j < 5 * c.vocab_size; j++) {
            num = fmax(num, fabs((double)f[j] - r[j]));
            den = fmax(den, fabs((double)r[j]));
        }
        assert_true(num <= 1e-4 * den);
        free(r);
        free(f);
        dsi_model_destroy(mem);
    }
}

/* ------------------------------------------------- damaged golden copies */

/* Copies golden `model`'s checkpoint (not its oracle outputs) to tmp/leaf. */
static void copy_golden(const char *model, const char *leaf, char *dst, size_t n) {
    char src[512];
    snprintf(src, sizeof src, "%s/golden/%s", DSI_TEST_DATA, model);
    tmp_path(dst, n, leaf);
    tu_rmtree(dst);
    assert_int_equal(mkdir(dst, 0755), 0);
    DIR *d = opendir(src);
    assert_non_null(d);
    struct dirent *de;
    while ((de = readdir(d))) {
        if (strncmp(de->d_name, "model", 5) && strcmp(de->d_name, "config.json")) continue;
        char a[1024], b[1024];
        snprintf(a, sizeof a, "%s/%s", src, de->d_name);
        snprintf(b, sizeof b, "%s/%s", dst, de->d_name);
        assert_int_equal(tu_copy_file(a, b), 0);
    }
    closedir(d);
}

/* The shard file (full path) of `dir` holding `tensor`. */
static void shard_of(const char *dir, const char *tensor, char *out, size_t n) {
    dsi_st_set *s;
    assert_int_equal(dsi_st_open_dir(dir, &s), DSI_OK);
    const dsi_tensor *t = dsi_st_find(s, tensor);
    assert_non_null(t);
    snprintf(out, n, "%s", t->file);
    dsi_st_close(s);
}

/* Rewrites the shard holding `tensor` without it, or with it replaced by
 * (dtype, nd, shape) filled with 0x3c bytes when nd >= 0. `extra` (if not
 * NULL) is added as an F32 tensor of shape `eshape` (2-d). */
static void rewrite(const char *dir, const char *tensor, dsi_dtype dtype, int nd, const int64_t *shape,
                    const char *extra, const int64_t *eshape) {
    char path[1024];
    shard_of(dir, tensor, path, sizeof path);
    dsi_st_set *s;
    assert_int_equal(dsi_st_open_file(path, &s), DSI_OK);
    dsi_st_writer *w = dsi_st_writer_create();
    for (int i = 0; i < dsi_st_count(s); i++) {
        const dsi_tensor *t = dsi_st_at(s, i);
        if (strcmp(t->name, tensor)) {
            assert_int_equal(dsi_st_writer_add(w, t->name, t->dtype, t->n_dims, t->shape, t->data), DSI_OK);
        } else if (nd >= 0) {
            size_t bytes = dsi_dtype_size(dtype);
            for (int d = 0; d < nd; d++) bytes *= (size_t)shape[d];
            void *buf = malloc(bytes);
            memset(buf, 0x3c, bytes);
            assert_int_equal(dsi_st_writer_add(w, tensor, dtype, nd, shape, buf), DSI_OK);
            free(buf);
        }
    }
    if (extra) {
        size_t bytes = sizeof(float) * (size_t)(eshape[0] * eshape[1]);
        float *buf = malloc(bytes);
        for (size_t i = 0; i < bytes / sizeof(float); i++) buf[i] = 1.0f;
        assert_int_equal(dsi_st_writer_add(w, extra, DSI_F32, 2, eshape, buf), DSI_OK);
        free(buf);
    }
    dsi_st_close(s);
    assert_int_equal(dsi_st_writer_save(w, path), DSI_OK); /* atomic rename over the original */
    dsi_st_writer_destroy(w);
}

static void drop_index(const char *dir) {
    char p[1024];
    snprintf(p, sizeof p, "%s/model.safetensors.index.json", dir);
    unlink(p);
}

/* Loading must fail with `code`, and the message must name every needle. */
static void expect_load_error(const char *dir, int code, const char *n1, const char *n2, const char *n3) {
    dsi_model *m = (dsi_model *)(uintptr_t)1;
    int rc = dsi_model_load(dir, NULL, &m);
    printf("  %-34s -> %s: %s\n", strrchr(dir, '/') + 1, dsi_status_name(rc), dsi_last_error());
    assert_int_equal(rc, code);
    assert_null(m);
    assert_true(tu_msg_has(n1, n2, n3));
}

/* Weight rows on 64-byte boundaries (a row straddling cache lines makes
 * every vector load a split load: the decode GEMV lost a quarter of its
 * rate). make-model's files put every tensor whose size is a multiple of 64
 * there when mapped; the resident copy (--no-mmap) puts every tensor there
 * whatever the file (the golden copies come from HF's writer), and computes
 * the same logits. */
static int misaligned(const dsi_model *m, int only_multiples_of_64) {
    int bad = 0;
    for (int i = 0; i < dsi_st_count(m->set); i++) {
        const dsi_tensor *t = dsi_st_at(m->set, i);
        if (only_multiples_of_64 && t->size_bytes % 64) continue;
        bad += (uintptr_t)t->data % 64 != 0;
    }
    return bad;
}

static void test_aligned_tensors(void **state) {
    make("fp8-aligned", 1, SEED);
    char dir[512];
    dsi_model *m, *r;
    assert_int_equal(dsi_model_load(tmp_path(dir, sizeof dir, "fp8-aligned"), NULL, &m), DSI_OK);
    assert_int_equal(misaligned(m, 1), 0);
    dsi_model_destroy(m);
    snprintf(dir, sizeof dir, "%s/golden/tiny-fp8", DSI_TEST_DATA);
    dsi_load_opts lo = {.progress = 0, .no_mmap = 1};
    assert_int_equal(dsi_model_load(dir, NULL, &m), DSI_OK);
    assert_int_equal(dsi_model_load(dir, &lo, &r), DSI_OK);
    printf("  golden tiny-fp8: %d tensors off 64-byte boundaries mapped, %d resident\n", misaligned(m, 0),
           misaligned(r, 0));
    assert_true(misaligned(m, 0) > 0); /* HF's layout: the check can fail */
    assert_int_equal(misaligned(r, 0), 0);
    float *a = run_logits(m, 5), *b = run_logits(r, 5);
    assert_memory_equal(a, b, sizeof(float) * 5 * dsi_model_config(m)->vocab_size);
    free(a);
    free(b);
    dsi_model_destroy(m);
    dsi_model_destroy(r);
}

static void test_golden_copies_load(void **state) {
    char dir[512];
    dsi_model *m;
    copy_golden("tiny-fp8", "ok-fp8", dir, sizeof dir);
    assert_int_equal(dsi_model_load(dir, NULL, &m), DSI_OK);
    dsi_model_destroy(m);
    /* rewriting a tensor with its own dtype and shape (the harness used
     * below) still loads: each failure below comes from its one change */
    rewrite(dir, "model.norm.weight", DSI_BF16, 1, (int64_t[]){256}, NULL, NULL);
    assert_int_equal(dsi_model_load(dir, NULL, &m), DSI_OK);
    dsi_model_destroy(m);
    tu_rmtree(dir);
}

static void test_missing_tensor(void **state) {
    char dir[512];
    /* single-file checkpoint: the binder notices */
    copy_golden("tiny-bf16", "missing-bf16", dir, sizeof dir);
    rewrite(dir, "model.layers.2.self_attn.kv_a_layernorm.weight", 0, -1, NULL, NULL, NULL);
    expect_load_error(dir, DSI_ENOTFOUND, dir, "'model.layers.2.self_attn.kv_a_layernorm.weight'", NULL);
    tu_rmtree(dir);
    /* sharded: the index still lists it, and names the shard it should be in */
    copy_golden("tiny-fp8", "missing-fp8", dir, sizeof dir);
    char shard[1024];
    shard_of(dir, "model.layers.1.mlp.experts.3.up_proj.weight", shard, sizeof shard);
    rewrite(dir, "model.layers.1.mlp.experts.3.up_proj.weight", 0, -1, NULL, NULL, NULL);
    expect_load_error(dir, DSI_ENOTFOUND, "'model.layers.1.mlp.experts.3.up_proj.weight'", strrchr(shard, '/') + 1, NULL);
    /* without the index, the binder finds the hole */
    drop_index(dir);
    expect_load_error(dir, DSI_ENOTFOUND, dir, "'model.layers.1.mlp.experts.3.up_proj.weight'", NULL);
    tu_rmtree(dir);
    /* no config.json */
    copy_golden("tiny-bf16", "no-config", dir, sizeof dir);
    char p[1024];
    snprintf(p, sizeof p, "%s/config.json", dir);
    unlink(p);
    expect_load_error(dir, DSI_ENOTFOUND, p, NULL, NULL);
    tu_rmtree(dir);
}

static void test_wrong_shape(void **state) {
    char dir[512];
    copy_golden("tiny-bf16", "shape-bf16", dir, sizeof dir);
    rewrite(dir, "model.layers.0.mlp.down_proj.weight", DSI_BF16, 2, (int64_t[]){512, 256}, NULL, NULL);
    expect_load_error(dir, DSI_EFORMAT, "model.safetensors", "'model.layers.0.mlp.down_proj.weight'", "[256,512]");
    rewrite(dir, "model.layers.0.mlp.down_proj.weight", DSI_BF16, 2, (int64_t[]){256, 512}, NULL, NULL);
    rewrite(dir, "model.norm.weight", DSI_BF16, 2, (int64_t[]){256, 1}, NULL, NULL);
    expect_load_error(dir, DSI_EFORMAT, "model.safetensors", "'model.norm.weight'", "[256]");
    tu_rmtree(dir);
    /* an FP8 scale of the wrong block count */
    copy_golden("tiny-fp8", "shape-fp8", dir, sizeof dir);
    rewrite(dir, "model.layers.0.self_attn.q_a_proj.weight_scale_inv", DSI_F32, 2, (int64_t[]){1, 2}, NULL, NULL);
    expect_load_error(dir, DSI_EFORMAT, ".safetensors", "'model.layers.0.self_attn.q_a_proj.weight_scale_inv'", "[2,2]");
    tu_rmtree(dir);
}

static void test_wrong_dtype(void **state) {
    char dir[512];
    copy_golden("tiny-bf16", "dtype-bf16", dir, sizeof dir);
    /* a norm stored as I32 */
    rewrite(dir, "model.norm.weight", DSI_I32, 1, (int64_t[]){256}, NULL, NULL);
    expect_load_error(dir, DSI_EFORMAT, "model.safetensors", "'model.norm.weight'", "I32");
    rewrite(dir, "model.norm.weight", DSI_BF16, 1, (int64_t[]){256}, NULL, NULL);
    /* a linear weight stored as I32 */
    rewrite(dir, "model.layers.3.self_attn.o_proj.weight", DSI_I32, 2, (int64_t[]){256, 256}, NULL, NULL);
    expect_load_error(dir, DSI_EUNSUPPORTED, "model.safetensors", "'model.layers.3.self_attn.o_proj.weight'", "I32");
    rewrite(dir, "model.layers.3.self_attn.o_proj.weight", DSI_BF16, 2, (int64_t[]){256, 256}, NULL, NULL);
    /* FP8 embeddings (with a scale, so only the embedding rule can object) */
    rewrite(dir, "model.embed_tokens.weight", DSI_F8_E4M3, 2, (int64_t[]){2048, 256}, "model.embed_tokens.weight_scale_inv",
            (int64_t[]){16, 2});
    expect_load_error(dir, DSI_EFORMAT, "model.safetensors", "'model.embed_tokens.weight'", "FP8");
    tu_rmtree(dir);

    copy_golden("tiny-fp8", "dtype-fp8", dir, sizeof dir);
    drop_index(dir); /* so that removing a tensor reaches the binder */
    char shard[1024];
    /* an FP8 weight without its scale_inv */
    shard_of(dir, "model.layers.1.mlp.shared_experts.down_proj.weight", shard, sizeof shard);
    rewrite(dir, "model.layers.1.mlp.shared_experts.down_proj.weight_scale_inv", 0, -1, NULL, NULL, NULL);
    expect_load_error(dir, DSI_ENOTFOUND, strrchr(shard, '/') + 1, "'model.layers.1.mlp.shared_experts.down_proj.weight'",
                      "weight_scale_inv");
    tu_rmtree(dir);
    copy_golden("tiny-fp8", "dtype-fp8-scale", dir, sizeof dir);
    /* a scale stored as BF16 */
    rewrite(dir, "model.layers.2.self_attn.kv_b_proj.weight_scale_inv", DSI_BF16, 2, (int64_t[]){4, 1}, NULL, NULL);
    expect_load_error(dir, DSI_EFORMAT, ".safetensors", "'model.layers.2.self_attn.kv_b_proj.weight_scale_inv'", "F32");
    /* an FP8 router */
    rewrite(dir, "model.layers.2.self_attn.kv_b_proj.weight_scale_inv", DSI_F32, 2, (int64_t[]){4, 1}, NULL, NULL);
    rewrite(dir, "model.layers.2.mlp.gate.weight", DSI_F8_E4M3, 2, (int64_t[]){16, 256}, "model.layers.2.mlp.gate.weight_scale_inv",
            (int64_t[]){1, 2});
    expect_load_error(dir, DSI_EFORMAT, ".safetensors", "'model.layers.2.mlp.gate.weight'", "router");
    tu_rmtree(dir);
}

static void test_truncated_shard(void **state) {
    char dir[512], shard[1024];
    copy_golden("tiny-fp8", "truncated", dir, sizeof dir);
    snprintf(shard, sizeof shard, "%s/model-00002-of-00003.safetensors", dir);
    size_t len = 0;
    uint8_t *buf = tu_read_file(shard, &len);
    assert_non_null(buf);
    /* cut inside the data: the last tensor of the shard overruns the file */
    dsi_st_set *s;
    assert_int_equal(dsi_st_open_file(shard, &s), DSI_OK);
    const dsi_tensor *last = NULL;
    for (int i = 0; i < dsi_st_count(s); i++) {
        const dsi_tensor *t = dsi_st_at(s, i);
        if (!last || (const uint8_t *)t->data > (const uint8_t *)last->data) last = t;
    }
    char quoted[300];
    snprintf(quoted, sizeof quoted, "'%s'", last->name);
    dsi_st_close(s);
    assert_int_equal(tu_write_file(shard, buf, len - 100), 0);
    expect_load_error(dir, DSI_ERANGE, "model-00002-of-00003.safetensors", quoted, NULL);
    /* cut inside the header */
    assert_int_equal(tu_write_file(shard, buf, 1000), 0);
    expect_load_error(dir, DSI_EFORMAT, "model-00002-of-00003.safetensors", "truncated", NULL);
    /* cut to nothing */
    assert_int_equal(tu_write_file(shard, buf, 0), 0);
    expect_load_error(dir, DSI_EFORMAT, "model-00002-of-00003.safetensors", NULL, NULL);
    free(buf);
    tu_rmtree(dir);
}

/* Sets config.json's `key` in `dir` to the JSON `value`. */
static void set_config(const char *dir, const char *key, const char *value) {
    char p[1024];
    snprintf(p, sizeof p, "%s/config.json", dir);
    size_t len = 0;
    char *text = tu_read_file(p, &len);
    assert_non_null(text);
    cJSON *root = cJSON_ParseWithLength(text, len);
    free(text);
    assert_non_null(root);
    cJSON_DeleteItemFromObjectCaseSensitive(root, key);
    cJSON_AddItemToObject(root, key, cJSON_Parse(value));
    char *out = cJSON_Print(root);
    assert_int_equal(tu_write_file(p, out, strlen(out)), 0);
    free(out);
    cJSON_Delete(root);
}

/* A config that leaves checkpoint tensors unused ran another model than the
 * checkpoint's: fewer layers, no shared experts, the embedding as lm_head. */
static void test_unused_tensors(void **state) {
    char dir[512];
    copy_golden("tiny-fp8", "unused-tie", dir, sizeof dir);
    set_config(dir, "tie_word_embeddings", "true");
    expect_load_error(dir, DSI_EFORMAT, ".safetensors", "'lm_head.weight'", "not used");
    tu_rmtree(dir);
    copy_golden("tiny-fp8", "unused-shared", dir, sizeof dir);
    set_config(dir, "n_shared_experts", "0");
    expect_load_error(dir, DSI_EFORMAT, ".safetensors", "shared_experts", "not used");
    tu_rmtree(dir);
    copy_golden("tiny-bf16", "unused-layers", dir, sizeof dir);
    set_config(dir, "num_hidden_layers", "3");
    expect_load_error(dir, DSI_EFORMAT, "model.safetensors", "'model.layers.3.", "not used");
    /* the layers after the last one are the MTP modules' when the config has them */
    set_config(dir, "num_nextn_predict_layers", "1");
    dsi_model *m;
    assert_int_equal(dsi_model_load(dir, NULL, &m), DSI_OK);
    dsi_model_destroy(m);
    set_config(dir, "num_hidden_layers", "2");
    expect_load_error(dir, DSI_EFORMAT, "model.safetensors", "'model.layers.3.", "not used");
    tu_rmtree(dir);
    /* a rotary_emb.inv_freq buffer, saved by older transformers, is not weights: ignored as transformers does */
    copy_golden("tiny-bf16", "unused-inv-freq", dir, sizeof dir);
    const char *norm = "model.layers.0.input_layernorm.weight";
    rewrite(dir, norm, DSI_BF16, 1, (int64_t[]){256}, "model.layers.0.self_attn.rotary_emb.inv_freq", (int64_t[]){1, 32});
    assert_int_equal(dsi_model_load(dir, NULL, &m), DSI_OK);
    dsi_model_destroy(m);
    rewrite(dir, norm, DSI_BF16, 1, (int64_t[]){256}, "model.layers.0.self_attn.rotary.inv_freq", (int64_t[]){1, 32});
    expect_load_error(dir, DSI_EFORMAT, "model.safetensors", "'model.layers.0.self_attn.rotary.inv_freq'", "not used");
    tu_rmtree(dir);
}

/* Rewrites the shard holding `tensor` with `n` bytes at `offset` of its data replaced by `bytes`. */
static void patch(const char *dir, const char *tensor, size_t offset, const void *bytes, size_t n) {
    char path[1024];
    shard_of(dir, tensor, path, sizeof path);
    dsi_st_set *s;
    assert_int_equal(dsi_st_open_file(path, &s), DSI_OK);
    dsi_st_writer *w = dsi_st_writer_create();
    for (int i = 0; i < dsi_st_count(s); i++) {
        const dsi_tensor *t = dsi_st_at(s, i);
        uint8_t *buf = malloc(t->size_bytes + 1);
        memcpy(buf, t->data, t->size_bytes);
        if (!strcmp(t->name, tensor)) {
            assert_true(offset + n <= t->size_bytes);
            memcpy(buf + offset, bytes, n);
        }
        assert_int_equal(dsi_st_writer_add(w, t->name, t->dtype, t->n_dims, t->shape, buf), DSI_OK);
        free(buf);
    }
    dsi_st_close(s);
    assert_int_equal(dsi_st_writer_save(w, path), DSI_OK);
    dsi_st_writer_destroy(w);
}

/* NaN or inf in a norm, a router bias or an FP8 block scale made every
 * logit NaN (or silently skewed the routing): the load refuses them. */
static void test_non_finite_values(void **state) {
    static const struct { const char *tensor; size_t offset; uint32_t bits; int size; } cases[] = {
        {"model.layers.0.input_layernorm.weight", 6, 0x7fc0, 2},                  /* BF16 NaN */
        {"model.norm.weight", 0, 0xff80, 2},                                      /* BF16 -inf */
        {"model.layers.2.mlp.gate.e_score_correction_bias", 12, 0x7f800000, 4},   /* F32 inf */
        {"model.layers.0.self_attn.q_a_proj.weight_scale_inv", 4, 0x7fc00000, 4}, /* F32 NaN */
        {"model.layers.3.mlp.experts.5.down_proj.weight_scale_inv", 0, 0xff800000, 4},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char dir[512];
        copy_golden("tiny-fp8", "non-finite", dir, sizeof dir);
        uint8_t b[4];
        for (int k = 0; k < cases[i].size; k++) b[k] = (uint8_t)(cases[i].bits >> (8 * k));
        patch(dir, cases[i].tensor, cases[i].offset, b, (size_t)cases[i].size);
        char quoted[256];
        snprintf(quoted, sizeof quoted, "'%s'", cases[i].tensor);
        expect_load_error(dir, DSI_EFORMAT, ".safetensors", quoted, "non-finite");
        tu_rmtree(dir);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_make_load_run),
        cmocka_unit_test(test_deterministic),
        cmocka_unit_test(test_memory_equals_disk),
        cmocka_unit_test(test_odd_proportions),
        cmocka_unit_test(test_golden_copies_load),
        cmocka_unit_test(test_aligned_tensors),
        cmocka_unit_test(test_missing_tensor),
        cmocka_unit_test(test_wrong_shape),
        cmocka_unit_test(test_wrong_dtype),
        cmocka_unit_test(test_truncated_shard),
        cmocka_unit_test(test_unused_tensors),
        cmocka_unit_test(test_non_finite_values),
    };
    return cmocka_run_group_tests_name("model-load", tests, group_setup, group_teardown);
}
