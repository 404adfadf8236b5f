/* The scheduler driven directly with the real engine on the demo model:
 * continuous batching, chunked prefill, admission when the pool is full,
 * preemption, cancellation, prefix-cache hits, stop ids, the thread. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "dsinfer/sched.h"

static dsi_model *g_model;

/* The output of one request as the callbacks saw it. */
typedef struct result {
    int32_t tokens[512];
    int n;
    atomic_int finished;
    dsi_sched_event fin;
    int stop_after;         /* callback returns 1 after this many tokens (0: never) */
} result;

static int on_event(void *user, const dsi_sched_event *ev) {
    result *r = user;
    if (ev->type == DSI_SCHED_TOKEN) {
        r->tokens[r->n++] = ev->token;
        return r->stop_after && r->n >= r->stop_after;
    }
    r->fin = *ev;
    r->fin.message = NULL;
    atomic_store(&r->finished, 1);
    return 0;
}

typedef struct rig {
    dsi_kv_pool *kv;
    dsi_engine *e;
    dsi_sched *s;
} rig;

static void rig_open(rig *g, int n_blocks, int step_tokens, const dsi_sched_opts *so) {
    const dsi_config *c = dsi_model_config(g_model);
    assert_int_equal(dsi_kv_pool_create(c->n_layers, dsi_config_kv_dim(c), DSI_KV_BLOCK_TOKENS, n_blocks, &g->kv), DSI_OK);
    dsi_engine_opts eo = {.n_threads = 1, .max_tokens = step_tokens};
    assert_int_equal(dsi_engine_create(g_model, g->kv, &eo, &g->e), DSI_OK);
    assert_int_equal(dsi_sched_create(g->e, so, &g->s), DSI_OK);
}

static void rig_close(rig *g) {
    dsi_sched_destroy(g->s);
    dsi_engine_destroy(g->e);
    dsi_kv_pool_destroy(g->kv);
}

static void prompt_of(int32_t *p, int n, int seed) {
    for (int i = 0; i < n; i++) p[i] = (seed * 131 + i * 37 + 11) % 2000;
}

/* Reference: one sequence alone, whole prompt in one step, greedy decode. */
static void reference(const int32_t *prompt, int n, int n_new, int32_t *out) {
    const dsi_config *c = dsi_model_config(g_model);
    dsi_kv_pool *kv;
    dsi_engine *e;
    int nb = (n + n_new + 63) / 64;
    assert_int_equal(dsi_kv_pool_create(c->n_layers, dsi_config_kv_dim(c), 64, nb, &kv), DSI_OK);
    dsi_engine_opts eo = {.n_threads = 1, .max_tokens = 512};
    assert_int_equal(dsi_engine_create(g_model, kv, &eo, &e), DSI_OK);
    int32_t blocks[64];
    for (int i = 0; i < nb; i++) blocks[i] = dsi_kv_alloc(kv);
    float *logits = malloc(sizeof(float) * c->vocab_size);
    dsi_seq_step st = {prompt, n, 0, blocks, nb, DSI_LOGITS_LAST, logits};
    assert_int_equal(dsi_engine_step(e, &st, 1), DSI_OK);
    for (int i = 0; i < n_new; i++) {
        out[i] = dsi_argmax(logits, c->vocab_size);
        dsi_seq_step d = {&out[i], 1, n + i, blocks, nb, DSI_LOGITS_LAST, logits};
        if (i + 1 < n_new) assert_int_equal(dsi_engine_step(e, &d, 1), DSI_OK);
    }
    free(logits);
    dsi_engine_destroy(e);
    dsi_kv_pool_destroy(kv);
}

static dsi_request_params greedy(const int32_t *prompt, int n, int max_tokens) {
    dsi_request_params p = {.prompt = prompt, .n_prompt = n, .max_tokens = max_tokens};
    return p;
}

static void run_until_idle(dsi_sched *s, int max_steps) {
    int left = 1;
    for (int i = 0; i < max_steps && left > 0; i++) left = dsi_sched_step(s);
    assert_int_equal(left, 0);
}

static void assert_tokens(const result *r, const int32_t *ref, int n) {
    assert_int_equal(r->n, n);
    for (int i = 0; i < n; i++) assert_int_equal(r->tokens[i], ref[i]);
}

/* Three requests of different lengths share steps; a fourth joins while they
 * run; each equals its solo greedy reference. */
