/* Decode and prefill throughput of the CPU engine, each next to its bound
 * measured in the same run:
 *   decode  tok/s vs (memory bandwidth / bytes read per token: the active
 *           weights plus the KV cache read at that context)
 *   prefill tok/s vs (peak FMA FLOP/s, the higher of two measurements before
 *           and after the prompt, / FLOPs per token)
 * for 1 and 2 threads (or --threads LIST).
 *
 * Prefill runs exact and with FP8 activations ("prefill fp8": FP8 x FP8
 * matmuls, vdpbf16ps where the CPU has AVX512_BF16, bounded by that
 * instruction's measured peak), each --reps times (3; llama-bench's pp
 * averages 5), the median printed.
 *
 * Decode is measured from an empty context (as llama-bench's tg128, the
 * issue's reference), the same with FP8 activations ("decode fp8":
 * --fp8-act, activations quantised to e4m3 per 1x128 tile before FP8
 * matmuls), and after the prefilled prompt. This VM shares its memory bus
 * with other guests and its bandwidth drifts by up to 30% within a minute,
 * so each decode is timed in windows of 16 tokens with the
 * bandwidth measured right before and after each window (the higher of the
 * two is the window's bound; each the best of plain and software-prefetching
 * reads); the figure is the median window and its ratio
 * the median of the per-window ratios (min-max shown).
 *
 * "ceiling" is what decode would reach if every weight matrix streamed at
 * the rate the GEMV kernels reach on rows that stay in L2 (measured in the
 * same run on the model's own expert and LM-head matrices, all threads at
 * once), with nothing else in a token: the arithmetic's limit, against the
 * same bandwidth bound as "decode tg". The gap between it and "decode tg" is
 * the weights' streaming from memory (below the L2 rate) and the rest of a
 * token (attention, norms, routing).
 *
 * "vs machine" (thread counts below the core count): decode tg and the
 * ceiling against the issue's own bound, the whole machine's read (all
 * cores) over the bytes per token, one bound for every thread count.
 *
 *   build/dsinfer make-model --preset small --dtype fp8 --out /tmp/small
 *   build/bench_engine --model /tmp/small [--threads 1,2] [--prompt 512] [--decode 128] [--reps 3] [--no-mmap]
 */
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/threadpool.h"
#include "bench_peak.h"
#include "bench_stats.h"
#include "dsinfer/engine.h"
#include "dsinfer/model.h"
#include "dsinfer/sampler.h"
#include "kernels/kernels.h"
#include "model/model_impl.h"

/* ---- memory bandwidth: streaming reads of a buffer much larger than the caches.
 * `pf`: with a software prefetch 8 KB ahead into L2 (T1), as the GEMVs issue:
 * when the memory bus is contended the hardware prefetcher alone keeps fewer
 * lines in flight, and the plain loop measured less than the decode itself
 * streamed (ratios over 100%). The bound takes the faster of the two. The
 * prefetch went to L1 (T0) before, and still printed ratios of 105-118% on
 * one thread: on Zen 4 that read ran 22-29 GB/s where T1 ran 32-33 and the
 * plain loop 30-32. */
typedef struct { const float *buf; size_t n; int pf; } bw_arg;

static void bw_task(void *ctx, int64_t b, int64_t e, int t) {
    bw_arg *a = ctx;
    volatile float sink = bench_read(a->buf + b * 64, (size_t)(e - b) * 64, a->pf);
    (void)sink, (void)t;
}

/* Best of `reps` streaming reads of buf (bytes much larger than the caches),
 * each rep once without and once with software prefetch. */
static double measure_bandwidth_buf(dsi_pool *pool, const float *buf, size_t bytes, int reps) {
    double best = 0;
    for (int rep = 0; rep < 2 * reps; rep++) {
        bw_arg a = {buf, bytes / 4, rep % 2};
        double t0 = dsi_now();
        dsi_pool_for(pool, (int64_t)(bytes / 4 / 64), 4096, bw_task, &a);
        double gbs = bytes / (dsi_now() - t0) / 1e9;
        if (gbs > best) best = gbs;
    }
    return best;
}

#define WINDOW 16
#define BW_BYTES ((size_t)256 << 20)

/* Decodes n tokens of one sequence from position pos (ids[pos] is the
 * first input) in windows of WINDOW, each after a bandwidth measurement;
 * prints the median rate, the median bound and the per-window ratios. */
