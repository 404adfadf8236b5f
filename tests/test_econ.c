/* Economics: calculator, pricing file errors, rule evaluation (windows across
 * midnight and zones, bands, hysteresis), admission-time billing, the live
 * account, its metrics and journal reports. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <cjson/cJSON.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "dsinfer/econ.h"

#define DEEPSEEK_FILE DSI_SOURCE_DIR "/docs/pricing.deepseek.json"
#define EXAMPLE_FILE DSI_SOURCE_DIR "/docs/pricing.example.json"

static double T(const char *iso) {
    double t;
    assert_int_equal(dsi_econ_parse_time(iso, &t), DSI_OK);
    return t;
}

static void test_calculator_exact(void **state) {
    dsi_econ_calc_in in;
    dsi_econ_calc_out out;
    dsi_econ_calc_deepseek(&in);
    assert_int_equal(dsi_econ_calc(&in, &out), DSI_OK);
    /* 226.75 x 8 x 2 x 24 */
    assert_true(fabs(out.cost_usd - 87072) < 0.005);
    /* 342B x 0.14 + 266B x 0.55 + 168B x 2.19 per million */
    assert_true(fabs(out.revenue_by_class[DSI_TOK_INPUT_HIT] - 47880) < 0.005);
    assert_true(fabs(out.revenue_by_class[DSI_TOK_INPUT_MISS] - 146300) < 0.005);
    assert_true(fabs(out.revenue_by_class[DSI_TOK_OUTPUT] - 367920) < 0.005);
    assert_true(fabs(out.revenue_usd - 562100) < 0.005);
    assert_true(out.margin > 5.455 && out.margin < 5.456); /* 545.6%; published 545% from $562,027 */
    in.hours = 0;
    assert_int_equal(dsi_econ_calc(&in, &out), DSI_EINVAL);
}

static void test_calc_cli_json(void **state) {
    FILE *f = popen(DSI_BINARY " sim calc --json", "r");
    assert_non_null(f);
    char buf[8192];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    buf[n] = 0;
    assert_int_equal(pclose(f), 0);
    cJSON *o = cJSON_Parse(buf);
    assert_non_null(o);
    assert_true(fabs(cJSON_GetObjectItem(o, "cost_usd")->valuedouble - 87072) < 0.5);
    assert_true(fabs(cJSON_GetObjectItem(o, "revenue_usd")->valuedouble - 562100) < 0.5);
    assert_true(fabs(cJSON_GetObjectItem(o, "margin")->valuedouble - 5.4556) < 0.0005);
    cJSON_Delete(o);
}

/* Each bad file must fail with a message naming the problem. */
static void expect_error(const char *json, int code, const char *needle) {
    dsi_pricing *p = (dsi_pricing *)0x1;
    int rc = dsi_pricing_parse(json, "t.json", &p);
    if (rc != code || !strstr(dsi_last_error(), needle))
        fail_msg("json %s: rc %d msg '%s' (want %d, '%s')", json, rc, dsi_last_error(), code, needle);
    assert_null(p);
}

#define M1 "\"models\":{\"m\":{\"input_cache_hit\":1,\"input_cache_miss\":2,\"output\":3}}"

