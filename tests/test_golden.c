/* The engine against the float64 oracle (HF transformers DeepseekV3, see
 * tests/data/golden/README.md): every prefill case and every greedy0
 * position, in both attention forms, for the BF16 and FP8 tiny models;
 * chunked prefill equals one-shot; batching mixed sequences changes nothing. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <stdlib.h>

#include "dsinfer/engine.h"
#include "dsinfer/model.h"
#include "dsinfer/sampler.h"
#include "golden_util.h"

#define TOL 1e-3

typedef struct fixture {
    dsi_model *m;
    dsi_kv_pool *kv;
    dsi_st_set *gold;
    const char *name;
} fixture;

static int setup_model(void **state, const char *dir) {
    fixture *f = calloc(1, sizeof *f);
    char path[1024];
    snprintf(path, sizeof path, "%s/golden/%s", DSI_TEST_DATA, dir);
    if (dsi_model_load(path, NULL, &f->m) != DSI_OK) { fprintf(stderr, "%s\n", dsi_last_error()); return -1; }
    snprintf(path, sizeof path, "%s/golden/%s/golden.safetensors", DSI_TEST_DATA, dir);
    if (dsi_st_open_file(path, &f->gold) != DSI_OK) { fprintf(stderr, "%s\n", dsi_last_error()); return -1; }
    const dsi_config *c = dsi_model_config(f->m);
    if (dsi_kv_pool_create(c->n_layers, dsi_config_kv_dim(c), DSI_KV_BLOCK_TOKENS, 32, &f->kv) != DSI_OK) return -1;
    f->name = dir;
    *state = f;
    return 0;
}
static int setup_bf16(void **state) { return setup_model(state, "tiny-bf16"); }
static int setup_fp8(void **state) { return setup_model(state, "tiny-fp8"); }
static int teardown(void **state) {
    fixture *f = *state;
    dsi_kv_pool_destroy(f->kv);
    dsi_st_close(f->gold);
    dsi_model_destroy(f->m);
    free(f);
    return 0;
}

static dsi_engine *make_engine(fixture *f, dsi_attn_mode attn, const char *kernels, int threads) {
    dsi_engine *e = NULL;
    dsi_engine_opts o = {.n_threads = threads, .attn = attn, .kernels = kernels, .max_tokens = 256};
    assert_int_equal(dsi_engine_create(f->m, f->kv, &o, &e), DSI_OK);
    return e;
}

/* Runs a case's ids with the given chunking/decoding and checks every position. */
static double check_case(fixture *f, dsi_engine *e, const char *cs, int chunk, int decode_from) {
    char name[64];
    snprintf(name, sizeof name, "%s.ids", cs);
    const dsi_tensor *ids = golden_tensor(f->gold, name);
    snprintf(name, sizeof name, "%s.logits", cs);
    const dsi_tensor *ref = golden_tensor(f->gold, name);
    assert_non_null(ids);
    assert_non_null(ref);
    int n = (int)ids->shape[0], V = dsi_model_config(f->m)->vocab_size;
    float *out = malloc(sizeof(float) * n * V);
    for (size_t i = 0; i < (size_t)n * V; i++) out[i] = NAN; /* poison */
    assert_int_equal(dsi_engine_logits(e, ids->data, n, chunk, decode_from, out), DSI_OK);
    double err = rel_err(out, ref->data, (size_t)n * V);
    free(out);
    assert_int_equal(dsi_kv_n_free(f->kv), dsi_kv_n_blocks(f->kv)); /* blocks returned */
    return err;
}

static void run_all_forms(fixture *f, const char *kernels) {
    const char *cases[] = {"prompt0", "prompt1", "prompt2", "prompt3"};
    dsi_attn_mode modes[] = {DSI_ATTN_PREFILL, DSI_ATTN_ABSORBED};
    for (int mi = 0; mi < 2; mi++) {
        dsi_engine *e = make_engine(f, modes[mi], kernels, 2);
        for (int c = 0; c < 4; c++) {
            double err = check_case(f, e, cases[c], 0, -1);
            printf("  %s %s %-8s %s: max|err|/max|ref| = %.2e\n", f->name, kernels ? kernels : "best",
                   mi ? "absorbed" : "prefill", cases[c], err);
            assert_true(err <= TOL);
        }
        /* greedy0 decoded token by token from the 9-token prompt */
        double err = check_case(f, e, "greedy0", 0, 9);
        printf("  %s %s %-8s greedy0 (decode from 9): %.2e\n", f->name, kernels ? kernels : "best",
               mi ? "absorbed" : "prefill", err);
        assert_true(err <= TOL);
        dsi_engine_destroy(e);
    }
}

