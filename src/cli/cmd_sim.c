/* dsinfer sim: the calculator (DeepSeek's published day and realistic
 * variants), the planner (a simulated day), what-ifs, calibration, and the
 * dynamic-pricing comparison. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cli/cli.h"
#include "cli/sim_cli.h"
#include "dsinfer/econ.h"
#include "dsinfer/sim.h"

/* Built-in copy of docs/pricing.deepseek.json so the calculator runs anywhere. */
static const char *DEEPSEEK_PRICING =
    "{\"currency\":\"USD\",\"timezone\":\"UTC+8\",\"gpu\":{\"type\":\"H800\",\"cost_per_hour\":2.0,\"per_node\":8},"
    "\"models\":{\"deepseek-r1\":{\"aliases\":[\"deepseek-reasoner\"],\"input_cache_hit\":0.14,"
    "\"input_cache_miss\":0.55,\"output\":2.19},\"deepseek-v3\":{\"aliases\":[\"deepseek-chat\"],"
    "\"input_cache_hit\":0.07,\"input_cache_miss\":0.27,\"output\":1.10}},"
    "\"windows\":[{\"name\":\"night\",\"start\":\"00:30\",\"end\":\"08:30\",\"timezone\":\"UTC+8\","
    "\"multiplier\":{\"deepseek-v3\":0.5,\"deepseek-r1\":0.25}}]}";

int dsi__sim_load_pricing(const char *path, dsi_pricing **out) {
    int rc = path ? dsi_pricing_load(path, out) : dsi_pricing_parse(DEEPSEEK_PRICING, "built-in pricing", out);
    if (rc) fprintf(stderr, "dsinfer sim: %s\n", dsi_last_error());
    return rc;
}

/* "87,072" into buf (>= 32 bytes); rounds to the dollar. */
static const char *usd(double v, char *buf) {
    char tmp[32];
    snprintf(tmp, sizeof tmp, "%.0f", fabs(v));
    int n = (int)strlen(tmp), o = 0;
    if (v < -0.5) buf[o++] = '-';
    for (int i = 0; i < n; i++) {
        if (i > 0 && (n - i) % 3 == 0) buf[o++] = ',';
        buf[o++] = tmp[i];
    }
    buf[o] = 0;
    return buf;
}

/* ---- calculator --------------------------------------------------------------------------- */

typedef struct calc_row {
    const char *name;
    double cost, revenue, margin;
} calc_row;

/* Revenue of the published token counts for `model` with the night window's
 * multiplier applied to `night_share` of them. */
static double revenue_for(const dsi_pricing *p, int model, double night_share, const dsi_econ_calc_in *base) {
    dsi_econ_calc_in in = *base;
    dsi_econ_calc_out o;
    dsi_pricing_base(p, model, in.usd_per_mtok);
    double mult = 1;
    /* the multiplier in force at 03:00 local of the first window's zone, if any */
    dsi_price_quote q;
    double t_night = 1740628800.0 + 15 * 3600; /* 2025-02-28 03:00 UTC+8 */
    if (dsi_pricing_eval(p, model, t_night, -1, &q) == DSI_OK) mult = q.multiplier;
    dsi_econ_calc(&in, &o);
    return o.revenue_usd * ((1 - night_share) + night_share * mult);
}