static void test_pricing_file_errors(void **state) {
    expect_error("{", DSI_EFORMAT, "invalid JSON");
    expect_error("{}", DSI_EFORMAT, "missing 'models'");
    expect_error("{\"modles\":{}}", DSI_EFORMAT, "unknown key 'modles'");
    expect_error("{\"models\":{\"m\":{\"input_cache_hit\":-1,\"input_cache_miss\":2,\"output\":3}}}", DSI_EINVAL,
                 "models.m.input_cache_hit: -1 is out of range");
    expect_error("{\"models\":{\"m\":{\"input_cache_miss\":2,\"output\":3}}}", DSI_EFORMAT, "missing 'input_cache_hit'");
    expect_error("{\"models\":{\"m\":{\"input_cache_hit\":\"1\",\"input_cache_miss\":2,\"output\":3}}}", DSI_EFORMAT,
                 "expected a number");
    expect_error("{" M1 ",\"timezone\":\"Asia/Shanghai\"}", DSI_EINVAL, "bad time zone 'Asia/Shanghai'");
    expect_error("{" M1 ",\"windows\":[{\"start\":\"25:00\",\"end\":\"08:00\",\"multiplier\":0.5}]}", DSI_EINVAL,
                 "windows[0].start: '25:00' is not a time of day");
    expect_error("{" M1 ",\"windows\":[{\"start\":\"08:00\",\"end\":\"08:00\",\"multiplier\":0.5}]}", DSI_EINVAL,
                 "same time of day");
    expect_error("{" M1 ",\"windows\":[{\"start\":\"01:00\",\"end\":\"02:00\",\"timezone\":\"UTC+25\","
                 "\"multiplier\":0.5}]}",
                 DSI_EINVAL, "bad time zone");
    expect_error("{" M1 ",\"windows\":[{\"start\":\"01:00\",\"end\":\"02:00\",\"multiplier\":0}]}", DSI_EINVAL,
                 "multiplier: 0 must be in (0, 100]");
    expect_error("{" M1 ",\"windows\":[{\"start\":\"01:00\",\"end\":\"02:00\",\"multiplier\":{\"x\":0.5}}]}",
                 DSI_EINVAL, "unknown model 'x'");
    /* 22:00-02:00 UTC+8 and 17:30-18:30 UTC (= 01:30-02:30 UTC+8) overlap across midnight */
    expect_error("{" M1 ",\"windows\":[{\"name\":\"a\",\"start\":\"22:00\",\"end\":\"02:00\",\"timezone\":\"UTC+8\","
                 "\"multiplier\":0.5},{\"name\":\"b\",\"start\":\"17:30\",\"end\":\"18:30\",\"timezone\":\"UTC\","
                 "\"multiplier\":0.9}]}",
                 DSI_EINVAL, "'a' and windows[1] 'b' overlap for model 'm'");
    expect_error("{" M1 ",\"load_bands\":[{\"min\":0.8,\"max\":0.5,\"multiplier\":1.2}]}", DSI_EINVAL,
                 "min 0.8 must be below max 0.5");
    expect_error("{" M1 ",\"load_bands\":[{\"max\":0.5,\"multiplier\":0.7},{\"min\":0.4,\"multiplier\":1.2}]}",
                 DSI_EINVAL, "overlap");
    expect_error("{" M1 ",\"load_bands\":[{\"multiplier\":0.7}]}", DSI_EFORMAT, "needs 'min' and/or 'max'");
    expect_error("{" M1 ",\"paying_share\":1.5}", DSI_EINVAL, "paying_share: 1.5 is out of range");
    expect_error("{" M1 ",\"gpu\":{\"cost_per_hour\":2,\"per_nodes\":8}}", DSI_EFORMAT, "gpu: unknown key 'per_nodes'");
    /* a key written twice is refused, not billed at whichever copy a lookup finds first */
    expect_error("{\"models\":{\"m\":{\"input_cache_hit\":1,\"input_cache_miss\":2,\"output\":3,\"output\":300}}}",
                 DSI_EFORMAT, "models.m: duplicate key 'output'");
    expect_error("{" M1 "," M1 "}", DSI_EFORMAT, "(top level): duplicate key 'models'");
    expect_error("{" M1 ",\"gpu\":{\"cost_per_hour\":2,\"cost_per_hour\":20}}", DSI_EFORMAT,
                 "gpu: duplicate key 'cost_per_hour'");
    expect_error("{\"models\":{\"m\":{\"aliases\":[\"a\"],\"input_cache_hit\":1,\"input_cache_miss\":2,\"output\":3}},"
                 "\"windows\":[{\"start\":\"01:00\",\"end\":\"02:00\",\"multiplier\":{\"m\":0.5,\"a\":0.9}}]}",
                 DSI_EINVAL, "windows[0].multiplier: model 'm' given twice");
    dsi_pricing *p = NULL;
    assert_int_equal(dsi_pricing_load("/nonexistent/pricing.json", &p), DSI_EIO);
    assert_non_null(strstr(dsi_last_error(), "/nonexistent/pricing.json"));
    /* the shipped files are valid */
    assert_int_equal(dsi_pricing_load(DEEPSEEK_FILE, &p), DSI_OK);
    dsi_pricing_destroy(p);
    assert_int_equal(dsi_pricing_load(EXAMPLE_FILE, &p), DSI_OK);
    dsi_pricing_destroy(p);
    dsi_pricing_destroy(NULL);
}

