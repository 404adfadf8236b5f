/* Decode and prefill throughput of the CPU engine, each next to its bound
 * measured in the same run:
 *   decode  tok/s vs (memory bandwidth / weight bytes read per token)
 *   prefill tok/s vs (peak FMA FLOP/s / FLOPs per token)
 * for 1 and 2 threads (or --threads LIST).
 *
 *   build/dsinfer make-model --preset small --dtype fp8 --out /tmp/small
 *   build/bench_engine --model /tmp/small [--threads 1,2] [--prompt 512] [--decode 64] [--no-mmap]
 */
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/threadpool.h"
#include "dsinfer/engine.h"
#include "dsinfer/model.h"
#include "dsinfer/sampler.h"

/* ---- memory bandwidth: streaming reads of a buffer much larger than the caches */
typedef struct { const float *buf; size_t n; double sum; } bw_arg;

__attribute__((target("avx512f"))) static void bw_task(void *ctx, int64_t b, int64_t e, int t) {
    bw_arg *a = ctx;
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps(), s3 = _mm512_setzero_ps();
    for (int64_t i = b * 64; i < e * 64; i += 64) {
        s0 = _mm512_add_ps(s0, _mm512_load_ps(a->buf + i));
        s1 = _mm512_add_ps(s1, _mm512_load_ps(a->buf + i + 16));
        s2 = _mm512_add_ps(s2, _mm512_load_ps(a->buf + i + 32));
        s3 = _mm512_add_ps(s3, _mm512_load_ps(a->buf + i + 48));
    }
    volatile float sink = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
    (void)sink;
}

static double measure_bandwidth(dsi_pool *pool) {
    size_t bytes = (size_t)1 << 30, n = bytes / 4;
    float *buf = dsi_alloc(bytes);
    for (size_t i = 0; i < n; i += 1024) buf[i] = 1.0f; /* fault the pages in */
    bw_arg a = {buf, n, 0};
    double best = 0;
    for (int rep = 0; rep < 5; rep++) {
        double t0 = dsi_now();
        dsi_pool_for(pool, (int64_t)(n / 64), 4096, bw_task, &a);
        double gbs = bytes / (dsi_now() - t0) / 1e9;
        if (gbs > best) best = gbs;
    }
    dsi_free(buf);
    return best;
}

/* ---- peak FMA rate: independent FMA chains in registers */
__attribute__((target("avx512f"))) static void fma_task(void *ctx, int64_t b, int64_t e, int t) {
    __m512 a[12];
    for (int i = 0; i < 12; i++) a[i] = _mm512_set1_ps(1.0f + i * 1e-3f);
    __m512 m = _mm512_set1_ps(0.999999f), c = _mm512_set1_ps(1e-7f);
    for (int64_t it = b; it < e; it++)
        for (int r = 0; r < 1000; r++) {
            _Pragma("GCC unroll 12") for (int i = 0; i < 12; i++) a[i] = _mm512_fmadd_ps(a[i], m, c);
        }
    __m512 s = a[0];
    for (int i = 1; i < 12; i++) s = _mm512_add_ps(s, a[i]);
    volatile float sink = _mm512_reduce_add_ps(s);
    (void)sink;
}

static double measure_peak_flops(dsi_pool *pool) {
    int64_t iters = 2000 * dsi_pool_size(pool);
    double best = 0;
    for (int rep = 0; rep < 3; rep++) {
        double t0 = dsi_now();
        dsi_pool_for(pool, iters, 1, fma_task, NULL);
        double f = iters * 1000.0 * 12 * 16 * 2 / (dsi_now() - t0);
        if (f > best) best = f;
    }
    return best;
}