static int cmd_calc(int argc, char **argv) {
    const char *pricing_path = NULL;
    int json = 0, bad = 0;
    double paying = -1, v3_share = 0.5, redundancy = 3; /* paying -1: file's, else 0.5 */
    for (int i = 1; i < argc; i++) {
        int missing = 0;
        const char *v;
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            printf("usage: dsinfer sim [calc] [--json] [--pricing FILE] [--paying-share P] [--v3-share S]\n"
                   "                  [--redundancy R]\n\n"
                   "DeepSeek's published day (226.75 nodes x 8 H800 x $2 x 24 h; 342B cache-hit, 266B miss\n"
                   "input and 168B output tokens at R1 prices), then realistic variants: V3 prices, the night\n"
                   "discount (share of traffic in the window from the planner's diurnal curve), a V3/R1 mix\n"
                   "(--v3-share, default 0.5), a paying share (--paying-share, default the file's with --pricing,\n"
                   "else 0.5: web and app are free) and provisioned/serving GPU redundancy (--redundancy, default 3 for '3:1').\n"
                   "--pricing takes models 'deepseek-r1' and 'deepseek-v3' and the GPU cost from a pricing file.\n"
                   "--json prints {cost_usd, revenue_usd, margin, ...}; margin is (revenue-cost)/cost.\n");
            return 0;
        } else if (!strcmp(argv[i], "--json")) {
            json = 1;
        } else if ((v = dsi_cli_flag(argc, argv, &i, "--pricing", &missing))) {
            pricing_path = v;
        } else if ((v = dsi_cli_flag(argc, argv, &i, "--paying-share", &missing))) {
            paying = dsi_cli_num("sim", "--paying-share", v, &bad);
        } else if ((v = dsi_cli_flag(argc, argv, &i, "--v3-share", &missing))) {
            v3_share = dsi_cli_num("sim", "--v3-share", v, &bad);
        } else if ((v = dsi_cli_flag(argc, argv, &i, "--redundancy", &missing))) {
            redundancy = dsi_cli_num("sim", "--redundancy", v, &bad);
        } else {
            if (!missing) fprintf(stderr, "dsinfer sim calc: unknown option '%s'\n", argv[i]);
            else fprintf(stderr, "dsinfer sim calc: %s needs a value\n", argv[i]);
            return 2;
        }
        if (missing) {
            fprintf(stderr, "dsinfer sim calc: %s needs a value\n", argv[i]);
            return 2;
        }
    }
    if (bad) return 2;
    if (!(paying == -1 || (paying >= 0 && paying <= 1)) || !(v3_share >= 0 && v3_share <= 1) || !(redundancy >= 1)) {
        fprintf(stderr, "dsinfer sim calc: shares must be in [0, 1] and redundancy >= 1\n");
        return 2;
    }
    dsi_pricing *p;
    if (dsi__sim_load_pricing(pricing_path, &p)) return 1;
    int r1 = dsi_pricing_find_model(p, "deepseek-r1"), v3 = dsi_pricing_find_model(p, "deepseek-v3");
    if (r1 < 0 || v3 < 0) {
        fprintf(stderr, "dsinfer sim calc: the pricing file needs models 'deepseek-r1' and 'deepseek-v3'\n");
        dsi_pricing_destroy(p);
        return 1;
    }
    dsi_econ_calc_in in;
    dsi_econ_calc_out out;
    dsi_econ_calc_deepseek(&in);
    if (paying < 0) paying = pricing_path ? dsi_pricing_paying_share(p) : 0.5;
    if (pricing_path) {
        in.gpu_cost_per_hour = dsi_pricing_gpu_cost_per_hour(p);
        in.gpus_per_node = dsi_pricing_gpus_per_node(p);
    }
    dsi_pricing_base(p, r1, in.usd_per_mtok);
    if (dsi_econ_calc(&in, &out)) {
        fprintf(stderr, "dsinfer sim calc: %s\n", dsi_last_error());
        dsi_pricing_destroy(p);
        return 1;
    }
    dsi_sim_config sc;
    dsi_sim_config_default(&sc);
    double night = dsi_sim_window_share(&sc, 30, 8 * 60 + 30);
    calc_row rows[6];
    double c0 = out.cost_usd;
    double rv3 = revenue_for(p, v3, 0, &in), rr1n = revenue_for(p, r1, night, &in), rv3n = revenue_for(p, v3, night, &in);
    double mix = v3_share * rv3n + (1 - v3_share) * rr1n;
    rows[0] = (calc_row){"published inputs, R1 prices (theoretical)", c0, out.revenue_usd, 0};
    rows[1] = (calc_row){"V3 prices for all traffic", c0, rv3, 0};
    rows[2] = (calc_row){"R1 prices, night discount", c0, rr1n, 0};
    rows[3] = (calc_row){"V3/R1 mix, night discounts", c0, mix, 0};
    rows[4] = (calc_row){"  ... x paying share", c0, mix * paying, 0};
    rows[5] = (calc_row){"  ... x GPU redundancy", c0 * redundancy, mix * paying, 0};
    for (int i = 0; i < 6; i++) rows[i].margin = (rows[i].revenue - rows[i].cost) / rows[i].cost;
    if (json) {
        printf("{\"cost_usd\":%.2f,\"revenue_usd\":%.2f,\"margin\":%.6f,\"revenue_by_class_usd\":{", out.cost_usd,
               out.revenue_usd, out.margin);
        for (int c = 0; c < DSI_TOK_N; c++)
            printf("%s\"%s\":%.2f", c ? "," : "", dsi_token_class_name(c), out.revenue_by_class[c]);
        printf("},\"published\":{\"cost_usd\":87072,\"revenue_usd\":562027,\"margin\":5.45},"
               "\"assumptions\":{\"night_share\":%.4f,\"v3_share\":%.3f,\"paying_share\":%.3f,\"redundancy\":%.3f},"
               "\"variants\":[",
               night, v3_share, paying, redundancy);
        for (int i = 0; i < 6; i++)
            printf("%s{\"name\":\"%s\",\"cost_usd\":%.2f,\"revenue_usd\":%.2f,\"margin\":%.6f}", i ? "," : "",
                   rows[i].name + (rows[i].name[0] == ' ' ? 6 : 0), rows[i].cost, rows[i].revenue, rows[i].margin);
        printf("]}\n");
    } else {
        printf("DeepSeek's day (SYSTEM.md): %.2f nodes x %d GPUs x $%.2f/GPU-h x %.0f h\n", in.nodes, in.gpus_per_node,
               in.gpu_cost_per_hour, in.hours);
        char b1[32], b2[32];
        printf("  cost            $%s/day    (published $87,072)\n", usd(out.cost_usd, b1));
        printf("  revenue         $%s/day   (published $562,027; the rounded token counts give $562,100)\n",
               usd(out.revenue_usd, b1));
        for (int c = 0; c < DSI_TOK_N; c++)
            printf("    %-16s %5.0fB tokens x $%.2f/M = $%s\n", dsi_token_class_name(c), in.tokens[c] / 1e9,
                   in.usd_per_mtok[c], usd(out.revenue_by_class[c], b1));
        printf("  margin          %.1f%%        (published 545%%; (revenue - cost) / cost)\n\n", out.margin * 100);
        printf("Realistic variants (night share %.1f%% of traffic in 00:30-08:30 UTC+8, from the planner's curve;\n"
               "V3 share %.0f%%, paying share %.0f%%, redundancy %.2f:1):\n",
               night * 100, v3_share * 100, paying * 100, redundancy);
        printf("  %-44s %12s %12s %9s\n", "variant", "cost", "revenue", "margin");
        for (int i = 0; i < 6; i++)
            printf("  %-44s %12s %12s %8.1f%%\n", rows[i].name, usd(rows[i].cost, b1), usd(rows[i].revenue, b2),
                   rows[i].margin * 100);
    }
    dsi_pricing_destroy(p);
    return 0;
}

