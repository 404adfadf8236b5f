/* The CUDA backend's acceptance figures, each next to its bound or peer:
 *  - FP8 GEMM TFLOP/s at DeepSeek's shapes, cuBLASLt (block-scaled, incl.
 *    activation quantisation) and our simple kernel, against DeepGEMM's H800
 *    figures and cuBLASLt's 8192^3 rate measured in the same run;
 *  - grouped expert GEMMs (contiguous and masked layouts) against DeepGEMM;
 *  - MLA decode GB/s and TFLOP/s (batch 64/128, 4K context, 128 heads,
 *    BF16 latent cache) against FlashMLA's 3000 GB/s / 580 TFLOP/s;
 *  - with --model DIR (make-model --preset v3-layers:N): decode tok/s at
 *    batch 128, 4K context, and prefill tok/s over 16K tokens, normalised to
 *    61 layers, against DeepSeek's ~1.85k / ~9.2k tok/s per H800.
 *
 *     bench_cuda [--model DIR] [--simple] [--quick]
 *
 * Without a GPU it says so and exits 0. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dsinfer/cuda.h"
#include "dsinfer/model.h"

#ifndef DSI_HAVE_CUDA
int main(void) {
    printf("bench_cuda: this build has no CUDA backend (nvcc not found): nothing to measure\n");
    return 0;
}
#else
#include "cuda/cuda_impl.h"

static int quick;

static uint64_t rng = 88172645463325252ull;
static uint64_t next(void) { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return rng; }

/* Device buffer of n bytes of plausible data: FP8 codes that are never NaN,
 * or floats in [-1, 1] (n_floats > 0). Generated on the host in 1 MiB pieces. */
static void *dev_rand(size_t bytes, int floats) {
    void *d;
    if (dsi__cuda_malloc(&d, bytes)) { fprintf(stderr, "%s\n", dsi_last_error()); exit(1); }
    size_t piece = DSI_MIN(bytes, (size_t)1 << 20);
    unsigned char *h = malloc(piece);
    for (size_t i = 0; i < piece; i++) {
        if (floats && i % 4 == 0 && i + 4 <= piece) {
            float f = (float)((next() >> 40) * (1.0 / 16777216.0)) * 2 - 1;
            memcpy(h + i, &f, 4);
            i += 3;
        } else {
            unsigned char b = (unsigned char)next();
            h[i] = (b & 0x7f) == 0x7f ? b ^ 1 : b;
        }
    }
    for (size_t off = 0; off < bytes; off += piece) dsi__cuda_h2d((char *)d + off, h, DSI_MIN(piece, bytes - off));
    free(h);
    return d;
}

static dsi_dmat fp8_weight(int batch, int N, int K) {
    dsi_dmat W = {.dtype = DSI_F8_E4M3, .rows = N, .cols = K, .batch = batch, .block_rows = 128, .block_cols = 128};
    W.scale_rows = DSI_CEIL_DIV(N, 128);
    W.scale_cols = DSI_CEIL_DIV(K, 128);
    W.data = dev_rand((size_t)batch * N * K, 0);
    size_t ns = (size_t)batch * W.scale_rows * W.scale_cols;
    float *s = malloc(sizeof(float) * ns);
    for (size_t i = 0; i < ns; i++) s[i] = 1.0f / 256;
    dsi__cuda_malloc((void **)&W.scale, sizeof(float) * ns);
    dsi__cuda_h2d(W.scale, s, sizeof(float) * ns);
    free(s);
    return W;
}

typedef int (*run_fn)(void *ctx);

/* Seconds per call: warm-up, then enough calls for ~0.3 s (fewer with --quick). */
static double time_it(run_fn f, void *ctx) {
    dsi_cuda_timer *t;
    dsi__cuda_timer_create(&t);
    if (f(ctx) || f(ctx) || dsi__cuda_sync()) { fprintf(stderr, "  failed: %s\n", dsi_last_error()); return -1; }
    dsi__cuda_timer_start(t);
    f(ctx);
    double one = dsi__cuda_timer_stop(t);
    int n = (int)DSI_MAX(1.0, DSI_MIN(200.0, (quick ? 0.05 : 0.3) / DSI_MAX(one, 1e-6)));
    dsi__cuda_timer_start(t);
    for (int i = 0; i < n; i++) f(ctx);
    double s = dsi__cuda_timer_stop(t) / n;
    dsi__cuda_timer_destroy(t);
    return s;
}

/* ------------------------------------------------------------------ dense GEMM */

