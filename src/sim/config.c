/* Default configuration (DeepSeek's published day) and the calibration fit. */
#include "sim/planner_impl.h"

#include <math.h>
#include <string.h>

/* Relative request rate at each hour of Beijing time (UTC+8): a daytime
 * plateau with an evening peak and a night trough, shaped after DeepSeek's
 * published node-count chart (peak 278, mean 226.75: peak/mean 1.23). */
static const double DIURNAL[24] = {
    1.00, 0.80, 0.64, 0.55, 0.50, 0.48, 0.52, 0.64, 0.82, 1.00, 1.12, 1.16,
    1.14, 1.12, 1.15, 1.17, 1.17, 1.14, 1.10, 1.10, 1.14, 1.17, 1.16, 1.10,
};

/* Fitted by `dsinfer sim fit` (dsi_sim_fit) on the default day. */
#define FIT_EFF_PREFILL 0.5939
#define FIT_EFF_DECODE 0.6750

void dsi_sim_config_default(dsi_sim_config *c) {
    memset(c, 0, sizeof *c);
    dsi_perf_params *p = &c->perf;
    dsi_sim_gpu_spec("h800", &p->gpu);
    p->overlap = 1;
    p->eplb_imbalance_prefill = 1.05; /* EPLB's residual imbalance (max/mean) */
    p->eplb_imbalance_decode = 1.10;
    p->dp_imbalance_prefill = 1.05;   /* prefill/decode load balancers' residual */
    p->dp_imbalance_decode = 1.05;
    p->mtp = 0;
    p->mtp_accept = 0.85;             /* DeepSeek-V3 report: 85-90% */
    p->eff_gemm = 1450.0 / 1979;      /* DeepGEMM 1358-1550 TFLOP/s */
    p->eff_attn = 620.0 / 989;        /* FlashMLA 580-660 TFLOP/s */
    p->eff_hbm = 3000.0 / 3350;       /* FlashMLA 3000 GB/s */
    p->eff_net_ll = 0.74;             /* DeepEP LL EP128: 192 us / 369 us at 128 tokens */
    p->eff_net_normal = 0.9;          /* DeepEP normal: 43-58 GB/s RDMA */
    p->kv_load_gbps_node = 40 * 1.073741824; /* 3FS: 40 GiB/s per client node */
    p->eff_prefill = FIT_EFF_PREFILL;
    p->eff_decode = FIT_EFF_DECODE;
    p->decode_overhead_s = 0;
    c->seed = 20250227;
    c->day_start = 1740628800; /* 2025-02-27 12:00 UTC+8 */
    c->tz_offset_min = 480;
    memcpy(c->diurnal, DIURNAL, sizeof DIURNAL);
    c->warmup_s = 7200;
    c->input_tokens = 608e9;
    c->hit_share = 342.0 / 608.0;
    c->output_tokens = 168e9;
    c->mean_output_len = 1000;
    /* With independent lengths the KV per output token is E[in] + E[out^2]/(2 E[out]);
     * E[in] = 3619 and the published 4,989 give an output CV of 1.32. */
    c->output_cv = 1.32;
    c->input_cv = 1.0;
    c->hit_concentration = 1.2;
    c->disk_cache = 1;
    c->batch_share = 0.3;
    c->prefill_nodes = 4;
    c->decode_nodes = 18;
    c->gpus_per_node = 8;
    c->prefill_tokens_per_gpu = 16384;
    c->scale_interval_s = 300;
    c->unit_start_s = 180;
    c->ttft_target_s = 5.0;
    c->prefill_util_target = 0.8;
    c->decode_tok_s = 20;
    c->decode_fill_up = 0.97;
    c->decode_fill_down = 0.88;
    c->usd_per_mtok[DSI_TOK_INPUT_HIT] = 0.14;
    c->usd_per_mtok[DSI_TOK_INPUT_MISS] = 0.55;
    c->usd_per_mtok[DSI_TOK_OUTPUT] = 2.19;
    c->paying_share = 1.0;
    c->gpu_cost_per_hour = 2.0;
    c->bundle = 64;
    c->decode_steps_per_event = 1;
}

int dsi_sim_fit(dsi_sim_config *c, int iters, dsi_sim_result **out) {
    if (!c || iters < 1) return dsi_error(DSI_EINVAL, "sim fit: bad argument");
    dsi_sim_result *r = NULL;
    for (int i = 0; i < iters; i++) {
        dsi_sim_result_destroy(r);
        r = NULL;
        int rc = dsi_sim_run(c, &r);
        if (rc) return rc;
        if (i + 1 == iters) break;
        /* Node throughput scales ~linearly with achieved efficiency. */
        c->perf.eff_prefill *= DSI_SIM_TARGET_IN_TOK_S / r->prefill_in_tok_s_node;
        c->perf.eff_decode *= DSI_SIM_TARGET_OUT_TOK_S / r->decode_out_tok_s_node;
    }
    if (out) *out = r;
    else dsi_sim_result_destroy(r);
    return DSI_OK;
}

double dsi_sim_window_share(const dsi_sim_config *c, int start_min, int end_min) {
    double in = 0, all = 0;
    for (int m = 0; m < 1440; m++) {
        double t = c->day_start + m * 60.0 + 30; /* minute m after day start */
        int local = (int)(fmod((t + c->tz_offset_min * 60.0) / 60.0, 1440.0));
        double w = dsi__sim_shape(c, t);
        int inside = start_min < end_min ? (local >= start_min && local < end_min)
                                         : (local >= start_min || local < end_min);
        all += w;
        if (inside) in += w;
    }
    return all > 0 ? in / all : 0;
}

double dsi_sim_rate_shape(const dsi_sim_config *c, double t) { return dsi__sim_shape(c, t); }