static void test_golden_best(void **state) { run_all_forms(*state, NULL); }
static void test_golden_ref(void **state) { run_all_forms(*state, "ref"); }

static void test_chunked_equals_oneshot(void **state) {
    fixture *f = *state;
    dsi_engine *e = make_engine(f, DSI_ATTN_AUTO, NULL, 2);
    const dsi_tensor *ids = golden_tensor(f->gold, "prompt3.ids");
    int n = (int)ids->shape[0], V = dsi_model_config(f->m)->vocab_size;
    float *a = malloc(sizeof(float) * n * V), *b = malloc(sizeof(float) * n * V);
    assert_int_equal(dsi_engine_logits(e, ids->data, n, 0, -1, a), DSI_OK);
    int chunks[] = {1, 7, 33, 64, 100};
    for (int i = 0; i < 5; i++) {
        assert_int_equal(dsi_engine_logits(e, ids->data, n, chunks[i], -1, b), DSI_OK);
        double err = rel_err(b, a, (size_t)n * V);
        printf("  %s chunk %3d vs one-shot: %.2e\n", f->name, chunks[i], err);
        assert_true(err <= 1e-5);
    }
    free(a);
    free(b);
    dsi_engine_destroy(e);
}

/* --batch-invariant: still the oracle's logits, and the same bits however
 * the prompt is chunked and on any thread count (each token's numbers do
 * not depend on what else its step holds). */
static void test_batch_invariant(void **state) {
    fixture *f = *state;
    const dsi_tensor *ids = golden_tensor(f->gold, "prompt3.ids");
    const dsi_tensor *ref = golden_tensor(f->gold, "prompt3.logits");
    int n = (int)ids->shape[0], V = dsi_model_config(f->m)->vocab_size;
    float *a = malloc(sizeof(float) * n * V), *b = malloc(sizeof(float) * n * V);
    dsi_engine_opts o = {.n_threads = 2, .max_tokens = 256, .batch_invariant = 1};
    dsi_engine *e = NULL;
    assert_int_equal(dsi_engine_create(f->m, f->kv, &o, &e), DSI_OK);
    assert_int_equal(dsi_engine_logits(e, ids->data, n, 0, -1, a), DSI_OK);
    double err = rel_err(a, ref->data, (size_t)n * V);
    printf("  %s batch-invariant prompt3: %.2e vs the oracle\n", f->name, err);
    assert_true(err <= TOL);
    int chunks[] = {1, 7, 33, 100};
    for (int i = 0; i < 4; i++) {
        assert_int_equal(dsi_engine_logits(e, ids->data, n, chunks[i], -1, b), DSI_OK);
        assert_memory_equal(a, b, sizeof(float) * n * V);
    }
    assert_int_equal(dsi_engine_logits(e, ids->data, n, 0, 50, b), DSI_OK); /* decode from 50 */
    assert_memory_equal(a, b, sizeof(float) * n * V);
    dsi_engine_destroy(e);
    o.n_threads = 1;
    assert_int_equal(dsi_engine_create(f->m, f->kv, &o, &e), DSI_OK);
    assert_int_equal(dsi_engine_logits(e, ids->data, n, 13, -1, b), DSI_OK);
    assert_memory_equal(a, b, sizeof(float) * n * V);
    printf("  %s batch-invariant: chunks 1/7/33/100, decode from 50, 1 thread: bit-identical\n", f->name);
    dsi_engine_destroy(e);
    free(a);
    free(b);
}

/* Greedy tokens equal the oracle's wherever its margin exceeds our error. */
static void test_greedy_tokens(void **state) {
    fixture *f = *state;
    dsi_engine *e = make_engine(f, DSI_ATTN_AUTO, NULL, 2);
    const dsi_tensor *ids = golden_tensor(f->gold, "greedy0.ids");
    const dsi_tensor *margin = golden_tensor(f->gold, "greedy0.margin");
    const dsi_tensor *ref = golden_tensor(f->gold, "greedy0.logits");
    int n = (int)ids->shape[0], V = dsi_model_config(f->m)->vocab_size;
    const int32_t *gid = ids->data;
    float *out = malloc(sizeof(float) * n * V);
    assert_int_equal(dsi_engine_logits(e, gid, n, 0, 9, out), DSI_OK);
    int checked = 0;
    for (int p = 8; p < n - 1; p++) {
        double err = 0;
        for (int v = 0; v < V; v++) err = fmax(err, fabs(out[p * V + v] - ((const float *)ref->data)[p * V + v]));
        if (((const float *)margin->data)[p] > 2 * err) {
            assert_int_equal(dsi_argmax(out + (size_t)p * V, V), gid[p + 1]);
            checked++;
        }
    }
    printf("  %s greedy tokens checked at %d of %d positions\n", f->name, checked, n - 9);
    assert_true(checked >= (n - 9) / 2);
    free(out);
    dsi_engine_destroy(e);
}