typedef struct gemm_ctx {
    dsi_lt *lt;
    dsi_dmat *W;
    float *x, *y;
    uint8_t *xq;
    float *xs;
    int M;
    dsi_gemm_args a;
} gemm_ctx;

static int run_lt(void *p) {
    gemm_ctx *c = p;
    return dsi__lt_gemm(c->lt, c->W, c->x, c->M, c->W->cols, c->y, c->W->rows, 0, c->xq, c->xs, NULL);
}
/* cuBLASLt on activations already quantised (as DeepGEMM is measured) */
static int run_lt_q(void *p) {
    gemm_ctx *c = p;
    return dsi__lt_gemm_q(c->lt, c->W, c->xq, c->xs, c->M, c->y, c->W->rows, 0, NULL);
}
/* one cuBLASLt call per expert (rows known on the host), pre-quantised */
static int run_lt_experts(void *p) {
    gemm_ctx *c = p;
    int N = c->W->rows, K = c->W->cols, rc = DSI_OK;
    for (int z = 0; z < c->a.Z && !rc; z++) {
        dsi_dmat v = *c->W;
        v.batch = 1;
        v.data = (uint8_t *)c->W->data + (size_t)z * N * K;
        /* the stored scales serve cuBLASLt as they are here: K/128 is a multiple of 4 in every shape benched */
        v.scale = v.scale_lt = c->W->scale + (size_t)z * c->W->scale_rows * c->W->scale_cols;
        size_t r0 = (size_t)z * c->M;
        rc = dsi__lt_gemm_q(c->lt, &v, c->xq + r0 * K, c->xs + r0 * DSI_CEIL_DIV(K, 128), c->M, c->y + r0 * N, N, 0,
                            NULL);
    }
    return rc;
}
static int run_simple(void *p) { return dsi__cuda_gemm(&((gemm_ctx *)p)->a, NULL); }
/* grouped FP8 tensor-core kernel on pre-quantised activations (as DeepGEMM is measured) */
static int run_fp8(void *p) {
    gemm_ctx *c = p;
    return dsi__cuda_gemm_fp8(c->W, c->xq, c->xs, c->M, c->y, c->W->rows, 0, c->a.d_group_offset, c->a.Z, c->M, NULL);
}

static double dense(dsi_lt *lt, int M, int N, int K, double peer, const char *peer_name, int simple_too) {
    dsi_dmat W = fp8_weight(1, N, K);
    dsi__lt_prepare_weight(&W);
    gemm_ctx c = {.lt = lt, .W = &W, .x = dev_rand((size_t)M * K * 4, 1), .y = dev_rand((size_t)M * N * 4, 1),
                  .xq = dev_rand((size_t)M * K, 0), .xs = dev_rand((size_t)M * DSI_CEIL_DIV(K, 128) * 4, 1), .M = M};
    c.a = (dsi_gemm_args){.W = &W, .d_x = c.x, .ldx = K, .d_y = c.y, .ldy = N, .M = M, .N = N, .K = K, .Z = 1};
    double flop = 2.0 * M * N * K;
    double s = time_it(run_lt_q, &c), tf = s > 0 ? flop / s * 1e-12 : 0;
    double sq = time_it(run_lt, &c), tq = sq > 0 ? flop / sq * 1e-12 : 0;
    printf("  dense  M=%5d N=%5d K=%5d  cuBLASLt %7.1f TFLOP/s", M, N, K, tf);
    if (peer > 0) printf("  = %.2fx %s %.0f", tf / peer, peer_name, peer);
    printf(" | with activation quantisation %6.1f", tq);
    if (simple_too && !quick) {
        double s2 = time_it(run_simple, &c);
        if (s2 > 0) printf("  | simple kernel %6.1f TFLOP/s (%.2fx cuBLASLt)", flop / s2 * 1e-12, s / s2);
    }
    printf("\n");
    dsi__cuda_free(c.x); dsi__cuda_free(c.y); dsi__cuda_free(c.xq); dsi__cuda_free(c.xs);
    dsi__cuda_free_mat(&W);
    return tf;
}

/* ------------------------------------------------------------------ grouped GEMM */

/* Device group offsets for E groups of `rows` rows each. */
static int *even_offsets(int E, int rows) {
    int *off = malloc(sizeof(int) * (E + 1)), *doff;
    for (int e = 0; e <= E; e++) off[e] = e * rows;
    dsi__cuda_malloc((void **)&doff, sizeof(int) * (E + 1));
    dsi__cuda_h2d(doff, off, sizeof(int) * (E + 1));
    free(off);
    return doff;
}

