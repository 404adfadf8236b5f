/* dsinfer sim pricing: DeepSeek's day under flat, night-discount and
 * load-based prices, with demand that responds to price.
 *
 * Demand model (stated, per traffic class):
 *   interactive (share 1 - batch_share): rate(t) = base(t) * m(t)^e_i; volume
 *     changes with price, nothing moves in time;
 *   batch (batch_share): the day's volume is kept and re-spread in time
 *     proportionally to base(t) * m(t)^e_b: cheap hours attract it.
 * m(t) is the price multiplier in force at t relative to flat. Load-based
 * prices depend on utilisation (nodes in use / the flat day's peak fleet),
 * which depends on demand: we iterate simulate -> utilisation -> price path
 * -> demand a few times (utilisation damped 50/50). Every run bills each
 * request at the price in force at its admission (the engine, live). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "cli/sim_cli.h"

static const char *LOAD_PRICING =
    "{\"currency\":\"USD\",\"gpu\":{\"cost_per_hour\":2.0,\"per_node\":8},"
    "\"models\":{\"deepseek-r1\":{\"input_cache_hit\":0.14,\"input_cache_miss\":0.55,\"output\":2.19}},"
    "\"load_bands\":[{\"name\":\"low-load\",\"max\":0.5,\"multiplier\":0.7},"
    "{\"name\":\"peak\",\"min\":0.8,\"multiplier\":1.2}],\"hysteresis\":0.05,\"min_hold_s\":600}";

typedef struct demand_ctx {
    double day0;
    double m[DSI_SIM_MINUTES];  /* price multiplier per minute of the day */
    double e[2];                /* elasticities: interactive, batch */
    double batch_norm;          /* keeps the batch class's daily volume */
} demand_ctx;

static double demand_fn(void *vctx, int cls, double t) {
    demand_ctx *d = vctx;
    double x = fmod(t - d->day0, 86400.0);
    if (x < 0) x += 86400;
    int m = (int)(x / 60);
    double f = pow(d->m[m], d->e[cls]);
    return cls == 1 ? f * d->batch_norm : f;
}

/* Price path for a day from the engine given a utilisation path. */
static void price_path(dsi_pricing *p, int model, double day0, const double *util, double *m) {
    dsi_pricing_reset_state(p);
    for (int i = 0; i < DSI_SIM_MINUTES; i++) {
        dsi_price_quote q;
        if (dsi_pricing_current(p, dsi_pricing_model_name(p, model), day0 + i * 60.0 + 30, util ? util[i] : -1, &q))
            m[i] = 1;
        else m[i] = q.multiplier;
    }
    dsi_pricing_reset_state(p);
}

static void normalise_batch(demand_ctx *d, const dsi_sim_config *c) {
    double base = 0, shifted = 0;
    for (int i = 0; i < DSI_SIM_MINUTES; i++) {
        double s = dsi_sim_rate_shape(c, c->day_start + i * 60.0 + 30);
        base += s;
        shifted += s * pow(d->m[i], d->e[1]);
    }
    d->batch_norm = shifted > 0 ? base / shifted : 1;
}

static int run_scheme(dsi_sim_config base, dsi_pricing *p, int model, int iterate, const double *flat_util,
                      double fleet, demand_ctx *d, dsi_sim_result **out) {
    double util[DSI_SIM_MINUTES];
    memcpy(util, flat_util, sizeof util);
    dsi_sim_result *r = NULL;
    int iters = iterate ? 3 : 1;
    for (int k = 0; k < iters; k++) {
        price_path(p, model, base.day_start, util, d->m);
        normalise_batch(d, &base);
        dsi_sim_config c = base;
        c.pricing = p;
        c.pricing_model = model;
        c.fleet_nodes = fleet;
        c.demand = demand_fn;
        c.demand_ctx = d;
        dsi_pricing_reset_state(p);
        dsi_sim_result_destroy(r);
        r = NULL;
        if (dsi_sim_run(&c, &r)) return 1;
        for (int i = 0; i < DSI_SIM_MINUTES; i++) util[i] = 0.5 * util[i] + 0.5 * r->utilisation[i];
    }
    *out = r;
    return 0;
}