/* ---- planner options shared by plan / whatif / fit / pricing ------------------------------------ */

void dsi__sim_print_params(const dsi_sim_config *c, FILE *f) {
    const dsi_perf_params *p = &c->perf;
    fprintf(f, "fitted parameters (dsinfer sim fit):\n");
    fprintf(f, "  eff_prefill   %.4f  achieved fraction of the modelled prefill step bound\n", p->eff_prefill);
    fprintf(f, "  eff_decode    %.4f  achieved fraction of the modelled decode step bound\n", p->eff_decode);
    fprintf(f, "stated parameters:\n");
    fprintf(f, "  GPU %s: %.0f BF16 / %.0f FP8 TFLOP/s, HBM %.2f TB/s %.0f GB, NVLink %.0f GB/s, RDMA %.0f GB/s\n",
            p->gpu.name, p->gpu.bf16_tflops, p->gpu.fp8_tflops, p->gpu.hbm_tbps, p->gpu.hbm_gb, p->gpu.nvlink_gbps,
            p->gpu.rdma_gbps);
    fprintf(f, "  kernels: GEMM %.2f, MLA %.2f, HBM %.2f, DeepEP LL %.2f / normal %.2f of peak; 3FS %.0f GB/s/node\n",
            p->eff_gemm, p->eff_attn, p->eff_hbm, p->eff_net_ll, p->eff_net_normal, p->kv_load_gbps_node);
    fprintf(f, "  overlap %s, EPLB imbalance prefill %.2f decode %.2f, DP imbalance %.2f / %.2f, MTP %s (accept %.2f)\n",
            p->overlap ? "on" : "off", p->eplb_imbalance_prefill, p->eplb_imbalance_decode, p->dp_imbalance_prefill,
            p->dp_imbalance_decode, p->mtp ? "on" : "off", p->mtp_accept);
    fprintf(f, "  traffic: mean output %.0f (CV %.2f), input CV %.2f, hit share %.3f (Beta, a+b=%.1f), disk cache %s\n",
            c->mean_output_len, c->output_cv, c->input_cv, c->hit_share, c->hit_concentration,
            c->disk_cache ? "on" : "off");
    fprintf(f, "  autoscaler: every %.0f s, unit start %.0f s, prefill busy target %.2f, TTFT p90 < %.1f s,\n"
               "              decode %.0f tok/s per user, fill %.2f up / %.2f down; seed %llu, bundle %d\n",
            c->scale_interval_s, c->unit_start_s, c->prefill_util_target, c->ttft_target_s, c->decode_tok_s,
            c->decode_fill_up, c->decode_fill_down, (unsigned long long)c->seed, c->bundle);
}