/* Several sequences in one step (a prefill chunk and decodes at different
 * positions) give the same logits as each alone. */
static void test_mixed_batch(void **state) {
    fixture *f = *state;
    dsi_engine *e = make_engine(f, DSI_ATTN_AUTO, NULL, 2);
    const dsi_tensor *ids = golden_tensor(f->gold, "prompt3.ids");
    const dsi_tensor *ref = golden_tensor(f->gold, "prompt3.logits");
    const int32_t *tok = ids->data;
    int V = dsi_model_config(f->m)->vocab_size;
    /* A: prefill 40 tokens first, then decodes; B: prefilled to 70 then chunk of 20; C: fresh 5 tokens */
    int32_t ba[2], bb[2], bc[1];
    for (int i = 0; i < 2; i++) { ba[i] = dsi_kv_alloc(f->kv); bb[i] = dsi_kv_alloc(f->kv); }
    bc[0] = dsi_kv_alloc(f->kv);
    float *la = malloc(sizeof(float) * V * 128), *lb = malloc(sizeof(float) * V * 128), *lc = malloc(sizeof(float) * V * 8);
    dsi_seq_step s0[2] = {{tok, 40, 0, ba, 2, DSI_LOGITS_ALL, la}, {tok, 70, 0, bb, 2, DSI_LOGITS_ALL, lb}};
    assert_int_equal(dsi_engine_step(e, s0, 2), DSI_OK);
    dsi_seq_step s1[3] = {{tok + 40, 1, 40, ba, 2, DSI_LOGITS_LAST, la + 40 * V},
                          {tok + 70, 20, 70, bb, 2, DSI_LOGITS_ALL, lb + 70 * V},
                          {tok, 5, 0, bc, 1, DSI_LOGITS_ALL, lc}};
    assert_int_equal(dsi_engine_step(e, s1, 3), DSI_OK);
    const float *r = ref->data;
    double ea = rel_err(la, r, (size_t)41 * V), eb = rel_err(lb, r, (size_t)90 * V), ec = rel_err(lc, r, (size_t)5 * V);
    printf("  %s mixed batch: %.2e %.2e %.2e\n", f->name, ea, eb, ec);
    assert_true(ea <= TOL && eb <= TOL && ec <= TOL);
    for (int i = 0; i < 2; i++) { dsi_kv_release(f->kv, ba[i]); dsi_kv_release(f->kv, bb[i]); }
    dsi_kv_release(f->kv, bc[0]);
    free(la); free(lb); free(lc);
    dsi_engine_destroy(e);
}

static double rms_rel(const float *a, const float *b, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)a[i] - b[i];
        num += d * d;
        den += (double)b[i] * b[i];
    }
    return sqrt(num / den);
}

/* S sequences, sequence i prefilled with prompt3's first i + 2 tokens in
 * one step, then all decoding their next token in one step, each wanting
 * its last row's logits (to lg + i * V). Their blocks go to blk. */
static void decode_batch(fixture *f, dsi_engine *e, int S, int32_t *blk, float *lg) {
    const int32_t *tok = golden_tensor(f->gold, "prompt3.ids")->data;
    int V = dsi_model_config(f->m)->vocab_size;
    dsi_seq_step *st = malloc(sizeof *st * S);
    for (int i = 0; i < S; i++) {
        blk[i] = dsi_kv_alloc(f->kv);
        st[i] = (dsi_seq_step){tok, i + 2, 0, &blk[i], 1, DSI_LOGITS_NONE, NULL};
    }
    assert_int_equal(dsi_engine_step(e, st, S), DSI_OK);
    for (int i = 0; i < S; i++) st[i] = (dsi_seq_step){tok + i + 2, 1, i + 2, &blk[i], 1, DSI_LOGITS_LAST, lg + (size_t)i * V};
    assert_int_equal(dsi_engine_step(e, st, S), DSI_OK);
    free(st);
}