static void grouped(dsi_lt *lt, int E, int rows, int N, int K, double lo, double hi, const char *layout,
                    double lt_peak) {
    dsi_dmat W = fp8_weight(E, N, K);
    int *doff = even_offsets(E, rows);
    gemm_ctx c = {0};
    c.x = dev_rand((size_t)E * rows * K * 4, 1);
    c.y = dev_rand((size_t)E * rows * N * 4, 1);
    c.a = (dsi_gemm_args){.W = &W, .d_x = c.x, .ldx = K, .d_y = c.y, .ldy = N, .M = rows, .N = N, .K = K, .Z = E,
                          .d_group_offset = doff};
    c.xq = dev_rand((size_t)E * rows * K, 0);
    c.xs = dev_rand((size_t)E * rows * DSI_CEIL_DIV(K, 128) * 4, 1);
    c.W = &W;
    c.M = rows;
    c.lt = lt;
    double flop = 2.0 * E * rows * N * K;
    double s = quick ? 0 : time_it(run_simple, &c), tf = s > 0 ? flop / s * 1e-12 : 0;
    double s8 = time_it(run_fp8, &c), tf8 = s8 > 0 ? flop / s8 * 1e-12 : 0;
    double sl = time_it(run_lt_experts, &c), tl = sl > 0 ? flop / sl * 1e-12 : 0;
    char peer[64];
    if (lo == hi) snprintf(peer, sizeof peer, "%.0f", hi);
    else snprintf(peer, sizeof peer, "%.0f-%.0f (vs the high end)", lo, hi);
    printf("  grouped %-10s %d x %5d rows N=%5d K=%5d  cuBLASLt per expert (host row counts) %6.1f TFLOP/s = %.3fx DeepGEMM H800 %s,"
           " %.2fx dense cuBLASLt here | fp8 mma.sync kernel %6.1f (%.3fx) | simple kernel %5.1f\n",
           layout, E, rows, N, K, tl, tl / hi, peer, lt_peak > 0 ? tl / lt_peak : 0, tf8, tf8 / hi, tf);
    dsi__cuda_free(c.xq); dsi__cuda_free(c.xs);
    dsi__cuda_free(c.x); dsi__cuda_free(c.y); dsi__cuda_free(doff);
    dsi__cuda_free_mat(&W);
}

/* Device memory bandwidth, measured here: a 2 GiB device-to-device copy,
 * bytes read plus bytes written. */
typedef struct copy_ctx { void *a, *b; size_t n; } copy_ctx;
static int run_copy(void *p) {
    copy_ctx *c = p;
    return dsi__cuda_d2d(c->b, c->a, c->n);
}
static double copy_bandwidth(void) {
    copy_ctx c = {.n = (size_t)1 << 31};
    if (dsi__cuda_malloc(&c.a, c.n) || dsi__cuda_malloc(&c.b, c.n)) return 0;
    dsi__cuda_memset(c.a, 1, c.n);
    double s = time_it(run_copy, &c), gbs = s > 0 ? 2.0 * c.n / s * 1e-9 : 0;
    dsi__cuda_free(c.a);
    dsi__cuda_free(c.b);
    printf("  device memory: %.0f GB/s (2 GiB device-to-device copy, read + write)\n", gbs);
    return gbs;
}

/* Decode's expert GEMM as the engine runs it in a CUDA graph: all E experts'
 * weights read once for a few rows each (routing spread evenly), FP8 mma
 * kernel with 16-row tiles; against reading the weights at copy bandwidth. */
static void grouped_decode(int E, int rows, int N, int K, double bw) {
    dsi_dmat W = fp8_weight(E, N, K);
    int *doff = even_offsets(E, rows);
    gemm_ctx c = {0};
    c.y = dev_rand((size_t)E * rows * N * 4, 1);
    c.xq = dev_rand((size_t)E * rows * K, 0);
    c.xs = dev_rand((size_t)E * rows * DSI_CEIL_DIV(K, 128) * 4, 1);
    c.W = &W;
    c.M = rows;
    c.a = (dsi_gemm_args){.W = &W, .N = N, .K = K, .Z = E, .d_group_offset = doff};
    double s = time_it(run_fp8, &c), bytes = (double)E * N * K;
    printf("  decode experts %d x %d rows N=%5d K=%5d  fp8 mma.sync (16-row tiles) %7.1f us, weights at %6.0f GB/s"
           " = %.2fx copy bandwidth\n", E, rows, N, K, s * 1e6, bytes / s * 1e-9, bytes / s * 1e-9 / bw);
    dsi__cuda_free(c.xq); dsi__cuda_free(c.xs); dsi__cuda_free(c.y); dsi__cuda_free(doff);
    dsi__cuda_free_mat(&W);
}

