/* Aggregate decode throughput at batch 1, 8 and 32 through the scheduler
 * (continuous batching over the paged KV pool), on a checkpoint (default: the
 * `small` preset at /tmp/small, made by
 *     build/dsinfer make-model --preset small --dtype fp8 --out /tmp/small).
 * Decode of one sequence is bandwidth-bound: a batch shares each weight
 * read, so batch 32 should give several times the tokens/s of batch 1, up
 * to what the arithmetic allows (on a CPU a few sequences already reach
 * the FMA peak). Prints each figure, the weight bytes streamed per second
 * at batch 1, and the ratios batch-8 / batch-1 and batch-32 / batch-1 next
 * to their bound: the lower of the bandwidth bound (bytes a step reads) and
 * the FLOP bound (the linear layers' FLOPs per token at the FMA peak
 * measured on the engine's threads, against the batch-1 rate).
 *
 * usage: bench_batch_decode [MODEL_DIR] [decode_steps (default 12)] [threads (default 0 = all)] */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench_peak.h"
#include "dsinfer/model.h"
#include "dsinfer/sched.h"

typedef struct counter {
    int tokens, finished;
    double t_first;   /* when this request's first token arrived (end of its prefill) */
} counter;

static int on_event(void *user, const dsi_sched_event *ev) {
    counter *c = user;
    if (ev->type == DSI_SCHED_TOKEN) {
        if (c->tokens++ == 0) c->t_first = dsi_now();
    } else {
        c->finished = 1;
    }
    return 0;
}

/* Runs `batch` requests of a 32-token prompt and steps+1 new tokens each;
 * returns decode tokens/s over the steps after every prefill finished. */
static double run(dsi_sched *s, int batch, int steps, int vocab) {
    counter *cs = calloc(batch, sizeof *cs);
    int32_t prompt[32];
    for (int b = 0; b < batch; b++) {
        for (int i = 0; i < 32; i++) prompt[i] = (b * 7919 + i * 131 + 7) % vocab; /* distinct: no cache sharing */
        dsi_request_params p = {.prompt = prompt, .n_prompt = 32, .max_tokens = steps + 1};
        if (dsi_sched_submit(s, &p, on_event, &cs[b], NULL)) { fprintf(stderr, "%s\n", dsi_last_error()); exit(1); }
    }
    /* prefill (and the first tokens) */
    for (;;) {
        int ready = 0;
        for (int b = 0; b < batch; b++) ready += cs[b].tokens > 0;
        if (ready == batch) break;
        if (dsi_sched_step(s) < 0) { fprintf(stderr, "%s\n", dsi_last_error()); exit(1); }
    }
    int before = 0;
    for (int b = 0; b < batch; b++) before += cs[b].tokens;
    double t0 = dsi_now();
    while (dsi_sched_step(s) > 0) {}
    double dt = dsi_now() - t0;
    int after = 0;
    for (int b = 0; b < batch; b++) after += cs[b].tokens;
    free(cs);
    return (after - before) / dt;
}

int main(int argc, char **argv) {
    const char *dir = argc > 1 ? argv[1] : "/tmp/small";
    int steps = argc > 2 ? atoi(argv[2]) : 12;
    int threads = argc > 3 ? atoi(argv[3]) : 0;
    dsi_model *m;
    dsi_load_opts lo = {.prefault = 1}; /* time decoding, not first reads from disk */
    if (dsi_model_load(dir, &lo, &m)) {
        fprintf(stderr, "bench_batch_decode: %s\n(make it with: build/dsinfer make-model --preset small --dtype fp8 --out %s)\n",
                dsi_last_error(), dir);
        return 1;
    }
    const dsi_config *c = dsi_model_config(m);
    dsi_kv_pool *kv;
    dsi_engine *e;
    dsi_sched *s;
    int blocks = 32 * ((32 + steps + 2 + 63) / 64) + 8;
    if (dsi_kv_pool_create(c->n_layers, dsi_config_kv_dim(c), DSI_KV_BLOCK_TOKENS, blocks, &kv) ||
        dsi_engine_create(m, kv, &(dsi_engine_opts){.n_threads = threads, .max_tokens = 1024}, &e) ||
        dsi_sched_create(e, &(dsi_sched_opts){.max_num_seqs = 32, .no_prefix_cache = 1}, &s)) {
        fprintf(stderr, "bench_batch_decode: %s\n", dsi_last_error());
        return 1;
    }
    printf("model %s: %d layers, hidden %d, %d experts top-%d; %.2f GB weights, %.3f GB read per token alone; "
           "%s kernels, %d threads; %d decode steps per batch\n",
           dir, c->n_layers, c->hidden, c->n_experts, c->n_experts_per_tok, dsi_model_total_bytes(m) / 1e9,
           dsi_model_active_bytes_per_token(m) / 1e9, dsi_engine_kernels_name(e), dsi_engine_n_threads(e), steps);
    dsi_pool *pool = dsi_pool_create(dsi_engine_n_threads(e));
    double peak = pool ? measure_peak_flops(pool) : 0, flops_tok = dsi_model_flops_per_token(m);
    dsi_pool_destroy(pool);
    printf("compute: %.2f GFLOP per token (linear layers), FMA peak %.0f GFLOP/s on %d threads: at most %.1f tok/s "
           "at any batch\n",
           flops_tok / 1e9, peak / 1e9, dsi_engine_n_threads(e), peak / flops_tok);
    run(s, 1, 2, c->vocab_size); /* warm the page cache and the thread pool */
    int batches[3] = {1, 8, 32};
    double tps[3];
    for (int i = 0; i < 3; i++) {
        tps[i] = run(s, batches[i], steps, c->vocab_size);
        printf("batch %2d: %8.1f decode tok/s aggregate, %6.1f per sequence", batches[i], tps[i], tps[i] / batches[i]);
        if (i == 0)
            printf("  (streams %.1f GB/s of weights)", tps[0] * dsi_model_active_bytes_per_token(m) / 1e9);
        printf("\n");
    }
    /* The bandwidth bound on the ratio: a step of B tokens reads the
     * non-expert weights once and each distinct routed expert once; B tokens
     * choosing k of E experts touch about E(1 - (1 - k/E)^B) of them. */
    double total = dsi_model_total_bytes(m), active = dsi_model_active_bytes_per_token(m);
    int E = c->n_experts, k = c->n_experts_per_tok;
    double per_expert = E > k ? (total - active) / (E - k) : 0, dense = active - k * per_expert;
    double ideal[3];
    for (int i = 0; i < 3; i++) {
        double B = batches[i], touched = E > 0 ? E * (1 - pow(1 - (double)k / E, B)) : 0;
        ideal[i] = B * active / (dense + touched * per_expert);
    }
    double by_flops = peak > 0 ? peak / flops_tok / tps[0] : INFINITY; /* no pool: the bandwidth bound alone */
    for (int i = 1; i < 3; i++)
        printf("ratio batch-%d / batch-1: %.2fx; bound %.2fx, the lower of bandwidth %.2fx and FLOPs %.2fx: %.0f%%\n",
               batches[i], tps[i] / tps[0], DSI_MIN(ideal[i], by_flops), ideal[i], by_flops,
               100 * tps[i] / tps[0] / DSI_MIN(ideal[i], by_flops));
    dsi_sched_destroy(s);
    dsi_engine_destroy(e);
    dsi_kv_pool_destroy(kv);
    dsi_model_destroy(m);
    return 0;
}
