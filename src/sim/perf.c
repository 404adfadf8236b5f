/* Performance model of one DeepSeek-V3 prefill or decode step on a unit of
 * GPUs running expert parallelism over all of them and data-parallel
 * attention (every GPU holds all attention and dense weights).
 *
 * Every kernel is a roofline: time = max(FLOPs / (peak x eff), bytes / (HBM x eff))
 * with the efficiencies DeepSeek published for its kernels (DeepGEMM,
 * FlashMLA, DeepEP). Per MoE layer:
 *   compute C(n) = attention projections + core attention + shared expert + routed experts
 *   comm    M(n) = dispatch (FP8 + scales) + combine (BF16)
 * With dual micro-batch overlap a layer costs 2 x max(C(n/2), M(n/2)) (weights are
 * read once per micro-batch, so small decode batches pay for the split);
 * without it C(n) + M(n). The end-to-end result is divided by a fitted
 * efficiency (eff_prefill / eff_decode) that absorbs what the roofline leaves
 * out: launch gaps, synchronisation, the scheduler, sampling. */
#include "dsinfer/sim.h"

#include <ctype.h>
#include <math.h>
#include <string.h>
#include <strings.h>

/* DeepSeek-V3 shapes (config.json). */
#define V3_LAYERS 61
#define V3_DENSE 3
#define V3_MOE (V3_LAYERS - V3_DENSE)
#define V3_HIDDEN 7168.0
#define V3_TOPK 8.0
#define V3_SLOTS 288.0 /* 256 routed experts + 32 redundant replicas */
/* Attention weights per layer: q_a 7168x1536, q_b 1536x128x192, kv_a 7168x576,
 * kv_b 512x128x256, o 128x128x7168, plus the 7168x256 router. */
#define V3_ATTN_PARAMS (7168.0 * 1536 + 1536.0 * 128 * 192 + 7168.0 * 576 + 512.0 * 128 * 256 + \
                        128.0 * 128 * 7168 + 7168.0 * 256)
#define V3_EXPERT_PARAMS (3.0 * 7168 * 2048)   /* gate, up, down */
#define V3_DENSE_MLP_PARAMS (3.0 * 7168 * 18432)
#define V3_HEAD_PARAMS (7168.0 * 129280)      /* BF16 */
/* Core attention FLOPs per (query, key) pair per layer: prefill runs MLA as
 * 128-head MHA with 192-dim QK and 128-dim V; decode absorbs the up-projections
 * and attends over the 576-dim latent (512 + 64 rope) with 512-dim values. */
#define V3_ATTN_FLOPS_PREFILL (2.0 * 128 * (192 + 128))
#define V3_ATTN_FLOPS_DECODE (2.0 * 128 * (576 + 512))
#define V3_KV_BYTES_LAYER (576.0 * 2) /* BF16 latent + rope key */
#define V3_KV_BYTES_TOKEN (V3_KV_BYTES_LAYER * V3_LAYERS)
#define V3_DISPATCH_BYTES (7168.0 + 7168.0 / 128 * 4) /* FP8 + one fp32 scale per 128 */
#define V3_COMBINE_BYTES (7168.0 * 2)                 /* BF16 */
/* Per-GPU weights with DP attention and 2 routed + 1 shared expert per layer
 * (decode) or 9 + 1 (prefill); embedding and head in BF16. */
#define V3_EMBED_BYTES (2.0 * 2 * 7168 * 129280)

int dsi_sim_gpu_spec(const char *name, dsi_gpu_spec *out) {
    if (!name || !out) return dsi_error(DSI_EINVAL, "gpu: NULL argument");
    memset(out, 0, sizeof *out);
    if (!strcasecmp(name, "h800")) {
        *out = (dsi_gpu_spec){"H800", 989, 1979, 3.35, 80, 400, 50};
    } else if (!strcasecmp(name, "h100")) {
        *out = (dsi_gpu_spec){"H100", 989, 1979, 3.35, 80, 900, 50};
    } else if (!strcasecmp(name, "h200")) {
        *out = (dsi_gpu_spec){"H200", 989, 1979, 4.8, 141, 900, 50};
    } else {
        return dsi_error(DSI_EINVAL, "unknown GPU '%s' (expected h800, h100 or h200)", name);
    }
    return DSI_OK;
}

static double roof(double flops, double tflops, double eff_c, double bytes, double tbps, double eff_m) {
    double tc = flops / (tflops * 1e12 * eff_c);
    double tm = bytes / (tbps * 1e12 * eff_m);
    return tc > tm ? tc : tm;
}