/* ------------------------------------------------------------------ MLA decode */

typedef struct mla_ctx {
    dsi_mla_geom g;
    int T;
    float *qabs, *olat;
    void *cache;
    int *pos, *seq, *btab;
} mla_ctx;

static int run_mla(void *p) {
    mla_ctx *c = p;
    return dsi__cuda_mla_decode(&c->g, 0, c->T, c->qabs, c->cache, c->pos, c->seq, c->btab, c->olat, NULL);
}
static int run_mla_tc(void *p) {
    mla_ctx *c = p;
    return dsi__cuda_mla_decode_tc(&c->g, 0, c->T, c->qabs, c->cache, c->pos, c->seq, c->btab, c->olat, NULL);
}

static void mla(int B, int ctx) {
    mla_ctx c = {.g = {.H = 128, .nope = 128, .rope = 64, .lora = 512, .vd = 128, .n_layers = 1, .block_tokens = 64,
                       .kv_bf16 = 1, .softmax_scale = 0.1f, .rope_mscale = 1, .eps = 1e-6f}};
    int nb = DSI_CEIL_DIV(ctx, 64), kvd = 576;
    c.g.max_blocks = nb;
    c.T = B;
    size_t bb = dsi__cuda_kv_block_bytes(&c.g);
    /* BF16 cache: the float generator's upper halves are plausible bf16 values */
    c.cache = dev_rand(bb * B * nb, 1);
    c.qabs = dev_rand((size_t)B * 128 * kvd * 4, 1);
    dsi__cuda_malloc((void **)&c.olat, (size_t)B * 128 * 512 * 4);
    int *pos = malloc(sizeof(int) * B), *seq = malloc(sizeof(int) * B), *bt = malloc(sizeof(int) * B * nb);
    for (int b = 0; b < B; b++) {
        pos[b] = ctx - 1;
        seq[b] = b;
        for (int i = 0; i < nb; i++) bt[b * nb + i] = b * nb + i;
    }
    dsi__cuda_malloc((void **)&c.pos, sizeof(int) * B);
    dsi__cuda_malloc((void **)&c.seq, sizeof(int) * B);
    dsi__cuda_malloc((void **)&c.btab, sizeof(int) * B * nb);
    dsi__cuda_h2d(c.pos, pos, sizeof(int) * B);
    dsi__cuda_h2d(c.seq, seq, sizeof(int) * B);
    dsi__cuda_h2d(c.btab, bt, sizeof(int) * B * nb);
    dsi__cuda_mla_setup(&c.g);
    dsi__cuda_mla_tc_setup();
    double bytes = (double)B * ctx * kvd * 2 + (double)B * 128 * (kvd + 512) * 4;
    double flop = 2.0 * B * 128 * ctx * (kvd + 512);
    for (int k = 0; k < 2; k++) {
        double s = time_it(k ? run_mla_tc : run_mla, &c);
        if (s > 0)
            printf("  MLA decode %-12s batch %3d ctx %d 128 heads (bf16 cache): %7.1f GB/s = %.3fx FlashMLA 3000,"
                   " %6.1f TFLOP/s = %.3fx FlashMLA 580 (%.1f us)\n",
                   k ? "tensor cores" : "float32", B, ctx, bytes / s * 1e-9, bytes / s * 1e-9 / 3000, flop / s * 1e-12,
                   flop / s * 1e-12 / 580, s * 1e6);
    }
    dsi__cuda_free(c.cache); dsi__cuda_free(c.qabs); dsi__cuda_free(c.olat);
    dsi__cuda_free(c.pos); dsi__cuda_free(c.seq); dsi__cuda_free(c.btab);
    free(pos); free(seq); free(bt);
}

/* ------------------------------------------------------------------ whole model */

static double median3(const double *v) {
    double a = v[0], b = v[1], c = v[2];
    return a > b ? (b > c ? b : (a > c ? c : a)) : (a > c ? a : (b > c ? c : b));
}

