/* The planner: performance model sanity, determinism, calibration against
 * DeepSeek's published day (within 10%), what-if directions, SVG output. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <cjson/cJSON.h>

#include "dsinfer/sim.h"

/* A coarser but deterministic day: 256 requests per bundle, 2 decode steps per
 * event (~1 s instead of ~3 s for the default granularity). */
static void fast_config(dsi_sim_config *c) {
    dsi_sim_config_default(c);
    c->bundle = 256;
    c->decode_steps_per_event = 2;
}

static void test_perf_model(void **state) {
    dsi_sim_config c;
    dsi_sim_config_default(&c);
    dsi_perf_params p = c.perf;
    /* more work takes longer; overlap helps; H200's HBM helps decode */
    double t1 = dsi_perf_decode_step(&p, 144, 64, 4989, NULL), t2 = dsi_perf_decode_step(&p, 144, 128, 4989, NULL);
    assert_true(t2 > t1 && t1 > 0);
    p.overlap = 0;
    assert_true(dsi_perf_decode_step(&p, 144, 128, 4989, NULL) > t2);
    p = c.perf;
    dsi_sim_gpu_spec("h200", &p.gpu);
    assert_true(dsi_perf_decode_step(&p, 144, 128, 4989, NULL) < t2);
    assert_true(dsi_perf_decode_mem_reqs(&p, 144, 4989) > dsi_perf_decode_mem_reqs(&c.perf, 144, 4989));
    p = c.perf;
    double cap = dsi_perf_decode_capacity(&p, 144, 4989, 20);
    assert_true(cap > 10 && cap <= dsi_perf_decode_mem_reqs(&p, 144, 4989) + 1e-9);
    /* prefill: cache hits cost far less than misses */
    double miss = dsi_perf_prefill_step(&p, 32, 16384, 16384 * 2048.0, 0, NULL);
    double hit = dsi_perf_prefill_step(&p, 32, 1, 16384.0, 16384, NULL);
    assert_true(hit < miss / 5);
    /* MTP: more tokens per user per second at a small (latency-bound) batch */
    p = c.perf;
    double t_plain = dsi_perf_decode_step(&p, 144, 16, 4989, NULL);
    p.mtp = 1;
    double t_mtp = dsi_perf_decode_step(&p, 144, 16, 4989, NULL);
    assert_true(t_mtp > t_plain && (1 + p.mtp_accept) / t_mtp > 1.3 / t_plain);
    dsi_gpu_spec g;
    assert_int_equal(dsi_sim_gpu_spec("B200", &g), DSI_EINVAL);
}

static void test_calibration_within_10_percent(void **state) {
    dsi_sim_config c;
    fast_config(&c);
    dsi_sim_result *r;
    assert_int_equal(dsi_sim_run(&c, &r), DSI_OK);
    printf("in/node %.0f (73.7k) out/node %.0f (14.8k) avg nodes %.2f (226.75) peak %.0f (278)\n",
           r->prefill_in_tok_s_node, r->decode_out_tok_s_node, r->avg_nodes, r->peak_nodes);
    assert_true(fabs(r->prefill_in_tok_s_node / DSI_SIM_TARGET_IN_TOK_S - 1) < 0.10);
    assert_true(fabs(r->decode_out_tok_s_node / DSI_SIM_TARGET_OUT_TOK_S - 1) < 0.10);
    assert_true(fabs(r->avg_nodes / DSI_SIM_TARGET_AVG_NODES - 1) < 0.10);
    assert_true(fabs(r->peak_nodes / DSI_SIM_TARGET_PEAK_NODES - 1) < 0.15);
    /* the day's traffic is the published one */
    assert_true(fabs(r->input_tokens / 608e9 - 1) < 0.02);
    assert_true(fabs(r->hit_tokens / 342e9 - 1) < 0.03);
    assert_true(fabs(r->output_tokens / 168e9 - 1) < 0.02);
    assert_true(fabs(r->kv_per_output_token / 4989 - 1) < 0.05);
    /* cost follows node-hours at $2/GPU-hour */
    assert_true(fabs(r->cost_usd - r->avg_nodes * 8 * 2 * 24) < 1);
    assert_true(r->revenue_usd > 0.9 * 562100 && r->revenue_usd < 1.1 * 562100);
    /* deterministic */
    dsi_sim_result *r2;
    assert_int_equal(dsi_sim_run(&c, &r2), DSI_OK);
    assert_true(r2->avg_nodes == r->avg_nodes && r2->revenue_usd == r->revenue_usd && r2->events == r->events);
    /* charts */
    char a[128], b[128];
    snprintf(a, sizeof a, "/tmp/dsi_test_sim_%d_nodes.svg", (int)getpid());
    snprintf(b, sizeof b, "/tmp/dsi_test_sim_%d_money.svg", (int)getpid());
    assert_int_equal(dsi_sim_svg_nodes(r, &c, a, NULL), DSI_OK);
    assert_int_equal(dsi_sim_svg_money(r, &c, b, NULL), DSI_OK);
    FILE *f = fopen(a, "r");
    char buf[512];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    buf[n] = 0;
    fclose(f);
    assert_non_null(strstr(buf, "<svg"));
    unlink(a);
    unlink(b);
    assert_int_equal(dsi_sim_svg_nodes(r, &c, "/nonexistent/x.svg", NULL), DSI_EIO);
    dsi_sim_result_destroy(r);
    dsi_sim_result_destroy(r2);
}