static void test_continuous_batching(void **state) {
    rig g;
    rig_open(&g, 64, 256, &(dsi_sched_opts){0});
    int lens[4] = {5, 40, 90, 17}, news[4] = {12, 20, 8, 10};
    int32_t prompts[4][128], refs[4][32];
    static result res[4];
    memset(res, 0, sizeof res);
    for (int k = 0; k < 4; k++) { prompt_of(prompts[k], lens[k], k + 1); reference(prompts[k], lens[k], news[k], refs[k]); }
    for (int k = 0; k < 3; k++) {
        dsi_request_params p = greedy(prompts[k], lens[k], news[k]);
        assert_int_equal(dsi_sched_submit(g.s, &p, on_event, &res[k], NULL), DSI_OK);
    }
    int max_running = 0;
    for (int step = 0; step < 200; step++) {
        if (step == 3) {
            dsi_request_params p = greedy(prompts[3], lens[3], news[3]);
            assert_int_equal(dsi_sched_submit(g.s, &p, on_event, &res[3], NULL), DSI_OK);
        }
        int left = dsi_sched_step(g.s);
        dsi_sched_stats st;
        dsi_sched_get_stats(g.s, &st);
        if (st.n_running > max_running) max_running = st.n_running;
        if (left == 0 && step > 3) break;
    }
    assert_int_equal(max_running, 4);
    for (int k = 0; k < 4; k++) {
        assert_true(atomic_load(&res[k].finished));
        assert_int_equal(res[k].fin.finish, DSI_FINISH_LENGTH);
        assert_int_equal(res[k].fin.prompt_tokens, lens[k]);
        assert_int_equal(res[k].fin.completion_tokens, news[k]);
        assert_tokens(&res[k], refs[k], news[k]);
    }
    dsi_sched_stats st;
    dsi_sched_get_stats(g.s, &st);
    assert_int_equal(st.kv_blocks_used, 0);
    rig_close(&g);
}

/* A 150-token prompt prefilled 48 tokens per step gives the same tokens as in
 * one step, and takes more steps. */
static void test_chunked_prefill_equals_unchunked(void **state) {
    int32_t prompt[150], ref[10];
    prompt_of(prompt, 150, 9);
    reference(prompt, 150, 10, ref);
    uint64_t steps[2];
    int budgets[2] = {256, 48};
    for (int v = 0; v < 2; v++) {
        rig g;
        rig_open(&g, 32, 256, &(dsi_sched_opts){.max_batched_tokens = budgets[v], .no_prefix_cache = 1});
        result r = {0};
        dsi_request_params p = greedy(prompt, 150, 10);
        assert_int_equal(dsi_sched_submit(g.s, &p, on_event, &r, NULL), DSI_OK);
        run_until_idle(g.s, 100);
        assert_tokens(&r, ref, 10);
        dsi_sched_stats st;
        dsi_sched_get_stats(g.s, &st);
        steps[v] = st.steps;
        rig_close(&g);
    }
    assert_int_equal((int)steps[0], 10);      /* 1 prefill + 9 decodes */
    assert_int_equal((int)steps[1], 4 + 9);  /* ceil(150/48) prefill chunks */
}

/* A short prompt admitted behind a long one is not held for the whole long
 * prefill: with a 64-token budget, the 400-token prompt would take 7 steps,
 * but the 5-token one gets its share in the first and its first token with
 * it. Both still equal their solo references. */
static void test_prefill_shares(void **state) {
    int32_t lp[400], sp[5], lref[6], sref[6];
    prompt_of(lp, 400, 21);
    prompt_of(sp, 5, 22);
    reference(lp, 400, 6, lref);
    reference(sp, 5, 6, sref);
    rig g;
    rig_open(&g, 32, 64, &(dsi_sched_opts){.max_batched_tokens = 64, .no_prefix_cache = 1});
    static result rl, rs;
    memset(&rl, 0, sizeof rl);
    memset(&rs, 0, sizeof rs);
    dsi_request_params pl = greedy(lp, 400, 6), ps = greedy(sp, 5, 6);
    assert_int_equal(dsi_sched_submit(g.s, &pl, on_event, &rl, NULL), DSI_OK);
    assert_int_equal(dsi_sched_submit(g.s, &ps, on_event, &rs, NULL), DSI_OK);
    dsi_sched_step(g.s);
    assert_int_equal(rs.n, 1); /* the short prompt's first token, in step 1 */
    assert_int_equal(rl.n, 0);
    dsi_sched_stats st;
    dsi_sched_get_stats(g.s, &st);
    assert_int_equal((int)st.computed_tokens, 64); /* and the long one took the rest of the budget */
    run_until_idle(g.s, 100);
    assert_tokens(&rl, lref, 6);
    assert_tokens(&rs, sref, 6);
    rig_close(&g);
}