typedef struct layer_cost {
    double gemm, attn, comm;
} layer_cost;

/* One MoE layer for `n` tokens per GPU; `attn_flops`/`attn_bytes` are the core
 * attention's for those tokens; `slots` routed expert replicas per GPU. */
static layer_cost moe_layer(const dsi_perf_params *p, double n, double attn_flops, double attn_bytes,
                            double slots, double eplb, int decode, int n_nodes) {
    const dsi_gpu_spec *g = &p->gpu;
    layer_cost c;
    double proj = roof(2 * V3_ATTN_PARAMS * n, g->fp8_tflops, p->eff_gemm, V3_ATTN_PARAMS, g->hbm_tbps, p->eff_hbm);
    double shared =
        roof(2 * V3_EXPERT_PARAMS * n, g->fp8_tflops, p->eff_gemm, V3_EXPERT_PARAMS, g->hbm_tbps, p->eff_hbm);
    double copies = n * V3_TOPK * eplb; /* routed token copies this GPU's slots receive */
    double routed = roof(2 * V3_EXPERT_PARAMS * copies, g->fp8_tflops, p->eff_gemm, V3_EXPERT_PARAMS * slots,
                         g->hbm_tbps, p->eff_hbm);
    c.gemm = proj + shared + routed;
    c.attn = roof(attn_flops, g->bf16_tflops, p->eff_attn, attn_bytes, g->hbm_tbps, p->eff_hbm);
    double remote = n_nodes > 1 ? (n_nodes - 1.0) / n_nodes : 0;
    double nvl = g->nvlink_gbps / 2 * 1e9; /* one direction */
    double rdma = g->rdma_gbps * 1e9;
    if (decode) {
        /* Low-latency kernels: one message per (token, expert), no node dedup. */
        double bytes = n * V3_TOPK * (V3_DISPATCH_BYTES + V3_COMBINE_BYTES) * eplb;
        double t_r = bytes * remote / (rdma * p->eff_net_ll);
        double t_n = bytes * (1 - remote) / (nvl * p->eff_net_ll);
        c.comm = t_r > t_n ? t_r : t_n;
    } else {
        /* Normal kernels: a token crosses RDMA once per remote node it needs
         * (node-limited routing: at most 4 nodes), then fans out over NVLink. */
        double nodes_hit = n_nodes * (1 - pow(1 - 1.0 / n_nodes, V3_TOPK));
        if (nodes_hit > 4) nodes_hit = 4;
        double remote_hit = nodes_hit * remote;
        double per_tok = V3_DISPATCH_BYTES + V3_COMBINE_BYTES;
        double t_r = n * remote_hit * per_tok * eplb / (rdma * p->eff_net_normal);
        double t_n = n * V3_TOPK * per_tok * eplb / (nvl * p->eff_net_normal);
        c.comm = t_r > t_n ? t_r : t_n;
    }
    return c;
}

static double dense_layer(const dsi_perf_params *p, double n, double attn_flops, double attn_bytes) {
    const dsi_gpu_spec *g = &p->gpu;
    double w = V3_ATTN_PARAMS + V3_DENSE_MLP_PARAMS;
    return roof(2 * w * n, g->fp8_tflops, p->eff_gemm, w, g->hbm_tbps, p->eff_hbm) +
           roof(attn_flops, g->bf16_tflops, p->eff_attn, attn_bytes, g->hbm_tbps, p->eff_hbm);
}

/* Whole-step time from one MoE layer's parts and the rest. */
static double assemble(const dsi_perf_params *p, layer_cost full, layer_cost half, double dense_s, double head_s,
                       dsi_perf_breakdown *bd) {
    double compute_full = full.gemm + full.attn;
    double layer;
    if (p->overlap) {
        double ch = half.gemm + half.attn;
        layer = 2 * (ch > half.comm ? ch : half.comm);
    } else {
        layer = compute_full + full.comm;
    }
    double t = V3_MOE * layer + V3_DENSE * dense_s + head_s;
    if (bd) {
        bd->gemm_s = V3_MOE * full.gemm;
        bd->attn_s = V3_MOE * full.attn;
        bd->comm_s = V3_MOE * full.comm;
        bd->other_s = V3_DENSE * dense_s + head_s;
        bd->total_s = t;
    }
    return t;
}