static void test_whatif_directions(void **state) {
    dsi_sim_config base;
    fast_config(&base);
    base.bundle = 512; /* directions only: coarser still */
    base.decode_steps_per_event = 4;
    dsi_sim_result *b, *r;
    assert_int_equal(dsi_sim_run(&base, &b), DSI_OK);
    dsi_sim_config c = base;
    c.perf.overlap = 0;
    assert_int_equal(dsi_sim_run(&c, &r), DSI_OK);
    assert_true(r->avg_nodes > b->avg_nodes * 1.05);
    dsi_sim_result_destroy(r);
    c = base;
    c.disk_cache = 0;
    assert_int_equal(dsi_sim_run(&c, &r), DSI_OK);
    assert_true(r->avg_prefill_nodes > b->avg_prefill_nodes * 1.3);
    assert_true(r->hit_tokens == 0);
    dsi_sim_result_destroy(r);
    c = base;
    c.bundle = 0;
    assert_int_equal(dsi_sim_run(&c, &r), DSI_EINVAL);
    dsi_sim_result_destroy(b);
}

/* Issue 11: flat vs night discount vs load-based pricing with elastic demand. */
static void test_pricing_schemes(void **state) {
    FILE *f = popen(DSI_BINARY " sim pricing --bundle 512 --steps-per-event 4 --json", "r");
    assert_non_null(f);
    static char buf[16384];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    buf[n] = 0;
    assert_int_equal(pclose(f), 0);
    cJSON *o = cJSON_Parse(buf);
    assert_non_null(o);
    assert_true(cJSON_GetObjectItem(cJSON_GetObjectItem(o, "elasticities"), "batch")->valuedouble < 0);
    cJSON *sc = cJSON_GetObjectItem(o, "schemes");
    assert_int_equal(cJSON_GetArraySize(sc), 3);
#define F(i, k) cJSON_GetObjectItem(cJSON_GetArrayItem(sc, i), k)->valuedouble
    /* a 75% night discount earns less per day and pulls batch traffic into the night */
    assert_true(F(1, "revenue_usd") < F(0, "revenue_usd"));
    assert_true(F(1, "offpeak_share") > F(0, "offpeak_share") + 0.02);
    /* load-based prices charge the busy day more and the idle night less */
    assert_true(F(2, "revenue_usd") > F(0, "revenue_usd"));
    assert_true(F(2, "offpeak_share") > F(0, "offpeak_share"));
    assert_true(F(2, "peak_nodes") <= F(0, "peak_nodes"));
#undef F
    cJSON_Delete(o);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_perf_model),
        cmocka_unit_test(test_calibration_within_10_percent),
        cmocka_unit_test(test_whatif_directions),
        cmocka_unit_test(test_pricing_schemes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