int main(int argc, char **argv) {
    const char *model_dir = "/tmp/small", *threads_s = "1,2";
    int n_prompt = 512, n_decode = 64, no_mmap = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--model") && i + 1 < argc) model_dir = argv[++i];
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc) threads_s = argv[++i];
        else if (!strcmp(argv[i], "--prompt") && i + 1 < argc) n_prompt = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--decode") && i + 1 < argc) n_decode = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--no-mmap")) no_mmap = 1;
        else { fprintf(stderr, "usage: bench_engine [--model DIR] [--threads 1,2] [--prompt N] [--decode N] [--no-mmap]\n"); return 2; }
    }
    dsi_model *m;
    dsi_load_opts lo = {.progress = 1, .prefault = 1, .no_mmap = no_mmap};
    if (dsi_model_load(model_dir, &lo, &m)) {
        fprintf(stderr, "bench_engine: %s\n(create it with: build/dsinfer make-model --preset small --dtype fp8 --out %s)\n",
                dsi_last_error(), model_dir);
        return 1;
    }
    const dsi_config *c = dsi_model_config(m);
    double bytes_tok = dsi_model_active_bytes_per_token(m), flops_tok = dsi_model_flops_per_token(m);
    printf("model %s: %.3f GB weights, %.3f GB read per decoded token, %.2f GFLOP per token (linear layers)\n",
           model_dir, dsi_model_total_bytes(m) / 1e9, bytes_tok / 1e9, flops_tok / 1e9);
    printf("reference (issue 2, same shape in Q8_0, same machine type): llama.cpp decode 31 / 43 tok/s, "
           "prefill pp512 64 / 131 tok/s at 1 / 2 threads\n\n");
    printf("%-7s %-8s %10s %12s %10s %9s\n", "threads", "phase", "tok/s", "bound tok/s", "ratio", "bound from");
    char *ts = strdup(threads_s);
    for (char *tok = strtok(ts, ","); tok; tok = strtok(NULL, ",")) {
        int nt = atoi(tok);
        dsi_pool *pool = dsi_pool_create(nt);
        double bw = measure_bandwidth(pool), peak = measure_peak_flops(pool);
        dsi_pool_destroy(pool);
        int total = n_prompt + n_decode, nb = DSI_CEIL_DIV(total, DSI_KV_BLOCK_TOKENS);
        dsi_kv_pool *kv;
        dsi_kv_pool_create(c->n_layers, dsi_config_kv_dim(c), DSI_KV_BLOCK_TOKENS, nb, &kv);
        dsi_engine *e;
        dsi_engine_opts o = {.n_threads = nt, .max_tokens = n_prompt};
        if (dsi_engine_create(m, kv, &o, &e)) { fprintf(stderr, "%s\n", dsi_last_error()); return 1; }
        int32_t *blocks = malloc(sizeof(int32_t) * nb), *ids = malloc(sizeof(int32_t) * total);
        for (int i = 0; i < nb; i++) blocks[i] = dsi_kv_alloc(kv);
        for (int i = 0; i < n_prompt; i++) ids[i] = (i * 7919 + 13) % c->vocab_size;
        float *logits = malloc(sizeof(float) * c->vocab_size);
        /* warm-up step (page faults, thread start) on a short prompt */
        dsi_seq_step w = {ids, 16, 0, blocks, nb, DSI_LOGITS_LAST, logits};
        dsi_engine_step(e, &w, 1);
        double t0 = dsi_now();
        dsi_seq_step s = {ids, n_prompt, 0, blocks, nb, DSI_LOGITS_LAST, logits};
        if (dsi_engine_step(e, &s, 1)) { fprintf(stderr, "%s\n", dsi_last_error()); return 1; }
        double tp = dsi_now() - t0;
        t0 = dsi_now();
        for (int i = 0; i < n_decode; i++) {
            ids[n_prompt + i] = dsi_argmax(logits, c->vocab_size);
            dsi_seq_step d = {&ids[n_prompt + i], 1, n_prompt + i, blocks, nb, DSI_LOGITS_LAST, logits};
            if (dsi_engine_step(e, &d, 1)) { fprintf(stderr, "%s\n", dsi_last_error()); return 1; }
        }
        double td = dsi_now() - t0;
        /* attention FLOPs of the prompt (prefill form): per layer, per (query, key) pair,
         * H * (qk + v) * 2, plus decompressing K/V: H * (nope+v) * kv_lora * 2 per position */
        double H = c->n_heads, qk = c->qk_nope_dim + c->qk_rope_dim;
        double attn = c->n_layers * (H * (qk + c->v_head_dim) * 2 * (double)n_prompt * (n_prompt + 1) / 2 +
                                     H * (c->qk_nope_dim + c->v_head_dim) * c->kv_lora_rank * 2.0 * n_prompt);
        double prefill_flops = flops_tok * n_prompt + attn;
        double dec_tps = n_decode / td, dec_bound = bw * 1e9 / bytes_tok;
        double pre_tps = n_prompt / tp, pre_bound = peak / (prefill_flops / n_prompt);
        printf("%-7d %-8s %10.1f %12.1f %9.0f%% %s %.1f GB/s\n", nt, "decode", dec_tps, dec_bound, 100 * dec_tps / dec_bound,
               "memory", bw);
        printf("%-7d %-8s %10.1f %12.1f %9.0f%% %s %.0f GFLOP/s\n", nt, "prefill", pre_tps, pre_bound,
               100 * pre_tps / pre_bound, "FMA peak", peak / 1e9);
        fflush(stdout);
        dsi_engine_destroy(e);
        dsi_kv_pool_destroy(kv);
        free(blocks);
        free(ids);
        free(logits);
    }
    free(ts);
    dsi_model_destroy(m);
    return 0;
}