/* A pool of 6 blocks holds two 130-token requests (3 blocks each); a third
 * waits in the queue until one finishes, and still completes correctly. */
static void test_admission_when_pool_full(void **state) {
    rig g;
    rig_open(&g, 6, 512, &(dsi_sched_opts){.no_prefix_cache = 1});
    int32_t prompts[3][130], refs[3][8];
    static result res[3];
    memset(res, 0, sizeof res);
    for (int k = 0; k < 3; k++) {
        prompt_of(prompts[k], 130, 20 + k);
        reference(prompts[k], 130, 8, refs[k]);
        dsi_request_params p = greedy(prompts[k], 130, 8);
        assert_int_equal(dsi_sched_submit(g.s, &p, on_event, &res[k], NULL), DSI_OK);
    }
    dsi_sched_step(g.s);
    dsi_sched_stats st;
    dsi_sched_get_stats(g.s, &st);
    assert_int_equal(st.n_running, 2);
    assert_int_equal(st.n_waiting, 1);
    assert_int_equal(st.kv_blocks_free, 0);
    run_until_idle(g.s, 100);
    for (int k = 0; k < 3; k++) assert_tokens(&res[k], refs[k], 8);
    dsi_sched_get_stats(g.s, &st);
    assert_int_equal(st.kv_blocks_free, 6);
    assert_int_equal((int)st.preemptions, 0);
    rig_close(&g);
}

/* Two requests that outgrow a 5-block pool during decode: the newer one is
 * preempted, recomputed later, and both finish with every token reported once. */
static void test_preemption(void **state) {
    rig g;
    rig_open(&g, 5, 512, &(dsi_sched_opts){0});
    int32_t prompts[2][120];
    static result res[2];
    memset(res, 0, sizeof res);
    for (int k = 0; k < 2; k++) {
        prompt_of(prompts[k], 120, 40 + k);
        dsi_request_params p = greedy(prompts[k], 120, 100);
        assert_int_equal(dsi_sched_submit(g.s, &p, on_event, &res[k], NULL), DSI_OK);
    }
    run_until_idle(g.s, 1000);
    dsi_sched_stats st;
    dsi_sched_get_stats(g.s, &st);
    assert_true(st.preemptions >= 1);
    for (int k = 0; k < 2; k++) {
        assert_int_equal(res[k].fin.finish, DSI_FINISH_LENGTH);
        assert_int_equal(res[k].n, 100);
        assert_int_equal(res[k].fin.completion_tokens, 100);
    }
    int32_t ref[100];
    reference(prompts[0], 120, 100, ref); /* the older request was never preempted */
    assert_tokens(&res[0], ref, 100);
    assert_int_equal(st.kv_blocks_used, 0);
    rig_close(&g);
}

/* Cancelling a running request frees its blocks at the next step boundary;
 * cancelling a queued one removes it. */
static void test_cancel_frees_blocks(void **state) {
    rig g;
    rig_open(&g, 8, 256, &(dsi_sched_opts){.max_num_seqs = 1});
    int32_t prompt[100];
    prompt_of(prompt, 100, 3);
    result a = {0}, b = {0};
    uint64_t ida, idb;
    dsi_request_params p = greedy(prompt, 100, 200);
    assert_int_equal(dsi_sched_submit(g.s, &p, on_event, &a, &ida), DSI_OK);
    assert_int_equal(dsi_sched_submit(g.s, &p, on_event, &b, &idb), DSI_OK);
    for (int i = 0; i < 5; i++) dsi_sched_step(g.s);
    dsi_sched_stats st;
    dsi_sched_get_stats(g.s, &st);
    assert_int_equal(st.n_running, 1);
    assert_int_equal(st.n_waiting, 1);
    assert_true(st.kv_blocks_used >= 2);
    dsi_sched_cancel(g.s, ida);
    dsi_sched_cancel(g.s, idb);
    dsi_sched_cancel(g.s, 12345); /* unknown: ignored */
    assert_int_equal(dsi_sched_step(g.s), 0);
    assert_int_equal(a.fin.finish, DSI_FINISH_CANCELLED);
    assert_int_equal(b.fin.finish, DSI_FINISH_CANCELLED);
    assert_int_equal(b.n, 0);
    dsi_sched_get_stats(g.s, &st);
    assert_int_equal(st.kv_blocks_used, 0);
    assert_int_equal(st.kv_blocks_free + st.kv_blocks_idle_cached, 8);
    rig_close(&g);
}