static void test_night_window_across_zones(void **state) {
    dsi_pricing *p;
    assert_int_equal(dsi_pricing_load(DEEPSEEK_FILE, &p), DSI_OK);
    assert_int_equal(dsi_pricing_find_model(p, "deepseek-reasoner"), dsi_pricing_find_model(p, "deepseek-r1"));
    dsi_price_quote q;
    /* 00:29 UTC+8 = 16:29 UTC the day before: full price */
    assert_int_equal(dsi_pricing_current(p, "deepseek-r1", T("2025-02-27T16:29:59Z"), -1, &q), DSI_OK);
    assert_int_equal(q.window, -1);
    assert_true(fabs(q.usd_per_mtok[DSI_TOK_OUTPUT] - 2.19) < 1e-12);
    /* the next change is the window's start, 00:30 UTC+8 */
    assert_true(fabs(q.next_change - T("2025-02-28T00:30:00+08:00")) < 1e-6);
    assert_true(fabs(q.next_usd_per_mtok[DSI_TOK_OUTPUT] - 2.19 * 0.25) < 1e-12);
    /* 00:30 UTC+8: R1 75% off, V3 50% off */
    assert_int_equal(dsi_pricing_current(p, "deepseek-r1", T("2025-02-28T00:30:00+08:00"), -1, &q), DSI_OK);
    assert_string_equal(q.window_name, "night");
    assert_true(fabs(q.usd_per_mtok[DSI_TOK_INPUT_HIT] - 0.035) < 1e-12);
    assert_true(fabs(q.usd_per_mtok[DSI_TOK_INPUT_MISS] - 0.1375) < 1e-12);
    assert_true(fabs(q.effective_from - T("2025-02-27T16:30:00Z")) < 1e-6);
    char js[512];
    assert_true(dsi_price_quote_write_json(&q, js, sizeof js) > 0);
    assert_string_equal(js, "{\"model\":\"deepseek-r1\",\"unit\":\"per 1M tokens\",\"prices\":{\"input_cache_hit\":0.035,"
                            "\"input_cache_miss\":0.1375,\"output\":0.5475},\"multiplier\":0.25,\"window\":\"night\","
                            "\"band\":null,\"quoted_at\":\"2025-02-27T16:30:00Z\"}");
    assert_true(fabs(q.next_change - T("2025-02-28T08:30:00+08:00")) < 1e-6);
    assert_int_equal(dsi_pricing_current(p, "deepseek-chat", T("2025-02-28T08:29:59+08:00"), -1, &q), DSI_OK);
    assert_true(fabs(q.usd_per_mtok[DSI_TOK_OUTPUT] - 0.55) < 1e-12);
    assert_int_equal(dsi_pricing_current(p, "deepseek-v3", T("2025-02-28T08:30:00+08:00"), -1, &q), DSI_OK);
    assert_int_equal(q.window, -1);
    assert_true(fabs(q.usd_per_mtok[DSI_TOK_OUTPUT] - 1.10) < 1e-12);
    assert_int_equal(dsi_pricing_current(p, "gpt-4", 0, -1, &q), DSI_ENOTFOUND);
    dsi_pricing_destroy(p);

    /* A window across local midnight in a negative zone: 22:00-02:00 UTC-05:00 = 03:00-07:00 UTC. */
    assert_int_equal(dsi_pricing_parse("{" M1 ",\"windows\":[{\"name\":\"late\",\"start\":\"22:00\",\"end\":\"02:00\","
                                       "\"timezone\":\"UTC-05:00\",\"multiplier\":0.5}]}",
                                       "t", &p),
                     DSI_OK);
    struct {
        const char *t;
        int in;
    } cases[] = {{"2025-03-01T02:59:59Z", 0}, {"2025-03-01T03:00:00Z", 1}, {"2025-02-28T23:30:00-05:00", 1},
                 {"2025-03-01T01:59:00-05:00", 1}, {"2025-03-01T07:00:00Z", 0}, {"2025-03-01T12:00:00Z", 0}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        assert_int_equal(dsi_pricing_current(p, "m", T(cases[i].t), -1, &q), DSI_OK);
        if ((q.window == 0) != cases[i].in) fail_msg("%s: window %d", cases[i].t, q.window);
        assert_true(fabs(q.usd_per_mtok[0] - (cases[i].in ? 0.5 : 1.0)) < 1e-12);
    }
    dsi_pricing_destroy(p);
}