/* An efficiency is a fraction of the roofline: above 1 the simulated units
 * outrun the hardware and the event count explodes (100 ran for minutes). */
static int eff_opt(const char *name, const char *v, double *eff, int *bad) {
    double x = dsi_cli_num("sim", name, v, bad);
    if (*bad) return 1;
    if (!(x > 0 && x <= 1)) {
        fprintf(stderr, "dsinfer sim: %s must be in (0, 1] (a fraction of the roofline)\n", name);
        return 0;
    }
    *eff = x;
    return 1;
}

/* Parses one planner option at argv[*i]; returns 1 if consumed, 0 if not
 * ours, -1 on a bad value. A value that is not a number sets *bad and is
 * consumed (the range checks here skip then: the caller exits 2 anyway). */
int dsi__sim_parse_plan_opt(int argc, char **argv, int *i, dsi_sim_config *c, const char **svg_dir, int *json,
                            int *bad) {
    int missing = 0;
    const char *v;
    if (!strcmp(argv[*i], "--no-overlap")) c->perf.overlap = 0;
    else if (!strcmp(argv[*i], "--no-eplb")) {
        /* Natural expert skew: SGLang measured EPLB worth 1.49x prefill, 2.54x decode. */
        c->perf.eplb_imbalance_prefill = 1.6;
        c->perf.eplb_imbalance_decode = 2.2;
    } else if (!strcmp(argv[*i], "--no-disk-cache")) c->disk_cache = 0;
    else if (!strcmp(argv[*i], "--mtp")) c->perf.mtp = 1;
    else if (!strcmp(argv[*i], "--json")) *json = 1;
    else if ((v = dsi_cli_flag(argc, argv, i, "--gpu", &missing))) {
        if (dsi_sim_gpu_spec(v, &c->perf.gpu)) {
            fprintf(stderr, "dsinfer sim: %s\n", dsi_last_error());
            return -1;
        }
    } else if ((v = dsi_cli_flag(argc, argv, i, "--svg-dir", &missing))) *svg_dir = v;
    else if ((v = dsi_cli_flag(argc, argv, i, "--bundle", &missing))) {
        c->bundle = dsi_cli_int("sim", "--bundle", v, bad);
        if (!*bad && c->bundle < 1) {
            fprintf(stderr, "dsinfer sim: --bundle must be >= 1\n");
            return -1;
        }
    } else if ((v = dsi_cli_flag(argc, argv, i, "--seed", &missing)))
        c->seed = dsi_cli_u64("sim", "--seed", v, bad);
    else if ((v = dsi_cli_flag(argc, argv, i, "--steps-per-event", &missing))) {
        c->decode_steps_per_event = dsi_cli_int("sim", "--steps-per-event", v, bad);
        if (!*bad && c->decode_steps_per_event < 1) {
            fprintf(stderr, "dsinfer sim: --steps-per-event must be >= 1\n");
            return -1;
        }
    } else if ((v = dsi_cli_flag(argc, argv, i, "--eff-prefill", &missing))) {
        if (!eff_opt("--eff-prefill", v, &c->perf.eff_prefill, bad)) return -1;
    } else if ((v = dsi_cli_flag(argc, argv, i, "--eff-decode", &missing))) {
        if (!eff_opt("--eff-decode", v, &c->perf.eff_decode, bad)) return -1;
    } else if (missing) {
        fprintf(stderr, "dsinfer sim: %s needs a value\n", argv[*i]);
        return -1;
    } else return 0;
    return 1;
}