/* The same prompt again reuses its full blocks and gives the same tokens. */
static void test_prefix_cache_hit(void **state) {
    rig g;
    rig_open(&g, 32, 256, &(dsi_sched_opts){0});
    int32_t prompt[150], ref[6];
    prompt_of(prompt, 150, 77);
    reference(prompt, 150, 6, ref);
    for (int round = 0; round < 2; round++) {
        result r = {0};
        dsi_request_params p = greedy(prompt, 150, 6);
        assert_int_equal(dsi_sched_submit(g.s, &p, on_event, &r, NULL), DSI_OK);
        run_until_idle(g.s, 100);
        assert_int_equal(r.fin.cached_tokens, round ? 128 : 0);
        assert_tokens(&r, ref, 6);
    }
    /* a prompt of exactly two blocks can reuse only one: the last token must be computed */
    result r = {0};
    dsi_request_params p = greedy(prompt, 128, 2);
    assert_int_equal(dsi_sched_submit(g.s, &p, on_event, &r, NULL), DSI_OK);
    run_until_idle(g.s, 100);
    assert_int_equal(r.fin.cached_tokens, 64);
    rig_close(&g);
}

static void test_stop_ids_and_callback_stop(void **state) {
    rig g;
    rig_open(&g, 16, 256, &(dsi_sched_opts){0});
    int32_t prompt[20], ref[10];
    prompt_of(prompt, 20, 5);
    reference(prompt, 20, 10, ref);
    result r = {0};
    dsi_request_params p = greedy(prompt, 20, 10);
    p.stop_ids[p.n_stop_ids++] = ref[3];
    assert_int_equal(dsi_sched_submit(g.s, &p, on_event, &r, NULL), DSI_OK);
    run_until_idle(g.s, 100);
    int first = 0;
    while (ref[first] != ref[3]) first++; /* the stop id may occur earlier */
    assert_int_equal(r.fin.finish, DSI_FINISH_STOP);
    assert_int_equal(r.n, first);            /* the stop id is not reported */
    assert_int_equal(r.fin.completion_tokens, first + 1); /* but counted */
    result s = {.stop_after = 2};
    p = greedy(prompt, 20, 10);
    assert_int_equal(dsi_sched_submit(g.s, &p, on_event, &s, NULL), DSI_OK);
    run_until_idle(g.s, 100);
    assert_int_equal(s.fin.finish, DSI_FINISH_STOP);
    assert_int_equal(s.n, 2);
    rig_close(&g);
}

static void test_submit_validation(void **state) {
    rig g;
    rig_open(&g, 4, 256, &(dsi_sched_opts){.max_queue = 2});
    assert_int_equal(dsi_sched_max_model_len(g.s), 256);
    int32_t prompt[300];
    prompt_of(prompt, 300, 1);
    result r = {0};
    dsi_request_params p = greedy(prompt, 250, 7);
    assert_int_equal(dsi_sched_submit(g.s, &p, on_event, &r, NULL), DSI_EINVAL); /* beyond the context */
    p = greedy(prompt, 10, 0);
    assert_int_equal(dsi_sched_submit(g.s, &p, on_event, &r, NULL), DSI_EINVAL);
    p = greedy(prompt, 0, 5);
    assert_int_equal(dsi_sched_submit(g.s, &p, on_event, &r, NULL), DSI_EINVAL);
    int32_t bad[2] = {5, 99999};
    p = greedy(bad, 2, 5);
    assert_int_equal(dsi_sched_submit(g.s, &p, on_event, &r, NULL), DSI_EINVAL);
    p = greedy(prompt, 10, 5);
    p.top_logprobs = 21;
    assert_int_equal(dsi_sched_submit(g.s, &p, on_event, &r, NULL), DSI_EINVAL);
    static result q[3];
    memset(q, 0, sizeof q);
    p = greedy(prompt, 10, 2);
    assert_int_equal(dsi_sched_submit(g.s, &p, on_event, &q[0], NULL), DSI_OK);
    assert_int_equal(dsi_sched_submit(g.s, &p, on_event, &q[1], NULL), DSI_OK);
    assert_int_equal(dsi_sched_submit(g.s, &p, on_event, &q[2], NULL), DSI_EBUSY); /* queue full */
    run_until_idle(g.s, 100);
    rig_close(&g);
}