static void test_bands_and_hysteresis(void **state) {
    dsi_pricing *p;
    assert_int_equal(dsi_pricing_load(EXAMPLE_FILE, &p), DSI_OK); /* low <0.5 x0.7, peak >=0.8 x1.2, h 0.05, hold 300 s */
    const char *m = "deepseek-v3";
    double t0 = T("2025-03-03T04:00:00Z"); /* 12:00 UTC+8: no time window */
    dsi_price_quote q;
    assert_int_equal(dsi_pricing_current(p, m, t0, 0.6, &q), DSI_OK);
    assert_int_equal(q.band, -1);
    assert_true(fabs(q.multiplier - 1) < 1e-12);
    assert_int_equal(dsi_pricing_current(p, m, t0 + 10, 0.3, &q), DSI_OK); /* enter low-load */
    assert_string_equal(q.band_name, "low-load");
    assert_true(fabs(q.usd_per_mtok[DSI_TOK_OUTPUT] - 1.10 * 0.7) < 1e-12);
    assert_true(fabs(q.effective_from - (t0 + 10)) < 1e-9);
    /* 0.52 is inside the hysteresis margin: stays low even after min_hold */
    assert_int_equal(dsi_pricing_current(p, m, t0 + 1000, 0.52, &q), DSI_OK);
    assert_string_equal(q.band_name, "low-load");
    /* 0.9 would mean peak, but min_hold_s (300) since the last change has not passed */
    assert_int_equal(dsi_pricing_current(p, m, t0 + 200, 0.9, &q), DSI_OK);
    assert_string_equal(q.band_name, "low-load");
    /* past the hold: jumps straight to peak */
    assert_int_equal(dsi_pricing_current(p, m, t0 + 1100, 0.9, &q), DSI_OK);
    assert_string_equal(q.band_name, "peak");
    assert_true(fabs(q.multiplier - 1.2) < 1e-12);
    /* 0.77 is within 0.05 of the 0.8 edge: still peak; 0.74 leaves (after the hold) */
    assert_int_equal(dsi_pricing_current(p, m, t0 + 1500, 0.77, &q), DSI_OK);
    assert_string_equal(q.band_name, "peak");
    assert_int_equal(dsi_pricing_current(p, m, t0 + 1500, 0.74, &q), DSI_OK);
    assert_int_equal(q.band, -1);
    assert_true(fabs(q.effective_from - (t0 + 1500)) < 1e-9);
    /* unknown utilisation keeps the state; a late caller cannot move it back */
    assert_int_equal(dsi_pricing_current(p, m, t0 + 2000, -1, &q), DSI_OK);
    assert_int_equal(q.band, -1);
    assert_int_equal(dsi_pricing_current(p, m, t0 + 100, 0.1, &q), DSI_OK);
    assert_int_equal(q.band, -1);
    /* flapping input around an edge gives no flapping price */
    int changes = 0, last = -1;
    for (int i = 0; i < 200; i++) {
        double u = (i % 2) ? 0.49 : 0.51;
        assert_int_equal(dsi_pricing_current(p, m, t0 + 3000 + i * 5, u, &q), DSI_OK);
        if (q.band != last) changes++, last = q.band;
    }
    assert_true(changes <= 2);
    /* a time window and a band multiply: night (x0.5 for V3) in the low band (x0.7) */
    dsi_pricing_reset_state(p);
    assert_int_equal(dsi_pricing_current(p, m, T("2025-03-04T03:00:00+08:00"), 0.2, &q), DSI_OK);
    assert_true(fabs(q.multiplier - 0.35) < 1e-12);
    assert_true(fabs(q.usd_per_mtok[DSI_TOK_INPUT_MISS] - 0.27 * 0.35) < 1e-12);
    /* GET /v1/pricing body */
    char buf[4096];
    int n = dsi_pricing_write_json(p, T("2025-03-04T03:00:00+08:00"), 0.2, buf, sizeof buf);
    assert_true(n > 0);
    cJSON *o = cJSON_Parse(buf);
    assert_non_null(o);
    cJSON *models = cJSON_GetObjectItem(o, "models");
    assert_int_equal(cJSON_GetArraySize(models), 2);
    cJSON *r1 = cJSON_GetArrayItem(models, 0);
    assert_string_equal(cJSON_GetObjectItem(r1, "model")->valuestring, "deepseek-r1");
    assert_true(fabs(cJSON_GetObjectItem(cJSON_GetObjectItem(r1, "prices"), "output")->valuedouble -
                     2.19 * 0.25 * 0.7) < 1e-9);
    assert_string_equal(cJSON_GetObjectItem(cJSON_GetObjectItem(r1, "next_change"), "at")->valuestring,
                        "2025-03-04T00:30:00Z");
    cJSON_Delete(o);
    assert_int_equal(dsi_pricing_write_json(p, 0, 0.2, buf, 20), DSI_ERANGE);
    dsi_pricing_destroy(p);
}