static const char *PLAN_OPTS =
    "  --gpu h800|h100|h200   GPU type (default h800)\n"
    "  --no-overlap           no dual micro-batch overlap of compute and communication\n"
    "  --no-eplb              expert load imbalance without EPLB (1.6 prefill, 2.2 decode)\n"
    "  --no-disk-cache        every input token is a cache miss\n"
    "  --mtp                  multi-token prediction, one draft token (85% accepted)\n"
    "  --bundle N             requests simulated as one (default 64; larger is faster)\n"
    "  --steps-per-event K    decode steps per simulated event (default 1)\n"
    "  --seed S               RNG seed\n"
    "  --eff-prefill X --eff-decode X   override the fitted efficiencies\n"
    "  --json                 figures as JSON\n";

static int within(double v, double target) { return fabs(v / target - 1) <= 0.10; }

void dsi__sim_print_result(const dsi_sim_config *c, const dsi_sim_result *r, int json) {
    if (json) {
        printf("{\"gpu\":\"%s\",\"avg_nodes\":%.3f,\"peak_nodes\":%.0f,\"avg_prefill_nodes\":%.3f,"
               "\"avg_decode_nodes\":%.3f,\"prefill_input_tok_s_per_node\":%.1f,\"decode_output_tok_s_per_node\":%.1f,"
               "\"ttft_mean_s\":%.3f,\"ttft_p90_s\":%.3f,\"user_tok_s\":%.2f,\"kv_per_output_token\":%.1f,"
               "\"input_tokens\":%.6g,\"hit_tokens\":%.6g,\"output_tokens\":%.6g,\"cost_usd\":%.2f,"
               "\"revenue_usd\":%.2f,\"margin\":%.6f,\"eff_prefill\":%.5f,\"eff_decode\":%.5f,\"nodes_hourly\":[",
               c->perf.gpu.name, r->avg_nodes, r->peak_nodes, r->avg_prefill_nodes, r->avg_decode_nodes,
               r->prefill_in_tok_s_node, r->decode_out_tok_s_node, r->ttft_mean_s, r->ttft_p90_s, r->user_tok_s,
               r->kv_per_output_token, r->input_tokens, r->hit_tokens, r->output_tokens, r->cost_usd, r->revenue_usd,
               r->margin, c->perf.eff_prefill, c->perf.eff_decode);
        for (int h = 0; h < 24; h++) printf("%s%.0f", h ? "," : "", r->nodes[h * 60]);
        printf("]}\n");
        return;
    }
    printf("simulated day (%s, %s overlap, EPLB imbalance %.2f/%.2f, disk cache %s, MTP %s)\n", c->perf.gpu.name,
           c->perf.overlap ? "with" : "no", c->perf.eplb_imbalance_prefill, c->perf.eplb_imbalance_decode,
           c->disk_cache ? "on" : "off", c->perf.mtp ? "on" : "off");
    printf("  %-34s %12s %12s\n", "figure", "simulated", "published");
    printf("  %-34s %12.0f %12.0f %s\n", "prefill input tok/s per node", r->prefill_in_tok_s_node,
           DSI_SIM_TARGET_IN_TOK_S, within(r->prefill_in_tok_s_node, DSI_SIM_TARGET_IN_TOK_S) ? "(within 10%)" : "");
    printf("  %-34s %12.0f %12.0f %s\n", "decode output tok/s per node", r->decode_out_tok_s_node,
           DSI_SIM_TARGET_OUT_TOK_S, within(r->decode_out_tok_s_node, DSI_SIM_TARGET_OUT_TOK_S) ? "(within 10%)" : "");
    printf("  %-34s %12.2f %12.2f %s\n", "average nodes (time-weighted)", r->avg_nodes, DSI_SIM_TARGET_AVG_NODES,
           within(r->avg_nodes, DSI_SIM_TARGET_AVG_NODES) ? "(within 10%)" : "");
    printf("  %-34s %12.0f %12d\n", "peak nodes", r->peak_nodes, DSI_SIM_TARGET_PEAK_NODES);
    printf("  %-34s %12.1f %12s\n", "per-user decode tok/s", r->user_tok_s, "20-22");
    printf("  %-34s %12.0f %12d\n", "KV length per output token", r->kv_per_output_token, 4989);
    printf("  %-34s %11.1fB %11dB\n", "input tokens (of which hits)", r->input_tokens / 1e9, 608);
    printf("  %-34s %11.1fB %11dB\n", "  cache-hit tokens", r->hit_tokens / 1e9, 342);
    printf("  %-34s %11.1fB %11dB\n", "output tokens", r->output_tokens / 1e9, 168);
    printf("  %-34s %12.0f %12d\n", "cost USD", r->cost_usd, 87072);
    printf("  %-34s %12.0f %12d\n", "revenue USD (R1 prices)", r->revenue_usd, 562027);
    printf("  %-34s %11.1f%% %11d%%\n", "margin", r->margin * 100, 545);
    printf("  prefill nodes %.1f avg, decode nodes %.1f avg; TTFT mean %.2f s, p90 %.2f s; %lld events\n",
           r->avg_prefill_nodes, r->avg_decode_nodes, r->ttft_mean_s, r->ttft_p90_s, (long long)r->events);
    printf("  nodes by hour from 12:00 UTC+8:");
    for (int h = 0; h < 24; h++) printf(" %.0f", r->nodes[h * 60]);
    printf("\n");
}