static int decode_windows(dsi_engine *e, dsi_pool *pool, const float *bwbuf, const dsi_config *c, double weight_bytes,
                          int32_t *ids, int pos, int n, const int32_t *blocks, int nb, float *logits, int nt,
                          const char *label, double *median_bound, double *median_rate) {
    int nw = n / WINDOW;
    double rate[64], bound[64], ratio[64];
    if (nw < 1 || nw > 64) { fprintf(stderr, "bench_engine: --decode must be 16..1024\n"); return 1; }
    double bw_next = measure_bandwidth_buf(pool, bwbuf, BW_BYTES, 3);
    for (int w = 0; w < nw; w++) {
        double bw_before = bw_next;
        double t0 = dsi_now();
        for (int i = 0; i < WINDOW; i++, pos++) {
            dsi_seq_step d = {&ids[pos], 1, pos, blocks, nb, DSI_LOGITS_LAST, logits};
            if (dsi_engine_step(e, &d, 1)) { fprintf(stderr, "%s\n", dsi_last_error()); return 1; }
            ids[pos + 1] = dsi_argmax(logits, c->vocab_size);
        }
        double t = dsi_now() - t0;
        /* the bandwidth around the window: the better of the measurements
         * before and after it (the next window's "before"), each the best of
         * 3 plain and 3 prefetching reads: a bound, so the higher estimate */
        bw_next = measure_bandwidth_buf(pool, bwbuf, BW_BYTES, 3);
        double bw = bw_before > bw_next ? bw_before : bw_next;
        /* bytes per token: weights, plus the float32 latent cache read at the
         * window's middle context */
        double kv = (double)c->n_layers * (pos - WINDOW / 2) * dsi_config_kv_dim(c) * 4;
        rate[w] = WINDOW / t;
        bound[w] = bw * 1e9 / (weight_bytes + kv);
        ratio[w] = rate[w] / bound[w];
    }
    double lo = 1e9, hi = 0;
    for (int w = 0; w < nw; w++) lo = ratio[w] < lo ? ratio[w] : lo, hi = ratio[w] > hi ? ratio[w] : hi;
    double r = bench_median(rate, nw), b = bench_median(bound, nw), q = bench_median(ratio, nw);
    if (median_bound) *median_bound = b;
    if (median_rate) *median_rate = r;
    printf("%-7d %-12s %8.1f %12.1f %8.0f%%   %3.0f-%3.0f%% of %d windows, bandwidth measured around each\n", nt, label, r, b,
           100 * q, 100 * lo, 100 * hi, nw);
    return 0;
}

/* `reps` prefills of ids[0..n) from position 0 on one sequence (its cache
 * rewritten each time), each between two peak measurements (the higher of
 * the two is its bound: one run measured a single core's rate with two
 * threads, the second vCPU being elsewhere, and printed a 170% ratio).
 * `lin` FLOPs run at the BF16 dot-product peak when `fp8` and the CPU has
 * it, else at the FMA peak, as `attn` always does. Prints the median rate,
 * the median bound and the median of the per-run ratios (min-max shown):
 * one prefill of `small` on two threads is ~3.5 s, and a single one read
 * 116-149 tok/s in consecutive runs of this benchmark on this VM. */
