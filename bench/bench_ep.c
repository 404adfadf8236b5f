/* Expert parallelism: how much communication the dual micro-batch overlap
 * hides, on loopback and on an emulated inter-node link.
 *
 *   mpirun --oversubscribe -np 2 build/bench_ep [--decode 128] [--prefill 512] [--steps 3]
 *
 * A synthetic DeepSeek-shaped model (random FP8 weights, built in memory on
 * every rank) runs decode steps (--decode sequences per rank, one token each,
 * over a --context token cache: at 2048 the core attention costs about what
 * the layer's matmuls cost, as on V3 at its 4K average) and prefill steps (--prefill tokens per rank in
 * two sequences). For each, per MoE layer: dispatch, combine, compute and idle
 * wait times; and the step time overlapped vs no-overlap vs compute-only
 * (per layer the busiest rank's compute, summed: the no-overlap step with
 * free transfers), with the fraction of exposed
 * communication the overlap hides = 1 - (overlap - its compute-only) /
 * (no_overlap - its compute-only).
 *
 * The emulated link keeps the H800 proportions: on DeepSeek-V3 a token costs
 * ~1.2 GFLOP per MoE layer (37B active / 61 layers, x2) = 2.07 us at ~580
 * TFLOP/s effective (DeepSeek's prefill profile: 62.7k tok/s per 8-GPU node),
 * and moves ~87 KB per layer over RDMA (FP8 dispatch to <= 4 nodes, BF16
 * combine back) = 1.74 us at 50 GB/s, so communication = 0.84 x compute;
 * an RDMA message costs ~10 us of latency. Here the link's bandwidth is set
 * so that this run's bytes per token-layer take 0.84 x this run's compute
 * per token-layer, and the latency is 10 us stretched by the same time
 * dilation (our compute per token-layer / 2.07 us). Bandwidth and latency are
 * injected in the transport (sender-side queue, see src/ep/transport_mpi.c). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dsinfer/engine.h"
#include "dsinfer/ep.h"
#include "dsinfer/model.h"

#ifdef DSI_HAVE_MPI
#include <mpi.h>

#define H800_COMM_OVER_COMPUTE 0.84
#define H800_TOKEN_LAYER_US 2.07
#define H800_LATENCY_US 10.0

typedef struct run_result {
    double step_s;                 /* median over steps of the slowest rank's step */
    double compute_only_s;         /* sum over layers of the busiest rank's compute, per step */
    dsi_ep_layer_stats *layers;    /* per step, mean over ranks */
} run_result;

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static int g_rank, g_size;

static void die(const char *what) {
    fprintf(stderr, "bench_ep rank %d: %s: %s\n", g_rank, what, dsi_last_error());
    dsi_ep_abort(1);
}