int dsi__sim_write_svgs(const dsi_sim_config *c, const dsi_sim_result *r, const char *dir, const char *tag) {
    if (!dir) return 0;
    mkdir(dir, 0755);
    char a[1024], b[1024], title[128];
    snprintf(a, sizeof a, "%s/nodes%s.svg", dir, tag);
    snprintf(b, sizeof b, "%s/cost_revenue%s.svg", dir, tag);
    snprintf(title, sizeof title, "Simulated inference nodes (%s), %.2f average, peak %.0f", c->perf.gpu.name,
             r->avg_nodes, r->peak_nodes);
    if (dsi_sim_svg_nodes(r, c, a, title) || dsi_sim_svg_money(r, c, b, "Simulated hourly cost vs revenue (USD)")) {
        fprintf(stderr, "dsinfer sim: %s\n", dsi_last_error());
        return 1;
    }
    fprintf(stderr, "wrote %s and %s\n", a, b);
    return 0;
}

static int cmd_plan(int argc, char **argv) {
    dsi_sim_config c;
    dsi_sim_config_default(&c);
    const char *svg = NULL;
    int json = 0, bad = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            printf("usage: dsinfer sim plan [options] [--svg-dir DIR]\n\n"
                   "Discrete-event simulation of DeepSeek's day (2025-02-27 12:00 UTC+8, 24 h): prefill units\n"
                   "(4 nodes, EP32) and decode units (18 nodes, EP144) scaled by an autoscaler; prints node\n"
                   "counts, per-node throughput, cost, revenue and margin beside the published figures.\n\n%s"
                   "  --svg-dir DIR          write nodes.svg and cost_revenue.svg\n",
                   PLAN_OPTS);
            return 0;
        }
        int k = dsi__sim_parse_plan_opt(argc, argv, &i, &c, &svg, &json, &bad);
        if (k < 0) return 2;
        if (k == 0) {
            fprintf(stderr, "dsinfer sim plan: unknown option '%s'\n", argv[i]);
            return 2;
        }
    }
    if (bad) return 2;
    dsi_sim_result *r;
    if (dsi_sim_run(&c, &r)) {
        fprintf(stderr, "dsinfer sim plan: %s\n", dsi_last_error());
        return 1;
    }
    dsi__sim_print_result(&c, r, json);
    if (!json) dsi__sim_print_params(&c, stdout);
    int rc = dsi__sim_write_svgs(&c, r, svg, "");
    dsi_sim_result_destroy(r);
    return rc;
}