/* Logprobs: under greedy the chosen token heads the top list, the list is
 * sorted, and the values are log-probabilities. */
typedef struct lp_log {
    int n;
    int32_t tok[8], top0[8];
    float lp[8], top[8][5];
} lp_log;

static int on_lp(void *user, const dsi_sched_event *ev) {
    lp_log *l = user;
    if (ev->type != DSI_SCHED_TOKEN) return 0;
    assert_int_equal(ev->n_top, 5);
    l->tok[l->n] = ev->token;
    l->lp[l->n] = ev->logprob;
    l->top0[l->n] = ev->top_ids[0];
    memcpy(l->top[l->n], ev->top_logprobs, sizeof(float) * 5);
    l->n++;
    return 0;
}

static void test_logprobs(void **state) {
    rig g;
    rig_open(&g, 8, 256, &(dsi_sched_opts){0});
    int32_t prompt[8];
    prompt_of(prompt, 8, 2);
    lp_log l = {0};
    dsi_request_params p = greedy(prompt, 8, 6);
    p.logprobs = 1;
    p.top_logprobs = 5;
    assert_int_equal(dsi_sched_submit(g.s, &p, on_lp, &l, NULL), DSI_OK);
    run_until_idle(g.s, 100);
    assert_int_equal(l.n, 6);
    for (int i = 0; i < 6; i++) {
        assert_int_equal(l.tok[i], l.top0[i]);
        assert_true(l.lp[i] == l.top[i][0]);
        assert_true(l.lp[i] < 0 && l.lp[i] > -20);
        for (int k = 1; k < 5; k++) assert_true(l.top[i][k] <= l.top[i][k - 1]);
    }
    rig_close(&g);
}

/* The scheduler thread: requests submitted from this thread complete; stop
 * with drain waits for them. */
static void test_thread_and_drain(void **state) {
    rig g;
    rig_open(&g, 32, 256, &(dsi_sched_opts){0});
    assert_int_equal(dsi_sched_start(g.s), DSI_OK);
    int32_t prompt[30], ref[15];
    prompt_of(prompt, 30, 8);
    reference(prompt, 30, 15, ref);
    static result res[6];
    memset(res, 0, sizeof res);
    for (int k = 0; k < 6; k++) {
        dsi_request_params p = greedy(prompt, 30, 15);
        assert_int_equal(dsi_sched_submit(g.s, &p, on_event, &res[k], NULL), DSI_OK);
    }
    dsi_sched_stop(g.s, 1, 60.0);
    for (int k = 0; k < 6; k++) {
        assert_true(atomic_load(&res[k].finished));
        assert_int_equal(res[k].fin.finish, DSI_FINISH_LENGTH);
        assert_tokens(&res[k], ref, 15);
    }
    result late = {0};
    dsi_request_params p = greedy(prompt, 30, 15);
    assert_int_equal(dsi_sched_submit(g.s, &p, on_event, &late, NULL), DSI_ECANCELED);
    rig_close(&g);
}

static int setup(void **state) {
    dsi_config c;
    dsi_config_preset(DSI_PRESET_TINY, 0, 1, &c);
    return dsi_make_model_memory(&c, 20250227ull, &g_model);
}

static int teardown(void **state) {
    dsi_model_destroy(g_model);
    return 0;
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_continuous_batching),
        cmocka_unit_test(test_chunked_prefill_equals_unchunked),
        cmocka_unit_test(test_prefill_shares),
        cmocka_unit_test(test_admission_when_pool_full),
        cmocka_unit_test(test_preemption),
        cmocka_unit_test(test_cancel_frees_blocks),
        cmocka_unit_test(test_prefix_cache_hit),
        cmocka_unit_test(test_stop_ids_and_callback_stop),
        cmocka_unit_test(test_submit_validation),
        cmocka_unit_test(test_logprobs),
        cmocka_unit_test(test_thread_and_drain),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