/* Runs `steps` timed steps of the batch with the given EP options. */
static void run_mode(dsi_engine *e, const dsi_ep_opts *o, const dsi_seq_step *batch, int n, int steps, int n_layers,
                     run_result *r) {
    dsi_ep *ep;
    if (dsi_ep_create(e, o, &ep) != DSI_OK) die("ep create");
    if (dsi_ep_step(ep, batch, n) != DSI_OK) die("warm-up step"); /* pages in this rank's experts */
    dsi_ep_reset_stats(ep);
    double *dt = calloc(steps, sizeof(double)), *dmax = calloc(steps, sizeof(double));
    for (int s = 0; s < steps; s++) {
        MPI_Barrier(MPI_COMM_WORLD);
        double t0 = dsi_now();
        if (dsi_ep_step(ep, batch, n) != DSI_OK) die("step");
        dt[s] = dsi_now() - t0;
    }
    if (dsi_ep_idle(ep) != DSI_OK) die("idle");
    MPI_Allreduce(dt, dmax, steps, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    qsort(dmax, steps, sizeof(double), cmp_double);
    r->step_s = dmax[steps / 2];
    dsi_ep_layer_stats *mine = calloc(n_layers, sizeof *mine);
    double *comp = calloc(n_layers, sizeof(double)), *comp_max = calloc(n_layers, sizeof(double));
    dsi_ep_get_stats(ep, mine);
    int nd = sizeof(dsi_ep_layer_stats) / sizeof(double) * n_layers;
    MPI_Allreduce(mine, r->layers, nd, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    for (int l = 0; l < n_layers; l++) comp[l] = mine[l].compute_s / steps;
    MPI_Allreduce(comp, comp_max, n_layers, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    double *v = (double *)r->layers;
    for (int i = 0; i < nd; i++) v[i] /= (double)g_size * steps;
    r->compute_only_s = 0;
    for (int l = 0; l < n_layers; l++) r->compute_only_s += comp_max[l];
    free(mine); free(comp); free(comp_max); free(dt); free(dmax);
    dsi_ep_destroy(ep);
}

static void report(const char *name, const dsi_config *c, int tokens, const run_result *ov, const run_result *no) {
    if (g_rank) return;
    /* compute-only: each run's step with free transfers (per layer its busiest
     * rank's compute, summed); what a run exposes is its step minus that */
    double comp = no->compute_only_s, exp_no = no->step_s - comp, exp_ov = ov->step_s - ov->compute_only_s;
    printf("  %-9s per MoE layer (ms per step, mean over ranks; overlap run | no-overlap run):\n", name);
    printf("    layer  dispatch      combine       compute        wait\n");
    for (int l = 0; l < c->n_layers; l++) {
        const dsi_ep_layer_stats *a = &ov->layers[l], *b = &no->layers[l];
        if (a->dispatch_s == 0 && b->dispatch_s == 0) continue;
        printf("    %5d  %5.2f|%5.2f   %5.2f|%5.2f   %6.2f|%6.2f   %5.2f|%5.2f\n", l, a->dispatch_s * 1e3,
               b->dispatch_s * 1e3, a->combine_s * 1e3, b->combine_s * 1e3, a->compute_s * 1e3, b->compute_s * 1e3,
               a->wait_s * 1e3, b->wait_s * 1e3);
    }
    printf("    step: overlap %.1f ms, no-overlap %.1f ms; compute-only %.1f ms (overlap run: two half batches %.1f ms); "
           "%d tokens per rank\n",
           ov->step_s * 1e3, no->step_s * 1e3, comp * 1e3, ov->compute_only_s * 1e3, tokens);
    printf("    overlap / compute-only = %.2f, no-overlap / compute-only = %.2f, overlap / no-overlap = %.2f\n",
           ov->step_s / ov->compute_only_s, no->step_s / comp, ov->step_s / no->step_s);
    double wa = 0, ca = 0, wb = 0, cb = 0;
    for (int l = 0; l < c->n_layers; l++)
        wa += ov->layers[l].compute_s, ca += ov->layers[l].compute_cpu_s, wb += no->layers[l].compute_s,
            cb += no->layers[l].compute_cpu_s;
    printf("    compute wall / CPU time: overlap run %.2f, no-overlap run %.2f (above 1: ranks were descheduled;\n"
           "    this machine's cores are shared, which inflates whichever run computes on both ranks at once)\n",
           ca > 0 ? wa / ca : 0, cb > 0 ? wb / cb : 0);
    printf("    communication exposed: %.1f ms with overlap vs %.1f ms without: the overlap hides %.0f%%\n",
           exp_ov * 1e3, exp_no * 1e3, exp_no > 0 ? (1 - exp_ov / exp_no) * 100 : 0.0);
}

int main(int argc, char **argv) {
    int decode = 128, prefill = 512, context = 2048, steps = 5, threads = 1;
    const char *dispatch = "fp8";
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--decode") && i + 1 < argc) decode = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--prefill") && i + 1 < argc) prefill = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--context") && i + 1 < argc) context = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--steps") && i + 1 < argc) steps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc) threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--dispatch") && i + 1 < argc) dispatch = argv[++i];
        else {
            printf("usage: mpirun -np N bench_ep [--decode B] [--prefill T] [--context C] [--steps S] [--threads N] "
                   "[--dispatch fp8|bf16]\n");
            return strcmp(argv[i], "--help") ? 2 : 0;
        }
    }
    if (!dsi_ep_launched()) {
        printf("bench_ep: run it under mpirun with 2 or more ranks, e.g.\n"
               "  OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 mpirun --oversubscribe -np 2 %s\n", argv[0]);
        return 0;
    }
    if (dsi_ep_init() != DSI_OK) die("init");
    g_rank = dsi_ep_rank();
    g_size = dsi_ep_size();
    /* synthetic model: DeepSeek-V3's proportions at 1/7 width */
    dsi_config c;
    dsi_config_preset(DSI_PRESET_TINY, 0, 1, &c);
    c.vocab_size = 4096; c.hidden = 1024; c.dense_inter = 2048; c.moe_inter = 256; c.n_layers = 5;
    c.first_k_dense = 1; c.n_heads = 8; c.q_lora_rank = 384; c.kv_lora_rank = 256; c.qk_rope_dim = 32;
    c.qk_nope_dim = 64; c.v_head_dim = 64; c.n_experts = 32; c.n_experts_per_tok = 8; c.n_group = 8;
    c.topk_group = 4; c.n_shared_experts = 1;
    dsi_model *m;
    if (dsi_make_model_memory(&c, 7, &m) != DSI_OK) die("model");
    int max_tokens = DSI_MAX(decode, prefill);
    int per_seq_blocks = DSI_CEIL_DIV(DSI_MAX(context + 1, prefill / 2), DSI_KV_BLOCK_TOKENS);
    int n_seq = DSI_MAX(decode, 2);
    dsi_kv_pool *kv;
    if (dsi_kv_pool_create(c.n_layers, dsi_config_kv_dim(&c), DSI_KV_BLOCK_TOKENS, n_seq * per_seq_blocks + 1, &kv))
        die("kv");
    dsi_engine *e;
    dsi_engine_opts eo = {.n_threads = threads, .max_tokens = max_tokens};
    if (dsi_engine_create(m, kv, &eo, &e) != DSI_OK) die("engine");
    int32_t *blocks = malloc(sizeof(int32_t) * n_seq * per_seq_blocks);
    for (int i = 0; i < n_seq * per_seq_blocks; i++) blocks[i] = dsi_kv_alloc(kv);
    int32_t *ids = malloc(sizeof(int32_t) * DSI_MAX(prefill, context + 1) * n_seq);
    for (int i = 0; i < DSI_MAX(prefill, context + 1) * n_seq; i++) ids[i] = (i * 7919 + g_rank * 31) % c.vocab_size;
    dsi_seq_step *batch = calloc(n_seq, sizeof *batch);
    dsi_ep_opts base = {.dispatch = !strcmp(dispatch, "bf16") ? DSI_EP_BF16 : DSI_EP_FP8, .timeout_ms = 600000};
    int nl = c.n_layers;
    run_result r[4];
    for (int k = 0; k < 4; k++) r[k].layers = calloc(nl, sizeof(dsi_ep_layer_stats));
    if (g_rank == 0)
        printf("bench_ep: %d ranks, model hidden %d, %d layers (%d MoE), %d experts top-%d, inter %d, %s dispatch, "
               "%d thread(s) per rank\n",
               g_size, c.hidden, c.n_layers, c.n_layers - c.first_k_dense, c.n_experts, c.n_experts_per_tok,
               c.moe_inter, dispatch, threads);

    for (int mode = 0; mode < 2; mode++) {
        int tokens, n;
        if (mode == 0) {
            /* decode: one token per sequence at position `context`; the cache
             * before it is left as allocated (its values do not change the cost) */
            if (decode <= 0) continue;
            for (int j = 0; j < decode; j++)
                batch[j] = (dsi_seq_step){ids + (size_t)j * (context + 1) + context, 1, context,
                                          blocks + (size_t)j * per_seq_blocks, per_seq_blocks, DSI_LOGITS_NONE, NULL};
            n = decode;
            tokens = decode;
        } else {
            if (prefill <= 1) continue;
            batch[0] = (dsi_seq_step){ids, prefill / 2, 0, blocks, per_seq_blocks, DSI_LOGITS_NONE, NULL};
            batch[1] = (dsi_seq_step){ids + prefill / 2, prefill - prefill / 2, 0, blocks + per_seq_blocks,
                                      per_seq_blocks, DSI_LOGITS_NONE, NULL};
            n = 2;
            tokens = prefill;
        }
        const char *name = mode ? "prefill" : "decode";
        /* loopback */
        dsi_ep_opts o = base;
        run_mode(e, &o, batch, n, steps, nl, &r[0]);
        o.no_overlap = 1;
        run_mode(e, &o, batch, n, steps, nl, &r[1]);
        if (g_rank == 0) printf("\n%s, loopback (shared memory):\n", name);
        report(name, &c, tokens, &r[0], &r[1]);
        /* emulated link scaled from the loopback no-overlap run */
        double comp = r[1].compute_only_s, bytes = 0;
        for (int l = 0; l < nl; l++) bytes += r[1].layers[l].sent_bytes;
        int n_moe = c.n_layers - c.first_k_dense;
        double token_layer_s = comp / ((double)tokens * c.n_layers);
        double bytes_token_layer = bytes / ((double)tokens * n_moe);
        double bw = bytes_token_layer / (H800_COMM_OVER_COMPUTE * token_layer_s);
        double lat_us = H800_LATENCY_US * token_layer_s * 1e6 / H800_TOKEN_LAYER_US;
        o = base;
        o.link_gbps = bw / 1e9;
        o.link_latency_us = lat_us;
        run_mode(e, &o, batch, n, steps, nl, &r[2]);
        o.no_overlap = 1;
        run_mode(e, &o, batch, n, steps, nl, &r[3]);
        if (g_rank == 0)
            printf("\n%s, emulated inter-node link: %.1f MB/s per rank, %.0f us latency (H800 proportions: "
                   "%.0f bytes and %.1f us of compute per token-layer here)\n",
                   name, bw / 1e6, lat_us, bytes_token_layer, token_layer_s * 1e6);
        report(name, &c, tokens, &r[2], &r[3]);
    }
    for (int k = 0; k < 4; k++) free(r[k].layers);
    free(batch); free(ids); free(blocks);
    dsi_engine_destroy(e);
    dsi_kv_pool_destroy(kv);
    dsi_model_destroy(m);
    dsi_ep_finalize();
    return 0;
}
#else
int main(void) {
    printf("bench_ep: this build has no MPI (install libopenmpi-dev, see scripts/deps.sh)\n");
    return 0;
}
#endif