static int cmd_fit(int argc, char **argv) {
    dsi_sim_config c;
    dsi_sim_config_default(&c);
    const char *svg = NULL;
    int json = 0, iters = 4, bad = 0;
    for (int i = 1; i < argc; i++) {
        int missing = 0;
        const char *v;
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            printf("usage: dsinfer sim fit [--iters N] [planner options]\n\n"
                   "Fits eff_prefill and eff_decode so the simulated day lands on the published 73.7k input\n"
                   "and 14.8k output tok/s per node, starting from the built-in values, and prints them.\n\n%s",
                   PLAN_OPTS);
            return 0;
        }
        if ((v = dsi_cli_flag(argc, argv, &i, "--iters", &missing))) {
            iters = dsi_cli_int("sim fit", "--iters", v, &bad);
            if (!bad && iters < 1) {
                fprintf(stderr, "dsinfer sim fit: --iters must be >= 1\n");
                return 2;
            }
            continue;
        }
        int k = missing ? -1 : dsi__sim_parse_plan_opt(argc, argv, &i, &c, &svg, &json, &bad);
        if (k <= 0) {
            fprintf(stderr, "dsinfer sim fit: bad option '%s'\n", argv[i]);
            return 2;
        }
    }
    if (bad) return 2;
    dsi_sim_result *r;
    if (dsi_sim_fit(&c, iters, &r)) {
        fprintf(stderr, "dsinfer sim fit: %s\n", dsi_last_error());
        return 1;
    }
    dsi__sim_print_result(&c, r, json);
    if (!json) {
        dsi__sim_print_params(&c, stdout);
        /* Cross-check on DeepSeek's profiling runs (perfectly balanced routing). */
        dsi_perf_params p = c.perf;
        p.eplb_imbalance_prefill = p.eplb_imbalance_decode = p.dp_imbalance_prefill = p.dp_imbalance_decode = 1;
        double ctx = 4 * 4096.0 * 4097 / 2;
        double tp = dsi_perf_prefill_step(&p, 32, 16384, ctx, 0, NULL);
        double td = dsi_perf_decode_step(&p, 128, 128, 4096, NULL);
        printf("profiling runs with these parameters (published in parentheses):\n"
               "  prefill EP32, 4K prompts, 16K tokens/GPU: %.1fk tok/s per node (62.7k)\n"
               "  decode EP128, 128 requests/GPU, 4K KV:    %.1fk tok/s per node (18.6k)\n",
               16384 * 8 / tp / 1e3, 128 * 8 / td / 1e3);
    }
    dsi_sim_result_destroy(r);
    return 0;
}