double dsi_perf_prefill_step(const dsi_perf_params *p, int n_gpus, double miss, double ctx, double hit,
                             dsi_perf_breakdown *bd) {
    if (miss <= 0 && hit <= 0) {
        if (bd) memset(bd, 0, sizeof *bd);
        return 0;
    }
    int n_nodes = n_gpus / 8 > 0 ? n_gpus / 8 : 1;
    double slots = V3_SLOTS / n_gpus;
    double n = miss * p->dp_imbalance_prefill;
    double af = V3_ATTN_FLOPS_PREFILL * ctx * p->dp_imbalance_prefill;
    double ab = 0; /* prefill attention reads K/V once per tile: compute-bound */
    layer_cost full = moe_layer(p, n, af, ab, slots, p->eplb_imbalance_prefill, 0, n_nodes);
    layer_cost half = moe_layer(p, n / 2, af / 2, ab, slots, p->eplb_imbalance_prefill, 0, n_nodes);
    double dense = dense_layer(p, n, af, ab);
    double t = assemble(p, full, half, dense, 0, bd);
    /* KV of cache hits streams in from the disk store while compute runs. */
    double kv = hit * V3_KV_BYTES_TOKEN / (p->kv_load_gbps_node * 1e9 / 8);
    if (kv > t) t = kv;
    t /= p->eff_prefill;
    if (bd) bd->total_s = t;
    return t;
}

double dsi_perf_decode_step(const dsi_perf_params *p, int n_gpus, double reqs, double kv_len,
                            dsi_perf_breakdown *bd) {
    if (reqs <= 0) {
        if (bd) memset(bd, 0, sizeof *bd);
        return 0;
    }
    const dsi_gpu_spec *g = &p->gpu;
    int n_nodes = n_gpus / 8 > 0 ? n_gpus / 8 : 1;
    double slots = V3_SLOTS / n_gpus;
    double b = reqs * p->dp_imbalance_decode;
    double q = p->mtp ? 2.0 : 1.0; /* MTP verifies one draft token per request per step */
    double n = b * q;
    double af = V3_ATTN_FLOPS_DECODE * n * kv_len;
    double ab = V3_KV_BYTES_LAYER * b * kv_len; /* both queries of a request share one KV read */
    layer_cost full = moe_layer(p, n, af, ab, slots, p->eplb_imbalance_decode, 1, n_nodes);
    layer_cost half = moe_layer(p, n / 2, af / 2, ab / 2, slots, p->eplb_imbalance_decode, 1, n_nodes);
    double dense = dense_layer(p, n, af, ab);
    double head = roof(2 * V3_HEAD_PARAMS * n, g->bf16_tflops, p->eff_gemm, 2 * V3_HEAD_PARAMS, g->hbm_tbps,
                       p->eff_hbm);
    if (p->mtp) head += dense_layer(p, b, af / q, ab) + head / q; /* the MTP module drafts the next token */
    double t = assemble(p, full, half, dense, head, bd) / p->eff_decode + p->decode_overhead_s;
    if (bd) bd->total_s = t;
    return t;
}

double dsi_perf_decode_mem_reqs(const dsi_perf_params *p, int n_gpus, double kv_len) {
    double slots = V3_SLOTS / n_gpus;
    double weights = V3_LAYERS * V3_ATTN_PARAMS + V3_DENSE * V3_DENSE_MLP_PARAMS +
                     V3_MOE * (slots + 1) * V3_EXPERT_PARAMS + V3_EMBED_BYTES;
    double free_b = p->gpu.hbm_gb * 1e9 * 0.92 - weights - 4e9; /* 8% reserve, 4 GB activations */
    double per_req = V3_KV_BYTES_TOKEN * (kv_len > 1 ? kv_len : 1) * p->dp_imbalance_decode;
    return free_b > 0 ? free_b / per_req : 0;
}

double dsi_perf_decode_capacity(const dsi_perf_params *p, int n_gpus, double kv_len, double tok_s) {
    double tps = p->mtp ? 1 + p->mtp_accept : 1;
    double hi = dsi_perf_decode_mem_reqs(p, n_gpus, kv_len), lo = 0;
    if (hi <= 0) return 0;
    if (tps / dsi_perf_decode_step(p, n_gpus, hi, kv_len, NULL) >= tok_s) return hi;
    for (int i = 0; i < 60; i++) {
        double mid = 0.5 * (lo + hi);
        if (tps / dsi_perf_decode_step(p, n_gpus, mid, kv_len, NULL) >= tok_s) lo = mid;
        else hi = mid;
    }
    return lo;
}