/* Sequence i of decode_batch decoding its token again, alone. */
static void decode_alone(fixture *f, dsi_engine *e, int i, const int32_t *blk, float *out) {
    const int32_t *tok = golden_tensor(f->gold, "prompt3.ids")->data;
    dsi_seq_step one = {tok + i + 2, 1, i + 2, &blk[i], 1, DSI_LOGITS_LAST, out};
    assert_int_equal(dsi_engine_step(e, &one, 1), DSI_OK);
}

/* 17 sequences decoding in one step: the lm_head runs on groups of up to
 * 16 gathered rows, and the routed experts of a multi-row step run as fused
 * jobs. Each sequence's logits must be its own position's (the oracle's
 * row), and under --batch-invariant the same bits as that sequence decoding
 * alone. */
static void test_decode_batch(void **state) {
    fixture *f = *state;
    const float *r = golden_tensor(f->gold, "prompt3.logits")->data;
    int V = dsi_model_config(f->m)->vocab_size;
    enum { S = 17 };
    assert_true(golden_tensor(f->gold, "prompt3.ids")->shape[0] > S + 2);
    for (int inv = 0; inv < 2; inv++) {
        dsi_engine_opts o = {.n_threads = 2, .max_tokens = 256, .batch_invariant = inv};
        dsi_engine *e = NULL;
        assert_int_equal(dsi_engine_create(f->m, f->kv, &o, &e), DSI_OK);
        int32_t blk[S];
        float *lg = malloc(sizeof(float) * V * S), *alone = malloc(sizeof(float) * V);
        decode_batch(f, e, S, blk, lg);
        double worst = 0;
        for (int i = 0; i < S; i++) {
            double err = rel_err(lg + (size_t)i * V, r + (size_t)(i + 2) * V, (size_t)V);
            worst = err > worst ? err : worst;
            assert_true(err <= TOL);
        }
        if (inv) { /* sequence 5 alone: the same bits */
            decode_alone(f, e, 5, blk, alone);
            assert_memory_equal(alone, lg + (size_t)5 * V, sizeof(float) * V);
        }
        printf("  %s %d sequences decoding in one step%s: worst %.2e vs the oracle%s\n", f->name, S,
               inv ? " (batch-invariant)" : "", worst, inv ? "; one alone: bit-identical" : "");
        for (int i = 0; i < S; i++) dsi_kv_release(f->kv, blk[i]);
        free(lg);
        free(alone);
        dsi_engine_destroy(e);
    }
}

/* --fp8-act, 12 sequences decoding in one step (the routed experts as
 * fused jobs on rows quantised in place, the shared MLP through the FP8 x
 * FP8 GEMM) against each sequence decoding alone (one-row paths): the same
 * quantised values, summed in other orders, so only a rounding step flipped
 * here and there apart. A row left unquantised would differ by the
 * quantisation itself (~0.1 RMS, test_fp8_activations). */
static void test_decode_batch_fp8(void **state) {
    fixture *f = *state;
    int V = dsi_model_config(f->m)->vocab_size;
    enum { S = 12 };
    dsi_engine_opts o = {.n_threads = 2, .max_tokens = 256, .fp8_activations = 1};
    dsi_engine *e = NULL;
    assert_int_equal(dsi_engine_create(f->m, f->kv, &o, &e), DSI_OK);
    int32_t blk[S];
    float *lg = malloc(sizeof(float) * V * S), *alone = malloc(sizeof(float) * V * S);
    decode_batch(f, e, S, blk, lg);
    for (int i = 0; i < S; i++) decode_alone(f, e, i, blk, alone + (size_t)i * V);
    double d = rms_rel(lg, alone, (size_t)S * V);
    printf("  %s fp8 activations, %d sequences in one step vs each alone: %.2e RMS (tol 1e-3)\n", f->name, S, d);
    assert_true(d <= 1e-3);
    for (int i = 0; i < S; i++) dsi_kv_release(f->kv, blk[i]);
    free(lg);
    free(alone);
    dsi_engine_destroy(e);
}

/* FP8 activation quantisation (per 1x128 tile, e4m3 keeps 3 mantissa bits:
 * ~2% RMS per element) moves logits measurably. Its stated tolerance: after
 * the first layer (the direct effect of one layer's quantised matmuls) the
 * residual stream is within 5% RMS of the oracle; the logits within 30% RMS
 * (random weights amplify the perturbation layer by layer, and it flips
 * expert choices; measured 2.3% and 15%). */
