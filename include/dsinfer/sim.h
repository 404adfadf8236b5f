/* dsinfer/sim.h - the cluster planner: a performance model of DeepSeek-V3 steps
 * on H800/H100/H200 and a discrete-event simulation of a day of traffic with
 * disaggregated prefill and decode units and an autoscaler.
 *
 *     dsi_sim_config c;
 *     dsi_sim_config_default(&c);            // DeepSeek's day, H800, fitted parameters
 *     c.perf.overlap = 0;                    // a what-if
 *     dsi_sim_result *r;
 *     if (dsi_sim_run(&c, &r) == DSI_OK) printf("%.1f nodes\n", r->avg_nodes);
 *     dsi_sim_result_destroy(r);
 *
 * Everything is deterministic for a given config (seeded RNG, no clocks).
 * The performance model's formulas and constants are documented in
 * ARCHITECTURE.md ("Planner") and in src/sim/perf.c.
 */
#ifndef DSINFER_SIM_H
#define DSINFER_SIM_H

#include <stdint.h>

#include "dsinfer/common.h"
#include "dsinfer/econ.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- performance model ------------------------------------------------------------ */

typedef struct dsi_gpu_spec {
    char name[16];
    double bf16_tflops;   /* dense peak */
    double fp8_tflops;    /* dense peak */
    double hbm_tbps;      /* HBM bandwidth, TB/s */
    double hbm_gb;        /* HBM capacity, GB */
    double nvlink_gbps;   /* NVLink per GPU, both directions together, GB/s */
    double rdma_gbps;     /* scale-out per GPU, one direction, GB/s */
} dsi_gpu_spec;

/* "h800", "h100", "h200" (case-insensitive). */
int dsi_sim_gpu_spec(const char *name, dsi_gpu_spec *out);

typedef struct dsi_perf_params {
    dsi_gpu_spec gpu;
    int overlap;                 /* dual micro-batch compute/communication overlap */
    double eplb_imbalance_prefill; /* max/mean routed tokens per GPU (1 = perfect) */
    double eplb_imbalance_decode;
    double dp_imbalance_prefill; /* max/mean attention load over DP ranks */
    double dp_imbalance_decode;
    int mtp;                     /* multi-token prediction (one draft token) */
    double mtp_accept;           /* acceptance rate of the draft token */
    /* Published kernel efficiencies (fractions of peak), fixed: */
    double eff_gemm;             /* DeepGEMM ~1450 of 1979 TFLOP/s */
    double eff_attn;             /* FlashMLA ~620 of 989 TFLOP/s */
    double eff_hbm;              /* FlashMLA 3000 of 3350 GB/s */
    double eff_net_ll;           /* DeepEP low-latency: ~37 of 50 GB/s */
    double eff_net_normal;       /* DeepEP normal: ~45 of 50 GB/s RDMA, 153 of 200 NVLink */
    double kv_load_gbps_node;    /* 3FS KV read per node (40 GiB/s) */
    /* Fitted (see dsi_sim_fit): fraction of the modelled bound achieved end to end. */
    double eff_prefill;
    double eff_decode;
    double decode_overhead_s;    /* fixed time per decode step (scheduling, sampling, sync) */
} dsi_perf_params;

typedef struct dsi_perf_breakdown {
    double gemm_s, attn_s, comm_s, other_s; /* per step, before overlap and efficiency */
    double total_s;                          /* the step time */
} dsi_perf_breakdown;

/* One prefill step on a unit of `n_gpus` GPUs (EP over all of them, DP
 * attention): per-GPU `miss_tokens` computed, `ctx_tokens` = sum over those
 * tokens of the keys each attends to, `hit_tokens` loaded from the KV store.
 * Returns seconds. `bd` may be NULL. */
double dsi_perf_prefill_step(const dsi_perf_params *p, int n_gpus, double miss_tokens, double ctx_tokens,
                             double hit_tokens, dsi_perf_breakdown *bd);
/* One decode step: `reqs` requests per GPU with mean KV length `kv_len`.
 * Each step yields 1 (+ mtp_accept with MTP) tokens per request. */
double dsi_perf_decode_step(const dsi_perf_params *p, int n_gpus, double reqs, double kv_len,
                            dsi_perf_breakdown *bd);
/* Largest requests per GPU that fit the KV cache at mean length `kv_len`. */
double dsi_perf_decode_mem_reqs(const dsi_perf_params *p, int n_gpus, double kv_len);
/* Largest requests per GPU holding `tok_s_per_user`, capped by memory. */
double dsi_perf_decode_capacity(const dsi_perf_params *p, int n_gpus, double kv_len, double tok_s_per_user);

/* ---- the day simulation -------------------------------------------------------------- */

/* Optional price-responsive demand (dynamic pricing): called once per
 * simulated minute; returns the demand multiplier for traffic class `cls`
 * (0 interactive, 1 batch) at `t`. */
typedef double (*dsi_sim_demand_fn)(void *ctx, int cls, double t);