static int cmd_whatif(int argc, char **argv) {
    dsi_sim_config base;
    dsi_sim_config_default(&base);
    const char *svg = NULL;
    int json = 0, bad = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            printf("usage: dsinfer sim whatif [--bundle N] [--steps-per-event K] [--json] [--svg-dir DIR]\n\n"
                   "Runs the baseline day and each variant (no overlap, no EPLB, no disk cache, H100, H200,\n"
                   "MTP on) and prints each as a ratio to the baseline.\n");
            return 0;
        }
        int k = dsi__sim_parse_plan_opt(argc, argv, &i, &base, &svg, &json, &bad);
        if (k <= 0) {
            fprintf(stderr, "dsinfer sim whatif: bad option '%s'\n", argv[i]);
            return 2;
        }
    }
    if (bad) return 2;
    static const char *names[] = {"baseline (H800)", "no overlap", "no EPLB", "no disk cache", "H100", "H200", "MTP on"};
    dsi_sim_result *r[7] = {0};
    int rc = 0;
    for (int v = 0; v < 7 && !rc; v++) {
        dsi_sim_config c = base;
        switch (v) {
        case 1: c.perf.overlap = 0; break;
        case 2: c.perf.eplb_imbalance_prefill = 1.6, c.perf.eplb_imbalance_decode = 2.2; break;
        case 3: c.disk_cache = 0; break;
        case 4: dsi_sim_gpu_spec("h100", &c.perf.gpu); break;
        case 5: dsi_sim_gpu_spec("h200", &c.perf.gpu); break;
        case 6: c.perf.mtp = 1; break;
        }
        if (dsi_sim_run(&c, &r[v])) {
            fprintf(stderr, "dsinfer sim whatif: %s: %s\n", names[v], dsi_last_error());
            rc = 1;
        } else if (v == 0) {
            rc = dsi__sim_write_svgs(&c, r[0], svg, "");
        }
    }
    if (!rc) {
        if (json) printf("{\"baseline\":{\"avg_nodes\":%.3f,\"cost_usd\":%.2f,\"revenue_usd\":%.2f,\"margin\":%.6f},"
                         "\"ratios\":[", r[0]->avg_nodes, r[0]->cost_usd, r[0]->revenue_usd, r[0]->margin);
        else
            printf("what-if as ratios to the baseline (baseline: %.2f avg nodes, %.0f peak, $%.0f cost, $%.0f revenue, "
                   "margin %.0f%%)\n  %-16s %9s %9s %10s %10s %9s %9s %9s\n",
                   r[0]->avg_nodes, r[0]->peak_nodes, r[0]->cost_usd, r[0]->revenue_usd, r[0]->margin * 100, "variant",
                   "avg nodes", "peak", "in/node", "out/node", "cost", "revenue", "margin");
        for (int v = 1; v < 7; v++) {
            const dsi_sim_result *a = r[v], *b = r[0];
            double q[7] = {a->avg_nodes / b->avg_nodes, a->peak_nodes / b->peak_nodes,
                           a->prefill_in_tok_s_node / b->prefill_in_tok_s_node,
                           a->decode_out_tok_s_node / b->decode_out_tok_s_node, a->cost_usd / b->cost_usd,
                           a->revenue_usd / b->revenue_usd, (1 + a->margin) / (1 + b->margin)};
            if (json)
                printf("%s{\"variant\":\"%s\",\"avg_nodes\":%.4f,\"peak_nodes\":%.4f,\"prefill_tok_s_node\":%.4f,"
                       "\"decode_tok_s_node\":%.4f,\"cost\":%.4f,\"revenue\":%.4f,\"revenue_per_cost\":%.4f}",
                       v > 1 ? "," : "", names[v], q[0], q[1], q[2], q[3], q[4], q[5], q[6]);
            else
                printf("  %-16s %9.3f %9.3f %10.3f %10.3f %9.3f %9.3f %9.3f\n", names[v], q[0], q[1], q[2], q[3], q[4],
                       q[5], q[6]);
        }
        if (json) printf("]}\n");
        else printf("  (margin column: (revenue/cost) ratio, i.e. (1+margin)/(1+margin_baseline))\n");
    }
    for (int v = 0; v < 7; v++) dsi_sim_result_destroy(r[v]);
    return rc;
}

int dsi_cmd_sim(int argc, char **argv) {
    if (argc >= 2 && argv[1][0] != '-') {
        const char *sub = argv[1];
        if (!strcmp(sub, "calc")) return cmd_calc(argc - 1, argv + 1);
        if (!strcmp(sub, "plan")) return cmd_plan(argc - 1, argv + 1);
        if (!strcmp(sub, "whatif")) return cmd_whatif(argc - 1, argv + 1);
        if (!strcmp(sub, "fit")) return cmd_fit(argc - 1, argv + 1);
        if (!strcmp(sub, "pricing")) return dsi__sim_cmd_pricing(argc - 1, argv + 1);
        fprintf(stderr, "dsinfer sim: unknown mode '%s' (calc, plan, whatif, fit, pricing)\n", sub);
        return 2;
    }
    if (argc >= 2 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h"))) {
        printf("usage: dsinfer sim [calc|plan|whatif|fit|pricing] [options]\n\n"
               "  calc     DeepSeek's published day: cost, revenue, margin, realistic variants (default)\n"
               "  plan     discrete-event simulation of the day's cluster (--svg-dir for charts)\n"
               "  whatif   no overlap / no EPLB / no disk cache / H100 / H200 / MTP as ratios to the baseline\n"
               "  fit      refit the planner's free parameters to the published throughputs\n"
               "  pricing  flat vs night-discount vs load-based prices with price-elastic demand\n"
               "'dsinfer sim MODE --help' lists each mode's options.\n");
        return 0;
    }
    return cmd_calc(argc, argv);
}