static void test_fp8_activations(void **state) {
    fixture *f = *state;
    dsi_engine *e = NULL;
    dsi_engine_opts o = {.n_threads = 2, .fp8_activations = 1, .max_tokens = 256};
    assert_int_equal(dsi_engine_create(f->m, f->kv, &o, &e), DSI_OK);
    const dsi_config *c = dsi_model_config(f->m);
    const dsi_tensor *ids = golden_tensor(f->gold, "prompt2.ids");
    const dsi_tensor *hs = golden_tensor(f->gold, "prompt2.hidden_states");
    const dsi_tensor *ref = golden_tensor(f->gold, "prompt2.logits");
    int n = (int)ids->shape[0], D = c->hidden, V = c->vocab_size;
    float *cap = malloc(sizeof(float) * (c->n_layers + 1) * n * D), *out = malloc(sizeof(float) * n * V);
    dsi_engine_capture_hidden(e, cap, n);
    assert_int_equal(dsi_engine_logits(e, ids->data, n, 0, -1, out), DSI_OK);
    double l1 = rms_rel(cap + (size_t)n * D, (const float *)hs->data + (size_t)n * D, (size_t)n * D);
    double lg = rms_rel(out, ref->data, (size_t)n * V);
    /* decoded token by token after the first: the absorbed attention and
     * one-row matmuls, whose activations are quantised on their own paths
     * (engine.c maybe_quantise, moe.c quantise_items; matmul_q8 takes 8 rows
     * or more) */
    assert_int_equal(dsi_engine_logits(e, ids->data, n, 0, 1, out), DSI_OK);
    double dg = rms_rel(out, ref->data, (size_t)n * V);
    printf("  %s fp8 activations: layer-1 residual %.2e RMS (tol 5e-2), logits %.2e RMS, decoded %.2e (tol 0.3)\n",
           f->name, l1, lg, dg);
    assert_true(l1 > 1e-4); /* the quantiser is really on */
    assert_true(l1 <= 5e-2);
    assert_true(lg <= 0.3);
    assert_true(dg > 1e-4 && dg <= 0.3);
    free(cap);
    free(out);
    dsi_engine_destroy(e);
}

/* The residual stream after every layer matches the oracle's hidden states. */
static void test_hidden_states(void **state) {
    fixture *f = *state;
    dsi_engine *e = make_engine(f, DSI_ATTN_AUTO, NULL, 2);
    const dsi_config *c = dsi_model_config(f->m);
    const dsi_tensor *ids = golden_tensor(f->gold, "prompt2.ids");
    const dsi_tensor *hs = golden_tensor(f->gold, "prompt2.hidden_states");
    int n = (int)ids->shape[0], D = c->hidden, V = c->vocab_size;
    float *cap = malloc(sizeof(float) * (c->n_layers + 1) * n * D), *out = malloc(sizeof(float) * n * V);
    dsi_engine_capture_hidden(e, cap, n);
    assert_int_equal(dsi_engine_logits(e, ids->data, n, 0, -1, out), DSI_OK);
    for (int l = 0; l <= c->n_layers; l++) {
        double err = rel_err(cap + (size_t)l * n * D, (const float *)hs->data + (size_t)l * n * D, (size_t)n * D);
        assert_true(err <= TOL);
    }
    free(cap);
    free(out);
    dsi_engine_destroy(e);
}

int main(void) {
    const struct CMUnitTest bf16[] = {
        cmocka_unit_test(test_golden_best),
        cmocka_unit_test(test_golden_ref),
        cmocka_unit_test(test_chunked_equals_oneshot),
        cmocka_unit_test(test_greedy_tokens),
        cmocka_unit_test(test_mixed_batch),
        cmocka_unit_test(test_decode_batch),
        cmocka_unit_test(test_hidden_states),
        cmocka_unit_test(test_batch_invariant),
    };
    const struct CMUnitTest fp8[] = {
        cmocka_unit_test(test_golden_best),
        cmocka_unit_test(test_golden_ref),
        cmocka_unit_test(test_chunked_equals_oneshot),
        cmocka_unit_test(test_greedy_tokens),
        cmocka_unit_test(test_mixed_batch),
        cmocka_unit_test(test_decode_batch),
        cmocka_unit_test(test_hidden_states),
        cmocka_unit_test(test_batch_invariant),
        cmocka_unit_test(test_fp8_activations),
        cmocka_unit_test(test_decode_batch_fp8),
    };
    int rc = cmocka_run_group_tests_name("golden-bf16", bf16, setup_bf16, teardown);
    rc |= cmocka_run_group_tests_name("golden-fp8", fp8, setup_fp8, teardown);
    return rc;
}