typedef struct dsi_sim_config {
    dsi_perf_params perf;
    uint64_t seed;
    double day_start;            /* Unix time of the first simulated second (12:00 UTC+8) */
    int tz_offset_min;           /* local time for the diurnal curve */
    double diurnal[24];          /* relative arrival rate at each local hour (interpolated) */
    double warmup_s;             /* simulated before day_start, not counted */
    /* traffic for the day */
    double input_tokens;         /* 608e9 */
    double hit_share;            /* 342/608 */
    double output_tokens;        /* 168e9 */
    double mean_output_len;      /* tokens per request */
    double output_cv;            /* lognormal coefficient of variation */
    double input_cv;
    double hit_concentration;    /* Beta(a, b) with a + b = this */
    int disk_cache;              /* 0: every input token is a miss */
    double batch_share;          /* traffic class 1's share (for demand_fn) */
    /* deployment */
    int prefill_nodes;           /* 4 per prefill unit */
    int decode_nodes;            /* 18 per decode unit */
    int gpus_per_node;           /* 8 */
    double prefill_tokens_per_gpu; /* step budget: 16K */
    /* autoscaler */
    double scale_interval_s;
    double unit_start_s;         /* billed, not serving, while loading weights */
    double ttft_target_s;        /* p90 TTFT above this adds a prefill unit */
    double prefill_util_target;  /* scale prefill to this busy fraction */
    double decode_tok_s;         /* per-user target: 20 */
    double decode_fill_up;       /* add a decode unit above this share of capacity */
    double decode_fill_down;     /* remove one when the rest would stay below this */
    /* money */
    double usd_per_mtok[DSI_TOK_N]; /* flat prices (R1) when `pricing` is NULL */
    dsi_pricing *pricing;          /* optional: engine billed at admission (borrowed) */
    int pricing_model;             /* model index in `pricing` */
    double paying_share;
    double gpu_cost_per_hour;
    double fleet_nodes;            /* utilisation denominator for load bands (0: peak units) */
    dsi_sim_demand_fn demand;      /* optional */
    void *demand_ctx;
    /* simulation granularity (speed vs fidelity) */
    int bundle;                  /* identical requests simulated as one */
    int decode_steps_per_event;
} dsi_sim_config;

#define DSI_SIM_MINUTES 1440

typedef struct dsi_sim_result {
    double input_tokens, hit_tokens, output_tokens, requests;
    double prefill_node_s, decode_node_s;
    double avg_nodes, peak_nodes, avg_prefill_nodes, avg_decode_nodes;
    double prefill_in_tok_s_node;   /* input (hits included) per prefill node */
    double decode_out_tok_s_node;   /* output per decode node */
    double ttft_mean_s, ttft_p90_s;
    double user_tok_s;              /* mean per-user decode speed */
    double slow_share;              /* share of request-time below decode_tok_s */
    double kv_per_output_token;     /* mean KV length per generated token */
    double cost_usd, revenue_usd, margin;
    double offpeak_token_share;     /* tokens admitted in the lower-demand half of the flat day */
    double nodes[DSI_SIM_MINUTES];  /* node count at each minute of the day */
    double utilisation[DSI_SIM_MINUTES]; /* demand / fleet at each minute */
    double hourly_cost[24], hourly_revenue[24];
    double hourly_tokens[24];       /* input + output tokens admitted */
    int64_t events;
} dsi_sim_result;

/* Relative arrival rate at Unix time t (the diurnal curve, mean 1 over a day). */
double dsi_sim_rate_shape(const dsi_sim_config *c, double t);

/* Share of the day's traffic arriving between local times [start, end)
 * (minutes of day in the config's zone; end < start wraps midnight). */
double dsi_sim_window_share(const dsi_sim_config *c, int start_min, int end_min);

/* DeepSeek's day on H800 with the fitted parameters. */
void dsi_sim_config_default(dsi_sim_config *c);
/* Runs the day. *out is owned by the caller. */
int dsi_sim_run(const dsi_sim_config *c, dsi_sim_result **out);
void dsi_sim_result_destroy(dsi_sim_result *r);

/* Calibration targets (SYSTEM.md). */
#define DSI_SIM_TARGET_IN_TOK_S 73.7e3
#define DSI_SIM_TARGET_OUT_TOK_S 14.8e3
#define DSI_SIM_TARGET_AVG_NODES 226.75
#define DSI_SIM_TARGET_PEAK_NODES 278

/* Fits eff_prefill and eff_decode so that the day lands on the published
 * per-node throughputs; `iters` multiplicative updates (4 is plenty). The
 * result of the last run is returned in *out (may be NULL). */
int dsi_sim_fit(dsi_sim_config *c, int iters, dsi_sim_result **out);

/* SVG charts: node count over the day, and hourly cost vs revenue. Returns
 * DSI_OK or DSI_EIO. `title` may be NULL. */
int dsi_sim_svg_nodes(const dsi_sim_result *r, const dsi_sim_config *c, const char *path, const char *title);
int dsi_sim_svg_money(const dsi_sim_result *r, const dsi_sim_config *c, const char *path, const char *title);

#ifdef __cplusplus
}
#endif
#endif