static char *tmp_path(const char *name) {
    static char buf[256];
    snprintf(buf, sizeof buf, "/tmp/dsi_test_econ_%d_%s", (int)getpid(), name);
    unlink(buf);
    return buf;
}

static void test_admission_time_billing_and_report(void **state) {
    dsi_pricing *p;
    assert_int_equal(dsi_pricing_load(DEEPSEEK_FILE, &p), DSI_OK);
    char journal[256];
    snprintf(journal, sizeof journal, "%s", tmp_path("journal.jsonl"));
    dsi_account *a;
    assert_int_equal(dsi_account_create(p, journal, &a), DSI_OK);
    double t0 = T("2025-02-28T08:00:00+08:00");
    assert_int_equal(dsi_account_set_gpus(a, t0, 8), DSI_OK);
    /* admitted at 08:29 in the night window, finished at 08:40 after it ended: night price */
    dsi_price_quote q;
    assert_int_equal(dsi_pricing_current(p, "deepseek-r1", t0 + 29 * 60, -1, &q), DSI_OK);
    double usd;
    assert_int_equal(dsi_account_bill(a, &q, t0 + 40 * 60, 1000000, 1000000, 1000000, 1, &usd), DSI_OK);
    assert_true(fabs(usd - (0.14 + 0.55 + 2.19) * 0.25) < 1e-12);
    /* admitted at 08:30: full price */
    assert_int_equal(dsi_pricing_current(p, "deepseek-r1", t0 + 30 * 60, -1, &q), DSI_OK);
    assert_int_equal(dsi_account_bill(a, &q, t0 + 50 * 60, 1000000, 1000000, 1000000, 1, &usd), DSI_OK);
    assert_true(fabs(usd - 2.88) < 1e-12);
    /* a free-tier request counts tokens, earns nothing */
    assert_int_equal(dsi_account_bill(a, &q, t0 + 55 * 60, 10, 20, 30, 0, &usd), DSI_OK);
    assert_true(usd == 0);
    assert_int_equal(dsi_account_set_gpus(a, t0 + 3600, 16), DSI_OK);
    dsi_account_totals tot;
    assert_int_equal(dsi_account_totals_get(a, t0 + 7200, &tot), DSI_OK);
    assert_true(fabs(tot.gpu_hours - 24) < 1e-9); /* 8 x 1 h + 16 x 1 h */
    assert_true(fabs(tot.gpu_cost_usd - 48) < 1e-9);
    assert_true(fabs(tot.revenue_total_usd - 2.88 * 1.25) < 1e-12);
    assert_true(tot.tokens[DSI_TOK_OUTPUT] == 2000030 && tot.paid_tokens[DSI_TOK_OUTPUT] == 2000000);
    assert_int_equal(tot.gpus, 16);
    char buf[8192];
    int n = dsi_account_write_metrics(a, t0 + 7200, buf, sizeof buf);
    assert_true(n > 0);
    assert_non_null(strstr(buf, "# TYPE dsinfer_revenue_usd_total counter\n"));
    assert_non_null(strstr(buf, "dsinfer_tokens_total{model=\"deepseek-r1\",class=\"output\"} 2000030\n"));
    assert_non_null(strstr(buf, "dsinfer_gpus 16\n"));
    assert_non_null(strstr(buf, "dsinfer_gpu_cost_usd_total 48.000000\n"));
    /* every sample line is "name{labels} value" or "name value" */
    for (char *line = strtok(buf, "\n"); line; line = strtok(NULL, "\n")) {
        if (line[0] == '#') continue;
        char *sp = strrchr(line, ' ');
        assert_non_null(sp);
        char *end;
        strtod(sp + 1, &end);
        assert_true(*end == '\0');
    }
    assert_int_equal(dsi_account_write_metrics(a, t0, buf, 16), DSI_ERANGE);
    assert_int_equal(dsi_account_checkpoint(a, t0 + 7200), DSI_OK);
    dsi_account_destroy(a);

    dsi_econ_report r;
    assert_int_equal(dsi_econ_report_journal(journal, -INFINITY, INFINITY, &r), DSI_OK);
    assert_true(fabs(r.revenue_usd - 3.6) < 1e-9);
    assert_true(fabs(r.cost_usd - 48) < 1e-6);
    assert_true(fabs(r.margin - (3.6 - 48) / 48) < 1e-9);
    assert_true(r.requests == 3 && r.bad_lines == 0);
    /* the second hour only: 16 GPUs x 1 h, no bills */
    assert_int_equal(dsi_econ_report_journal(journal, t0 + 3600, t0 + 7200, &r), DSI_OK);
    assert_true(fabs(r.cost_usd - 32) < 1e-6 && r.revenue_usd == 0);
    /* the first 45 minutes: 8 GPUs x 0.75 h; the night-priced bill */
    assert_int_equal(dsi_econ_report_journal(journal, t0, t0 + 45 * 60, &r), DSI_OK);
    assert_true(fabs(r.cost_usd - 12) < 1e-6 && fabs(r.revenue_usd - 0.72) < 1e-9);
    /* a torn or foreign line is skipped and counted, not fatal */
    FILE *f = fopen(journal, "a");
    fputs("{\"ev\":\"bill\",\"t\":1,\"tok\n", f);
    fputs("{\"ev\":\"bill\",\"t\":2,\"tokens\":[1e300,0,0],\"usd\":1}\n", f);
    /* two records glued on one line are one bad line, not the first of them counted */
    fputs("{\"ev\":\"bill\",\"t\":3,\"tokens\":[1,0,0],\"usd\":1}{\"ev\":\"bill\",\"t\":4,\"tokens\":[1,0,0],\"usd\":1}\n", f);
    /* a corrupt time would stretch the GPU count to infinite cost */
    fputs("{\"ev\":\"tick\",\"t\":1e308,\"gpus\":8,\"usd_per_gpu_hour\":2}\n", f);
    fclose(f);
    assert_int_equal(dsi_econ_report_journal(journal, -INFINITY, INFINITY, &r), DSI_OK);
    if (r.bad_lines != 4 || r.requests != 3 || fabs(r.cost_usd - 48) > 1e-6 || fabs(r.revenue_usd - 3.6) > 1e-9)
        fail_msg("bad lines %llu (want 4), requests %llu (want 3), cost %g (want 48), revenue %g (want 3.6)",
                 (unsigned long long)r.bad_lines, (unsigned long long)r.requests, r.cost_usd, r.revenue_usd);
    assert_int_equal(dsi_econ_report_journal("/nonexistent/j", -INFINITY, INFINITY, &r), DSI_EIO);
    assert_int_equal(dsi_econ_report_journal(journal, 10, 5, &r), DSI_EINVAL);

    /* the CLI agrees */
    char cmd[512];
    snprintf(cmd, sizeof cmd, DSI_BINARY " report --journal %s --to 2025-02-28T08:45:00+08:00 --json", journal);
    FILE *pf = popen(cmd, "r");
    n = fread(buf, 1, sizeof buf - 1, pf);
    buf[n] = 0;
    assert_int_equal(pclose(pf), 0);
    cJSON *o = cJSON_Parse(buf);
    assert_non_null(o);
    assert_true(fabs(cJSON_GetObjectItem(o, "cost_usd")->valuedouble - 12) < 1e-6);
    cJSON_Delete(o);
    unlink(journal);
    dsi_pricing_destroy(p);
}