static int model_bench(const char *dir, int simple) {
    dsi_model *m;
    if (dsi_model_load(dir, NULL, &m)) { fprintf(stderr, "bench_cuda: %s\n", dsi_last_error()); return 1; }
    const dsi_config *c = dsi_model_config(m);
    int B = 128, ctx = 4096, nb = ctx / 64 + 1;
    dsi_cuda_opts o = {.max_tokens = 4096, .max_logits = B, .max_seqs = B, .kv_blocks = B * nb + 8,
                       .max_blocks_per_seq = nb, .kv_bf16 = 1, .attn_tc = 1, .graphs = 1,
                       .gemm = simple ? DSI_CUDA_GEMM_SIMPLE : DSI_CUDA_GEMM_CUBLASLT};
    dsi_cuda_engine *e;
    double t0 = dsi_now();
    if (dsi_cuda_engine_create(m, &o, &e)) {
        fprintf(stderr, "bench_cuda: %s\n", dsi_last_error());
        dsi_model_destroy(m);
        return 1;
    }
    printf("  model %s: %d layers, %.1f GB of weights on the device (upload %.1f s), gemm %s\n", dsi_model_name(m),
           c->n_layers, dsi_cuda_engine_weight_bytes(e) / 1e9, dsi_now() - t0, simple ? "simple" : "cuBLASLt FP8");
    printf("  (one GPU holds and reads all %d routed experts of each layer; DeepSeek's per-GPU figures are with"
           " EP32 prefill / EP144 decode, 9 or 2 routed experts per GPU)\n", c->n_experts);
    int32_t *blocks = malloc(sizeof(int32_t) * B * nb), *tok = malloc(sizeof(int32_t) * 4096);
    float *logits = malloc(sizeof(float) * (size_t)B * c->vocab_size);
    for (int i = 0; i < B * nb; i++) blocks[i] = dsi_cuda_kv_alloc(e);
    for (int i = 0; i < 4096; i++) tok[i] = (int32_t)(next() % (uint64_t)c->vocab_size);
    dsi_seq_step *st = calloc(B, sizeof *st);
    for (int b = 0; b < B; b++) st[b] = (dsi_seq_step){tok + b, 1, ctx - 1, blocks + b * nb, nb, DSI_LOGITS_LAST,
                                                       logits + (size_t)b * c->vocab_size};
    /* Seconds for the 16K-token prefill and for one decode step, with all
     * layers and without the last one, alternated three times (medians): the
     * difference is one layer's cost, and 61 layers are this model plus
     * (61 - n) more such layers. */
    double tp[2][3] = {{0}}, td[2][3] = {{0}};
    int rc = DSI_OK, cfgs = c->n_layers > c->first_k_dense && c->n_layers > 1 ? 2 : 1, hit = -1;
    for (int rep = 0; rep < 3 && !rc; rep++)
        for (int run = 0; run < cfgs && !rc; run++) {
            if (cfgs == 2) rc = dsi__cuda_engine_run_layers(e, run ? c->n_layers - 1 : 0);
            /* prefill: 4 sequences of 4096 tokens (16K tokens), last-token logits */
            double t = dsi_now();
            for (int s = 0; s < 4 && !rc; s++) {
                dsi_seq_step ps = {tok, 4096, 0, blocks + s * nb, nb, DSI_LOGITS_LAST, logits};
                rc = dsi_cuda_engine_step(e, &ps, 1);
            }
            tp[run][rep] = dsi_now() - t;
            /* decode: 128 sequences at position 4095 (the cache holds what the
             * prefills wrote and zeros: the work per step is that of a real 4K
             * history); each step copies all 128 rows of logits to the host */
            for (int i = 0; i < 3 && !rc; i++) rc = dsi_cuda_engine_step(e, st, B); /* capture + warm-up */
            int steps = quick ? 5 : 20;
            t = dsi_now();
            for (int i = 0; i < steps && !rc; i++) rc = dsi_cuda_engine_step(e, st, B);
            td[run][rep] = (dsi_now() - t) / steps;
            if (!run && !rc) hit = dsi__cuda_engine_experts_hit(e);
        }
    if (!rc) {
        int n = c->n_layers;
        double p0 = median3(tp[0]), d0 = median3(td[0]);
        printf("  prefill 16K tokens (4 x 4K): %.3f s on %d layers = %.0f tok/s\n", p0, n, 16384 / p0);
        printf("  decode batch %d ctx 4K: %.2f ms/step on %d layers = %.0f tok/s (last MoE layer routed to %d of %d"
               " experts)\n", B, d0 * 1e3, n, B / d0, hit, c->n_experts);
        if (cfgs == 2) {
            double lp = p0 - median3(tp[1]), ld = d0 - median3(td[1]);
            double p61 = p0 + (61 - n) * lp, d61 = d0 + (61 - n) * ld;
            printf("  one MoE layer (%d layers minus %d, medians of 3): prefill %.1f ms per 16K tokens, decode %.3f ms"
                   " per step (runs: prefill %.3f/%.3f/%.3f s vs %.3f/%.3f/%.3f s, decode %.2f/%.2f/%.2f ms vs"
                   " %.2f/%.2f/%.2f ms)\n", n, n - 1, lp * 1e3, ld * 1e3, tp[0][0], tp[0][1], tp[0][2], tp[1][0],
                   tp[1][1], tp[1][2], td[0][0] * 1e3, td[0][1] * 1e3, td[0][2] * 1e3, td[1][0] * 1e3,
                   td[1][1] * 1e3, td[1][2] * 1e3);
            printf("  at 61 layers (this model + %d more MoE layers): prefill %.0f tok/s = %.3fx DeepSeek 9.2k per H800;"
                   " decode %.0f tok/s = %.3fx DeepSeek 1.85k per H800\n", 61 - n, 16384 / p61, 16384 / p61 / 9200,
                   B / d61, B / d61 / 1850);
        }
    }
    if (rc) fprintf(stderr, "bench_cuda: %s\n", dsi_last_error());
    free(st); free(blocks); free(tok); free(logits);
    dsi_cuda_engine_destroy(e);
    dsi_model_destroy(m);
    return rc ? 1 : 0;
}