static int prefill_reps(dsi_engine *e, dsi_pool *pool, const int32_t *ids, int n, const int32_t *blocks, int nb,
                        float *logits, double lin, double attn, int fp8, int reps, int nt, const char *label) {
    double rate[16], bound[16], ratio[16], fpk[16], lpk[16];
    if (reps < 1 || reps > 16) { fprintf(stderr, "bench_engine: --reps must be 1..16\n"); return 1; }
    double fma_next = measure_peak_flops(pool), bf_next = fp8 ? measure_peak_bf16(pool) : 0;
    for (int r = 0; r < reps; r++) {
        double fma_before = fma_next, bf_before = bf_next, t0 = dsi_now();
        dsi_seq_step s = {(int32_t *)ids, n, 0, (int32_t *)blocks, nb, DSI_LOGITS_LAST, logits};
        if (dsi_engine_step(e, &s, 1)) { fprintf(stderr, "%s\n", dsi_last_error()); return 1; }
        double tp = dsi_now() - t0;
        fma_next = measure_peak_flops(pool);
        bf_next = fp8 ? measure_peak_bf16(pool) : 0;
        double fma = fma_before > fma_next ? fma_before : fma_next, bf = bf_before > bf_next ? bf_before : bf_next;
        double lin_peak = bf > 0 ? bf : fma;
        rate[r] = n / tp;
        bound[r] = n / (lin / lin_peak + attn / fma);
        ratio[r] = rate[r] / bound[r];
        fpk[r] = fma;
        lpk[r] = lin_peak;
    }
    double lo = 1e9, hi = 0;
    for (int r = 0; r < reps; r++) lo = ratio[r] < lo ? ratio[r] : lo, hi = ratio[r] > hi ? ratio[r] : hi;
    int bf16 = fp8 && bf_next > 0;
    printf("%-7d %-12s %8.1f %12.1f %8.0f%%   %3.0f-%3.0f%% of %d runs; %s peak %.0f GFLOP/s%s\n", nt, label,
           bench_median(rate, reps), bench_median(bound, reps), 100 * bench_median(ratio, reps), 100 * lo, 100 * hi,
           reps, bf16 ? "BF16 dot" : "FMA", (bf16 ? bench_median(lpk, reps) : bench_median(fpk, reps)) / 1e9,
           bf16 ? " (linear), FMA (attention)" : "");
    fflush(stdout);
    return 0;
}

/* ---- ceiling: the weight matrices at the GEMV kernels' L2 rates ---- */
typedef struct {
    const dsi_kernels *k;
    dsi_mat W;
    float *x, *y; /* per thread: [nt][cols], [nt][rows] */
} l2_arg;

static void l2_task(void *ctx, int64_t b, int64_t e, int t) {
    const l2_arg *a = ctx;
    const float *x = a->x + (size_t)t * a->W.cols;
    float *y = a->y + (size_t)t * a->W.rows;
    for (int64_t i = b; i < e; i++) a->k->matmul(&a->W, x, 1, a->W.cols, y, a->W.rows, 0, 0, a->W.rows, 0);
}

/* GB/s of M = 1 products over the first rows of W (~384 KB, which stay in
 * each core's L2), every thread of the pool at once; best of 3 */
static double l2_rate(dsi_pool *pool, const dsi_kernels *k, const dsi_mat *W) {
    int nt = dsi_pool_size(pool);
    size_t row_bytes = (size_t)W->cols * dsi_dtype_size(W->dtype);
    int rows = (int)(((size_t)384 << 10) / row_bytes) & ~15;
    if (rows < 16) rows = 16;
    if (rows > W->rows) rows = W->rows;
    l2_arg a = {k, *W, calloc((size_t)nt * W->cols, sizeof(float)), calloc((size_t)nt * rows, sizeof(float))};
    if (!a.x || !a.y) { free(a.x), free(a.y); return 0; }
    a.W.rows = rows;
    for (size_t i = 0; i < (size_t)nt * W->cols; i++) a.x[i] = (float)((i * 37) % 17 - 8) / 8;
    int64_t per = (int64_t)(((size_t)48 << 20) / ((size_t)rows * row_bytes)) + 1, items = per * nt;
    dsi_pool_for(pool, nt, 1, l2_task, &a); /* warm: rows into every L2 */
    double best = 0;
    for (int rep = 0; rep < 3; rep++) {
        double t0 = dsi_now();
        dsi_pool_for(pool, items, 1, l2_task, &a);
        double gbs = (double)items * rows * row_bytes / (dsi_now() - t0) / 1e9;
        if (gbs > best) best = gbs;
    }
    free(a.x), free(a.y);
    return best;
}

typedef struct {
    const dsi_mat *gate;
    int hidden;
    const double *rate;
    double seconds;
} l2_sum;

/* a matrix of the experts' dtype at the routed gate's rate when its rows
 * are `hidden` long, else at the routed down projection's; the rest (the
 * LM head, a BF16 router) at the LM head's */
static void add_l2_seconds(const dsi_mat *W, int times, void *ctx) {
    l2_sum *s = ctx;
    if (!W->data) return;
    double r = W->dtype != s->gate->dtype ? s->rate[2] : W->cols == s->hidden ? s->rate[0] : s->rate[1];
    s->seconds += times * (double)W->rows * W->cols * dsi_dtype_size(W->dtype) / 1e9 / r;
}