int dsi__sim_cmd_pricing(int argc, char **argv) {
    dsi_sim_config c;
    dsi_sim_config_default(&c);
    c.bundle = 256;
    c.decode_steps_per_event = 2;
    double e_i = -0.2, e_b = -1.0;
    const char *load_path = NULL, *svg = NULL;
    int json = 0, bad = 0;
    for (int i = 1; i < argc; i++) {
        int missing = 0;
        const char *v;
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            printf("usage: dsinfer sim pricing [--elasticity-interactive E] [--elasticity-batch E]\n"
                   "                           [--batch-share S] [--pricing FILE] [--json] [planner options]\n\n"
                   "DeepSeek's day at R1 prices under (1) flat prices, (2) the night discount (75%% off\n"
                   "00:30-08:30 UTC+8) and (3) load-based prices (x0.7 below 50%% utilisation, x1.2 above 80%%,\n"
                   "hysteresis 0.05, 10 min hold; --pricing FILE replaces them, its first model is used),\n"
                   "with price-elastic demand: interactive traffic (elasticity -0.2) changes volume, batch\n"
                   "traffic (share 0.3, elasticity -1.0) keeps its volume and moves to cheaper hours.\n"
                   "Prints revenue, cost, margin, peak and average nodes and the traffic shifted off-peak,\n"
                   "as ratios to flat. Default granularity: --bundle 256 --steps-per-event 2.\n"
                   "--svg-dir DIR writes nodes_{flat,night,load}.svg and cost_revenue_{...}.svg.\n");
            return 0;
        }
        if ((v = dsi_cli_flag(argc, argv, &i, "--elasticity-interactive", &missing)))
            e_i = dsi_cli_num("sim pricing", "--elasticity-interactive", v, &bad);
        else if ((v = dsi_cli_flag(argc, argv, &i, "--elasticity-batch", &missing)))
            e_b = dsi_cli_num("sim pricing", "--elasticity-batch", v, &bad);
        else if ((v = dsi_cli_flag(argc, argv, &i, "--batch-share", &missing)))
            c.batch_share = dsi_cli_num("sim pricing", "--batch-share", v, &bad);
        else if ((v = dsi_cli_flag(argc, argv, &i, "--pricing", &missing))) load_path = v;
        else {
            int k = missing ? -1 : dsi__sim_parse_plan_opt(argc, argv, &i, &c, &svg, &json, &bad);
            if (k <= 0) {
                fprintf(stderr, "dsinfer sim pricing: bad option '%s'\n", argv[i]);
                return 2;
            }
            continue;
        }
        if (missing) {
            fprintf(stderr, "dsinfer sim pricing: %s needs a value\n", argv[i]);
            return 2;
        }
    }
    if (bad) return 2;
    if (!(c.batch_share >= 0 && c.batch_share <= 1) || !(e_i <= 0 && e_i > -10) || !(e_b <= 0 && e_b > -10)) {
        fprintf(stderr, "dsinfer sim pricing: batch share in [0, 1], elasticities in (-10, 0]\n");
        return 2;
    }
    dsi_pricing *night = NULL, *load = NULL;
    if (dsi__sim_load_pricing(NULL, &night)) return 1;
    int rc = load_path ? dsi_pricing_load(load_path, &load) : dsi_pricing_parse(LOAD_PRICING, "built-in load pricing", &load);
    if (rc) {
        fprintf(stderr, "dsinfer sim pricing: %s\n", dsi_last_error());
        dsi_pricing_destroy(night);
        return 1;
    }
    /* flat: the same engine path with no rules */
    dsi_sim_result *flat = NULL, *rn = NULL, *rl = NULL;
    demand_ctx d = {.day0 = c.day_start, .e = {e_i, e_b}};
    rc = dsi_sim_run(&c, &flat);
    if (rc) {
        fprintf(stderr, "dsinfer sim pricing: %s\n", dsi_last_error());
        goto done;
    }
    double fleet = flat->peak_nodes, util[DSI_SIM_MINUTES];
    for (int i = 0; i < DSI_SIM_MINUTES; i++) util[i] = flat->nodes[i] / fleet;
    if (run_scheme(c, night, dsi_pricing_find_model(night, "deepseek-r1"), 0, util, fleet, &d, &rn) ||
        run_scheme(c, load, 0, 1, util, fleet, &d, &rl)) {
        fprintf(stderr, "dsinfer sim pricing: %s\n", dsi_last_error());
        rc = 1;
        goto done;
    }
    const char *names[3] = {"flat (R1 list prices)", "night discount (R1 75% off)", "load-based (x0.7 / x1.2)"};
    dsi_sim_result *rs[3] = {flat, rn, rl};
    if (json) {
        printf("{\"elasticities\":{\"interactive\":%.3f,\"batch\":%.3f},\"batch_share\":%.3f,\"fleet_nodes\":%.0f,"
               "\"schemes\":[",
               e_i, e_b, c.batch_share, fleet);
        for (int k = 0; k < 3; k++)
            printf("%s{\"name\":\"%s\",\"revenue_usd\":%.2f,\"cost_usd\":%.2f,\"margin\":%.6f,\"peak_nodes\":%.0f,"
                   "\"avg_nodes\":%.3f,\"offpeak_share\":%.5f,\"tokens\":%.6g}",
                   k ? "," : "", names[k], rs[k]->revenue_usd, rs[k]->cost_usd, rs[k]->margin, rs[k]->peak_nodes,
                   rs[k]->avg_nodes, rs[k]->offpeak_token_share,
                   rs[k]->input_tokens + rs[k]->output_tokens);
        printf("]}\n");
    } else {
        printf("pricing schemes on DeepSeek's day (R1 prices, all traffic paying), demand elasticities:\n"
               "  interactive %.2f (volume), batch %.2f (moves in time, volume kept), batch share %.0f%%;\n"
               "  utilisation = nodes in use / %.0f (the flat day's peak)\n\n",
               e_i, e_b, c.batch_share * 100, fleet);
        printf("  %-30s %12s %10s %8s %6s %8s %9s %9s\n", "scheme", "revenue", "cost", "margin", "peak", "avg",
               "tokens", "off-peak");
        for (int k = 0; k < 3; k++)
            printf("  %-30s %12.0f %10.0f %7.1f%% %6.0f %8.2f %8.1fB %8.1f%%\n", names[k], rs[k]->revenue_usd,
                   rs[k]->cost_usd, rs[k]->margin * 100, rs[k]->peak_nodes, rs[k]->avg_nodes,
                   (rs[k]->input_tokens + rs[k]->output_tokens) / 1e9, rs[k]->offpeak_token_share * 100);
        printf("\n  ratios to flat:                 revenue     cost   margin*    peak  avg nodes  shifted off-peak\n");
        for (int k = 1; k < 3; k++)
            printf("  %-30s %8.3f %8.3f %8.3f %8.3f %8.3f %+10.1f pp\n", names[k], rs[k]->revenue_usd / flat->revenue_usd,
                   rs[k]->cost_usd / flat->cost_usd, (1 + rs[k]->margin) / (1 + flat->margin),
                   rs[k]->peak_nodes / flat->peak_nodes, rs[k]->avg_nodes / flat->avg_nodes,
                   (rs[k]->offpeak_token_share - flat->offpeak_token_share) * 100);
        printf("  (* margin ratio = (revenue/cost) / (revenue/cost)_flat; off-peak = the 12 lowest-demand hours\n"
               "   of the flat day; shifted = change in their share of tokens, percentage points)\n");
    }
    static const char *tags[3] = {"_flat", "_night", "_load"};
    rc = 0;
    for (int k = 0; k < 3 && !rc; k++) rc = dsi__sim_write_svgs(&c, rs[k], svg, tags[k]);
done:
    dsi_sim_result_destroy(flat);
    dsi_sim_result_destroy(rn);
    dsi_sim_result_destroy(rl);
    dsi_pricing_destroy(night);
    dsi_pricing_destroy(load);
    return rc;
}