/* The journal survives what a server meets: a disk that fills and frees again
 * (RLIMIT_FSIZE stands in: writes past it fail with EFBIG, the first one
 * short), a model name that needs escaping, a file left ending mid-line, and
 * paths that are not files. */
static void test_journal_hostile(void **state) {
    dsi_pricing *p;
    assert_int_equal(dsi_pricing_parse("{\"models\":{\"a\\\"b\\\\c\\nd\":{\"input_cache_hit\":1,\"input_cache_miss\":2,"
                                       "\"output\":3}},\"gpu\":{\"cost_per_hour\":2}}",
                                       "t.json", &p),
                     DSI_OK);
    char journal[256];
    snprintf(journal, sizeof journal, "%s", tmp_path("hostile.jsonl"));
    /* a previous run left a torn last line: it stays one bad line, our first record is kept */
    FILE *f = fopen(journal, "w");
    fputs("{\"ev\":\"bill\",\"t\":1", f);
    fclose(f);
    dsi_account *a;
    assert_int_equal(dsi_account_create(p, journal, &a), DSI_OK);
    assert_int_equal(dsi_account_set_gpus(a, 1000, 8), DSI_OK);
    dsi_price_quote q;
    assert_int_equal(dsi_pricing_eval(p, 0, 1000, -1, &q), DSI_OK);
    /* "disk full" a few bytes into the next record */
    struct rlimit old, lim;
    getrlimit(RLIMIT_FSIZE, &old);
    lim = old;
    struct stat st;
    assert_int_equal(stat(journal, &st), 0);
    lim.rlim_cur = (rlim_t)st.st_size + 10;
    signal(SIGXFSZ, SIG_IGN);
    assert_int_equal(setrlimit(RLIMIT_FSIZE, &lim), 0);
    for (int i = 0; i < 10; i++) assert_int_equal(dsi_account_bill(a, &q, 1001 + i, 1, 2, 3, 1, NULL), DSI_OK);
    assert_int_equal(setrlimit(RLIMIT_FSIZE, &old), 0);
    signal(SIGXFSZ, SIG_DFL);
    assert_int_equal(dsi_account_bill(a, &q, 2000, 1, 2, 3, 1, NULL), DSI_OK); /* room again */
    assert_int_equal(dsi_account_checkpoint(a, 4600), DSI_OK);
    dsi_account_destroy(a);
    dsi_econ_report r;
    assert_int_equal(dsi_econ_report_journal(journal, -INFINITY, INFINITY, &r), DSI_OK);
    if (r.requests != 11 || r.bad_lines != 1 || fabs(r.gpu_hours - 8) > 1e-9)
        fail_msg("requests %llu (want 11), bad lines %llu (want 1), GPU hours %g (want 8)",
                 (unsigned long long)r.requests, (unsigned long long)r.bad_lines, r.gpu_hours);
    assert_true(fabs(r.revenue_usd - 11 * 14e-6) < 1e-12);
    unlink(journal);
    /* not regular files: refused at once (a FIFO with no reader used to block forever) */
    assert_int_equal(dsi_account_create(p, "/dev/null", &a), DSI_EIO);
    assert_non_null(strstr(dsi_last_error(), "/dev/null: cannot use as a journal: not a regular file"));
    assert_null(a);
    char fifo[256];
    snprintf(fifo, sizeof fifo, "%s", tmp_path("fifo"));
    assert_int_equal(mkfifo(fifo, 0600), 0);
    assert_int_equal(dsi_account_create(p, fifo, &a), DSI_EIO);
    assert_non_null(strstr(dsi_last_error(), "not a regular file"));
    unlink(fifo);
    dsi_pricing_destroy(p);
}