/* Seconds per token with every matrix a decoded token reads at an L2 rate
 * (rates measured here into rate[3]: routed gate, routed down, LM head). */
static double l2_token_seconds(const dsi_model *m, dsi_pool *pool, double rate[3]) {
    const dsi_config *c = &m->cfg;
    const dsi_layer *moe = NULL;
    for (int l = 0; l < c->n_layers && !moe; l++)
        if (m->layers[l].is_moe) moe = &m->layers[l];
    const dsi_mat *gate = moe ? &moe->exp_gate[0] : &m->layers[0].gate, *down = moe ? &moe->exp_down[0] : &m->layers[0].down;
    const dsi_kernels *k = dsi_kernels_select();
    rate[0] = l2_rate(pool, k, gate);
    rate[1] = l2_rate(pool, k, down);
    rate[2] = l2_rate(pool, k, &m->lm_head);
    if (rate[0] <= 0 || rate[1] <= 0 || rate[2] <= 0) return 0;
    l2_sum s = {gate, c->hidden, rate, 0};
    dsi__model_token_mats(m, add_l2_seconds, &s);
    return s.seconds;
}

int main(int argc, char **argv) {
    const char *model_dir = "/tmp/small", *threads_s = "1,2";
    int n_prompt = 512, n_decode = 128, no_mmap = 0, reps = 3;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--model") && i + 1 < argc) model_dir = argv[++i];
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc) threads_s = argv[++i];
        else if (!strcmp(argv[i], "--prompt") && i + 1 < argc) n_prompt = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--decode") && i + 1 < argc) n_decode = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--reps") && i + 1 < argc) reps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--no-mmap")) no_mmap = 1;
        else {
            fprintf(stderr, "usage: bench_engine [--model DIR] [--threads 1,2] [--prompt N] [--decode N] [--reps N] [--no-mmap]\n");
            return 2;
        }
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
    printf("%-7s %-12s %8s %12s %9s\n", "threads", "phase", "tok/s", "bound tok/s", "ratio");
    char *ts = strdup(threads_s);
    int ncpu = (int)sysconf(_SC_NPROCESSORS_ONLN);
    size_t bw_bytes = BW_BYTES;
    float *bwbuf = bench_huge_alloc(bw_bytes); /* pages as the weights have them */
    if (!bwbuf) { fprintf(stderr, "bench_engine: cannot map %zu MB\n", bw_bytes >> 20); return 1; }
    for (size_t i = 0; i < bw_bytes / 4; i += 1024) bwbuf[i] = 1.0f; /* fault the pages in */
    for (char *tok = strtok(ts, ","); tok; tok = strtok(NULL, ",")) {
        int nt = atoi(tok);
        dsi_pool *pool = dsi_pool_create(nt);
        int total = n_prompt + n_decode + 1, nb = DSI_CEIL_DIV(total, DSI_KV_BLOCK_TOKENS);
        dsi_kv_pool *kv;
        dsi_kv_pool_create(c->n_layers, dsi_config_kv_dim(c), DSI_KV_BLOCK_TOKENS, 2 * nb, &kv);
        dsi_engine *e;
        dsi_engine_opts o = {.n_threads = nt, .max_tokens = n_prompt};
        if (dsi_engine_create(m, kv, &o, &e)) { fprintf(stderr, "%s\n", dsi_last_error()); return 1; }
        int32_t *blocks = malloc(sizeof(int32_t) * nb), *blocks2 = malloc(sizeof(int32_t) * nb);
        int32_t *ids = malloc(sizeof(int32_t) * (total + 1)), *ids2 = malloc(sizeof(int32_t) * (n_decode + 2));
        for (int i = 0; i < nb; i++) blocks[i] = dsi_kv_alloc(kv), blocks2[i] = dsi_kv_alloc(kv);
        for (int i = 0; i < n_prompt; i++) ids[i] = (i * 7919 + 13) % c->vocab_size;
        float *logits = malloc(sizeof(float) * c->vocab_size);
        /* warm-up step (page faults, thread start) on a short prompt */
        dsi_seq_step w = {ids, 16, 0, blocks, nb, DSI_LOGITS_LAST, logits};
        dsi_engine_step(e, &w, 1);
        /* decode from an empty context (llama-bench tg) on its own sequence */
        ids2[0] = 1;
        double tg_bound = 0, tg_rate = 0;
        if (decode_windows(e, pool, bwbuf, c, bytes_tok, ids2, 0, n_decode, blocks2, nb, logits, nt, "decode tg", &tg_bound,
                           &tg_rate))
            return 1;
        /* the arithmetic's limit against the same bound */
        double l2[3], ts = l2_token_seconds(m, pool, l2);
        if (ts > 0)
            printf("%-7d %-12s %8.1f %12.1f %8.0f%%   every matrix at the GEMVs' L2 rate (%.1f, %.1f GB/s by row length; "
                   "LM head %.1f), nothing else\n",
                   nt, "ceiling", 1 / ts, tg_bound, 100 / (ts * tg_bound), l2[0], l2[1], l2[2]);
        /* The issue states one bound for every thread count: the machine's
         * memory bandwidth (all cores reading) over the bytes per token.
         * With fewer threads than cores the rows above use what those
         * threads can read; this row puts decode and the ceiling against
         * the whole machine's read, measured here. */
        if (ts > 0 && nt < ncpu) {
            dsi_pool *all = dsi_pool_create(ncpu);
            double mbw = measure_bandwidth_buf(all, bwbuf, BW_BYTES, 3);
            dsi_pool_destroy(all);
            double kv = (double)c->n_layers * (n_decode / 2) * dsi_config_kv_dim(c) * 4;
            double mbound = mbw * 1e9 / (bytes_tok + kv);
            printf("%-7d %-12s %8.1f %12.1f %8.0f%%   decode tg against all %d cores' read (%.1f GB/s), the issue's "
                   "bound for every thread count; ceiling %.0f%%\n",
                   nt, "vs machine", tg_rate, mbound, 100 * tg_rate / mbound, ncpu, mbw, 100 / (ts * mbound));
        }
        /* the same with FP8 activations (--fp8-act, DeepSeek's serving numerics) */
        dsi_engine *e8;
        dsi_engine_opts o8 = o;
        o8.fp8_activations = 1;
        if (dsi_engine_create(m, kv, &o8, &e8)) { fprintf(stderr, "%s\n", dsi_last_error()); return 1; }
        dsi_engine_step(e8, &w, 1);
        ids2[0] = 1;
        if (decode_windows(e8, pool, bwbuf, c, bytes_tok, ids2, 0, n_decode, blocks2, nb, logits, nt, "decode fp8", NULL, NULL))
            return 1;
        /* FLOPs the prompt executes: the linear layers per position (their
         * count includes kv_b, which decompresses K/V in the prefill form),
         * lm_head for the last position only (the step asks for its logits
         * alone), and attention: per layer, per (query, key) pair,
         * H * (qk + v) * 2. (Counting lm_head for every position and kv_b
         * twice, as this did before, put 13% more work in the bound of
         * `small` and overstated the ratio.) */
        double H = c->n_heads, qk = c->qk_nope_dim + c->qk_rope_dim, head = 2.0 * c->hidden * c->vocab_size;
        double attn = c->n_layers * H * (qk + c->v_head_dim) * 2 * (double)n_prompt * (n_prompt + 1) / 2;
        double lin = (flops_tok - head) * n_prompt + head;
        if (prefill_reps(e, pool, ids, n_prompt, blocks, nb, logits, lin, attn, 0, reps, nt, "prefill")) return 1;
        ids[n_prompt] = dsi_argmax(logits, c->vocab_size);
        char label[32];
        snprintf(label, sizeof label, "decode @%d", n_prompt);
        if (decode_windows(e, pool, bwbuf, c, bytes_tok, ids, n_prompt, n_decode, blocks, nb, logits, nt, label, NULL, NULL)) return 1;
        /* the prompt with FP8 activations, on the decode sequence's blocks:
         * its linear layers are FP8 x FP8 matmuls, bounded by the BF16
         * dot-product peak (where the CPU has it; with BF16 weights they
         * stay float32); attention stays float32 */
        if (prefill_reps(e8, pool, ids, n_prompt, blocks2, nb, logits, lin, attn, c->fp8, reps, nt, "prefill fp8"))
            return 1;
        dsi_engine_destroy(e8);
        dsi_engine_destroy(e);
        dsi_kv_pool_destroy(kv);
        dsi_pool_destroy(pool);
        free(blocks);
        free(blocks2);
        free(ids);
        free(ids2);
        free(logits);
    }
    free(ts);
    dsi_model_destroy(m);
    return 0;
}