int main(int argc, char **argv) {
    const char *model = NULL;
    int simple = 0, lt_probe = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--model") && i + 1 < argc) model = argv[++i];
        else if (!strcmp(argv[i], "--simple")) simple = 1;
        else if (!strcmp(argv[i], "--quick")) quick = 1;
        else if (!strcmp(argv[i], "--lt-probe")) lt_probe = 1;
        else {
            printf("usage: bench_cuda [--model DIR] [--simple] [--quick] [--lt-probe]\n");
            return strcmp(argv[i], "--help") ? 2 : 0;
        }
    }
    if (dsi_cuda_device_count() <= 0) {
        printf("bench_cuda: no CUDA device on this machine: nothing to measure\n");
        return 0;
    }
    char d[256];
    dsi_cuda_device_describe(0, d, sizeof d);
    printf("bench_cuda on %s\n", d);
    if (lt_probe) {
        dsi__lt_probe(4096, 7168, 16384);
        dsi__lt_probe(64, 2112, 7168);
        return 0;
    }
    dsi_lt *lt;
    if (dsi__lt_create(&lt)) { fprintf(stderr, "bench_cuda: %s\n", dsi_last_error()); return 1; }
    printf("FP8 GEMM (block-scaled 1x128 x 128x128, activations quantised beforehand as DeepGEMM is measured)\n");
    double peak = dense(lt, 8192, 8192, 8192, 1525, "the 1525 measured on an H100 (DEPENDENCIES.md)", 0);
    dense(lt, 4096, 7168, 16384, 1358, "DeepGEMM H800", 1);
    dense(lt, 4096, 2112, 7168, 1058, "DeepGEMM H800", 1);
    dense(lt, 64, 7168, 16384, 206, "DeepGEMM H800 decode low end (206-336)", 1);
    dense(lt, 64, 2112, 7168, 206, "DeepGEMM H800 decode low end (206-336)", 1);
    if (!quick) {
        grouped(lt, 4, 8192, 4096, 7168, 1297, 1297, "contiguous", peak);
        grouped(lt, 8, 8192, 4096, 7168, 1297, 1297, "contiguous", peak);
    }
    grouped(lt, 8, 256, 4096, 7168, 932, 1233, "masked", peak);
    grouped(lt, 8, 256, 7168, 2048, 932, 1233, "masked", peak);
    double bw = copy_bandwidth();
    grouped_decode(256, 4, 2048, 7168, bw);
    grouped_decode(256, 4, 7168, 2048, bw);
    dsi__lt_destroy(lt);
    printf("MLA decode, absorbed form\n");
    mla(64, 4096);
    mla(128, 4096);
    int rc = 0;
    if (model) {
        printf("whole model\n");
        rc = model_bench(model, simple);
    } else {
        printf("whole model: pass --model DIR (dsinfer make-model --preset v3-layers:N) to measure\n");
    }
    return rc;
}
#endif