typedef struct {
    dsi_account *a;
    dsi_price_quote q;
} bill_ctx;

static void *biller(void *arg) {
    bill_ctx *c = arg;
    for (int i = 0; i < 10000; i++) dsi_account_bill(c->a, &c->q, 1000 + i, 1, 2, 3, 1, NULL);
    return NULL;
}

static void test_account_threads(void **state) {
    dsi_pricing *p;
    assert_int_equal(dsi_pricing_load(DEEPSEEK_FILE, &p), DSI_OK);
    bill_ctx c;
    assert_int_equal(dsi_account_create(p, NULL, &c.a), DSI_OK);
    assert_int_equal(dsi_pricing_current(p, "deepseek-v3", T("2025-03-03T12:00:00+08:00"), -1, &c.q), DSI_OK);
    pthread_t th[4];
    for (int i = 0; i < 4; i++) pthread_create(&th[i], NULL, biller, &c);
    for (int i = 0; i < 4; i++) pthread_join(th[i], NULL);
    dsi_account_totals t;
    dsi_account_totals_get(c.a, 0, &t);
    assert_true(t.requests == 40000 && t.tokens[DSI_TOK_OUTPUT] == 120000);
    assert_true(fabs(t.revenue_total_usd - 40000 * (0.07 + 2 * 0.27 + 3 * 1.10) / 1e6) < 1e-9);
    /* a quote from another pricing file is refused */
    dsi_price_quote bad = c.q;
    snprintf(bad.model_name, sizeof bad.model_name, "other");
    assert_int_equal(dsi_account_bill(c.a, &bad, 0, 1, 1, 1, 1, NULL), DSI_EINVAL);
    dsi_account_destroy(c.a);
    dsi_account_destroy(NULL);
    dsi_pricing_destroy(p);
}

static void test_time_parsing(void **state) {
    assert_true(T("2025-02-27T12:00:00+08:00") == 1740628800.0);
    assert_true(T("2025-02-27T04:00:00Z") == 1740628800.0);
    assert_true(T("2025-02-27 04:00") == 1740628800.0);
    assert_true(T("1740628800") == 1740628800.0);
    double t;
    assert_int_equal(dsi_econ_parse_time("yesterday", &t), DSI_EINVAL);
    assert_int_equal(dsi_econ_parse_time("2025-13-01", &t), DSI_EINVAL);
    int off;
    assert_int_equal(dsi_econ_parse_tz("UTC+8", &off), DSI_OK);
    assert_int_equal(off, 480);
    assert_int_equal(dsi_econ_parse_tz("UTC-05:30", &off), DSI_OK);
    assert_int_equal(off, -330);
    assert_int_equal(dsi_econ_parse_tz("Europe/Paris", &off), DSI_EINVAL);
    char buf[40];
    dsi_econ_format_time(1740628800.0, buf, sizeof buf);
    assert_string_equal(buf, "2025-02-27T04:00:00Z");
    dsi_econ_format_time(1e300, buf, sizeof buf); /* no calendar date: a number, not garbage */
    assert_string_equal(buf, "1e+300");
}

/* Mutated pricing files never crash the parser: each parse returns a status. */
static void test_pricing_parser_mutations(void **state) {
    FILE *f = fopen(EXAMPLE_FILE, "rb");
    assert_non_null(f);
    static char orig[8192], buf[8192];
    size_t n = fread(orig, 1, sizeof orig - 1, f);
    fclose(f);
    orig[n] = 0;
    uint64_t x = 42;
    int ok = 0;
    const char alphabet[] = "{}[]\":,-.0123456789eE \\aZ";
    for (int it = 0; it < 3000; it++) {
        memcpy(buf, orig, n + 1);
        int edits = 1 + it % 4;
        for (int e = 0; e < edits; e++) {
            x = x * 6364136223846793005ull + 1442695040888963407ull;
            size_t pos = (x >> 33) % n;
            buf[pos] = alphabet[(x >> 20) % (sizeof alphabet - 1)];
        }
        dsi_pricing *p = NULL;
        int rc = dsi_pricing_parse(buf, "fuzz", &p);
        if (rc == DSI_OK) {
            ok++;
            dsi_price_quote q;
            dsi_pricing_current(p, dsi_pricing_model_name(p, 0), 1740628800.0, 0.9, &q);
            char out[4096];
            dsi_pricing_write_json(p, 1740628800.0, 0.3, out, sizeof out);
            dsi_pricing_destroy(p);
        } else {
            assert_null(p);
            assert_true(strlen(dsi_last_error()) > 0);
        }
    }
    assert_true(ok < 3000); /* most mutations must be rejected */
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_calculator_exact),
        cmocka_unit_test(test_calc_cli_json),
        cmocka_unit_test(test_pricing_file_errors),
        cmocka_unit_test(test_night_window_across_zones),
        cmocka_unit_test(test_bands_and_hysteresis),
        cmocka_unit_test(test_admission_time_billing_and_report),
        cmocka_unit_test(test_journal_hostile),
        cmocka_unit_test(test_account_threads),
        cmocka_unit_test(test_time_parsing),
        cmocka_unit_test(test_pricing_parser_mutations),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
