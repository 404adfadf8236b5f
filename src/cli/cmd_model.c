/* Engine subcommands: make-model, inspect, logits, generate, demo. */
#include "cli/cli.h"
#include "dsinfer/engine.h"
#include "dsinfer/ep.h"
#include "dsinfer/model.h"
#include "dsinfer/sampler.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DEMO_SEED 20250227ull

/* Common engine flags shared by logits/generate. */
typedef struct engine_flags {
    const char *model;
    int threads;
    const char *kernels;
    dsi_attn_mode attn;
    int fp8_act;
    int batch_invariant;
    int max_tokens;
    int kv_tokens;
    int no_mmap;
    dsi_ep_opts ep;         /* used when started by mpirun with more than one rank */
    int dispatch_given;     /* --dispatch named: one process rounds expert I/O the same way */
} engine_flags;

/* Parses one engine flag at argv[*i]; returns 1 if consumed, -1 on error.
 * A value that is not a number sets *bad (message printed) and is consumed. */
static int parse_engine_flag(int argc, char **argv, int *i, engine_flags *f, const char *cmd, int *bad) {
    int missing = 0;
    const char *v;
    if ((v = dsi_cli_flag(argc, argv, i, "--model", &missing))) { f->model = v; return 1; }
    if ((v = dsi_cli_flag(argc, argv, i, "--threads", &missing))) {
        f->threads = dsi_cli_int(cmd, "--threads", v, bad);
        return 1;
    }
    if ((v = dsi_cli_flag(argc, argv, i, "--kernels", &missing))) { f->kernels = v; return 1; }
    if ((v = dsi_cli_flag(argc, argv, i, "--max-batch-tokens", &missing))) {
        f->max_tokens = dsi_cli_int(cmd, "--max-batch-tokens", v, bad);
        return 1;
    }
    if ((v = dsi_cli_flag(argc, argv, i, "--kv-tokens", &missing))) {
        f->kv_tokens = dsi_cli_int(cmd, "--kv-tokens", v, bad);
        return 1;
    }
    if ((v = dsi_cli_flag(argc, argv, i, "--device", &missing))) return 1; /* cpu here; cuda never gets here */
    if ((v = dsi_cli_flag(argc, argv, i, "--attn", &missing))) {
        if (!strcmp(v, "auto")) f->attn = DSI_ATTN_AUTO;
        else if (!strcmp(v, "prefill")) f->attn = DSI_ATTN_PREFILL;
        else if (!strcmp(v, "absorbed")) f->attn = DSI_ATTN_ABSORBED;
        else { fprintf(stderr, "dsinfer: --attn must be auto, prefill or absorbed\n"); return -1; }
        return 1;
    }
    if (!strcmp(argv[*i], "--fp8-act")) { f->fp8_act = 1; return 1; }
    if (!strcmp(argv[*i], "--batch-invariant")) { f->batch_invariant = 1; return 1; }
    if (!strcmp(argv[*i], "--no-mmap")) { f->no_mmap = 1; return 1; }
    if ((v = dsi_cli_flag(argc, argv, i, "--dispatch", &missing))) {
        if (!strcmp(v, "fp8")) f->ep.dispatch = DSI_EP_FP8;
        else if (!strcmp(v, "bf16")) f->ep.dispatch = DSI_EP_BF16;
        else if (!strcmp(v, "f32")) f->ep.dispatch = DSI_EP_F32;
        else { fprintf(stderr, "dsinfer: --dispatch must be fp8, bf16 or f32\n"); return -1; }
        f->dispatch_given = 1;
        return 1;
    }
    if ((v = dsi_cli_flag(argc, argv, i, "--placement", &missing))) { f->ep.placement = v; return 1; }
    if ((v = dsi_cli_flag(argc, argv, i, "--ep-timeout-ms", &missing))) {
        f->ep.timeout_ms = dsi_cli_int(cmd, "--ep-timeout-ms", v, bad);
        return 1;
    }
    if ((v = dsi_cli_flag(argc, argv, i, "--link-gbps", &missing))) {
        f->ep.link_gbps = dsi_cli_num(cmd, "--link-gbps", v, bad);
        return 1;
    }
    if ((v = dsi_cli_flag(argc, argv, i, "--link-latency-us", &missing))) {
        f->ep.link_latency_us = dsi_cli_num(cmd, "--link-latency-us", v, bad);
        return 1;
    }
    if ((v = dsi_cli_flag(argc, argv, i, "--eplb-every", &missing))) {
        f->ep.eplb_every = dsi_cli_int(cmd, "--eplb-every", v, bad);
        return 1;
    }
    if (!strcmp(argv[*i], "--no-overlap")) { f->ep.no_overlap = 1; return 1; }
    if (missing) { fprintf(stderr, "dsinfer: %s needs a value\n", argv[*i]); return -1; }
    return 0;
}

#define ENGINE_FLAGS_HELP                                                                          \
    "  --model DIR            checkpoint directory (default: the built-in demo model)\n"           \
    "  --threads N            compute threads (default: all cores)\n"                              \
    "  --kernels K            ref | avx2 | avx512 (default: best for this CPU)\n"                  \
    "  --attn MODE            auto | prefill | absorbed attention form (default auto)\n"           \
    "  --fp8-act              quantise activations to FP8 per 1x128 tile (as DeepSeek serves)\n"   \
    "  --batch-invariant      a token's numbers do not depend on its batch or on how EP splits it\n" \
    "                         (deterministic; one matmul tile shape for all batch sizes, slower)\n" \
    "  --max-batch-tokens N   tokens per forward step (default 2048)\n"                            \
    "  --kv-tokens N          KV pool capacity in tokens (default: enough for the request)\n"         \
    "  --no-mmap              copy weights into resident memory (faster decode than page-cache maps)\n" \
    "  --device cpu|cuda      engine (default cpu; see --device cuda --help)\n"                       \
    "expert parallelism (under mpirun -np N, N > 1):\n"                                             \
    "  --dispatch fp8|bf16|f32  dispatch as FP8 per-128 scaled (default), BF16, or f32 (lossless);\n"      \
    "                         in one process, round expert inputs/outputs the same way (default: exact)\n" \
    "  --placement FILE       EPLB placement (phy2log); default: expert e in slot e\n"               \
    "  --no-overlap           one micro-batch, transfers waited for at once (for comparison)\n"      \
    "  --ep-timeout-ms N      fail the group when a transfer is pending this long (default 30000)\n" \
    "  --link-gbps G, --link-latency-us U   emulate an inter-node link in the transport\n"          \
    "  --eplb-every N         online EPLB: consider a new placement every N steps\n"

/* Opens the model (or builds the demo) and an engine with a KV pool. */
static int open_engine(const engine_flags *f, int need_tokens, dsi_model **m, dsi_kv_pool **kv, dsi_engine **e) {
    int rc;
    if (f->model) {
        dsi_load_opts lo = {.progress = -1, .no_mmap = f->no_mmap};
        rc = dsi_model_load(f->model, f->no_mmap ? &lo : NULL, m);
    } else {
        dsi_config c;
        dsi_config_preset(DSI_PRESET_TINY, 0, 1, &c);
        rc = dsi_make_model_memory(&c, DEMO_SEED, m);
    }
    if (rc) { fprintf(stderr, "dsinfer: %s\n", dsi_last_error()); return rc; }
    const dsi_config *c = dsi_model_config(*m);
    /* 64-bit: --kv-tokens near INT_MAX must not overflow the rounding */
    int64_t tokens = f->kv_tokens > 0 ? f->kv_tokens : need_tokens;
    int64_t blocks = DSI_CEIL_DIV(tokens, (int64_t)DSI_KV_BLOCK_TOKENS) + 1;
    if (blocks > (1 << 24)) {
        fprintf(stderr, "dsinfer: a KV pool for %lld tokens is too large\n", (long long)tokens);
        dsi_model_destroy(*m);
        return DSI_ERANGE;
    }
    rc = dsi_kv_pool_create(c->n_layers, dsi_config_kv_dim(c), DSI_KV_BLOCK_TOKENS, (int)blocks, kv);
    if (!rc) {
        dsi_engine_opts o = {.n_threads = f->threads, .max_tokens = f->max_tokens, .attn = f->attn,
                             .fp8_activations = f->fp8_act, .kernels = f->kernels,
                             .batch_invariant = f->batch_invariant,
                             .moe_io = f->dispatch_given ? dsi_ep_moe_io(f->ep.dispatch) : DSI_MOE_IO_EXACT};
        rc = dsi_engine_create(*m, *kv, &o, e);
    }
    if (rc) {
        fprintf(stderr, "dsinfer: %s\n", dsi_last_error());
        dsi_kv_pool_destroy(*kv);
        dsi_model_destroy(*m);
    }
    return rc;
}

/* Joins the EP group when started by mpirun with several ranks: *ep stays
 * NULL otherwise. Collective. */
static int open_ep(const engine_flags *f, dsi_engine *e, dsi_ep **ep) {
    *ep = NULL;
    if (!dsi_ep_launched()) return DSI_OK;
    int rc = dsi_ep_init();
    if (rc == DSI_OK) rc = dsi_ep_create(e, &f->ep, ep);
    if (rc != DSI_OK) {
        fprintf(stderr, "dsinfer: expert parallelism: %s\n", dsi_last_error());
        dsi_ep_abort(1);
    }
    return rc;
}

/* A failed EP collective leaves the group out of step: report, end it. */
static void ep_fail(dsi_ep *ep, const char *cmd) {
    fprintf(stderr, "dsinfer %s: rank %d: %s\n", cmd, dsi_ep_rank(), dsi_last_error());
    if (ep) dsi_ep_abort(1);
}

static void close_ep(dsi_ep *ep) {
    if (!ep) return;
    dsi_ep_destroy(ep);
    dsi_ep_finalize();
}

static void close_engine(dsi_model *m, dsi_kv_pool *kv, dsi_engine *e) {
    dsi_engine_destroy(e);
    dsi_kv_pool_destroy(kv);
    dsi_model_destroy(m);
}


/* Runs several sequences batched, each step bringing every unfinished
 * sequence's next chunk (prefill) or token (after decode_from). Under EP only
 * the sequences this rank owns (index % ranks) run here, and the rank keeps
 * serving the others' experts until the whole group is done. */
static int run_logits_batch(dsi_engine *e, dsi_ep *ep, int32_t **ids, const int *lens, int n_seq, int chunk,
                            int decode_from, float **outs) {
    dsi_kv_pool *kv = dsi_engine_kv(e);
    int V = dsi_model_config(dsi_engine_model(e))->vocab_size, max = dsi_engine_max_tokens(e);
    int P = ep ? dsi_ep_size() : 1, me = ep ? dsi_ep_rank() : 0, rc = DSI_OK;
    int32_t **blocks = calloc(n_seq, sizeof(int32_t *));
    int *nb = calloc(n_seq, sizeof(int)), *pos = calloc(n_seq, sizeof(int));
    dsi_seq_step *batch = calloc(n_seq, sizeof(dsi_seq_step));
    if (!blocks || !nb || !pos || !batch) rc = dsi_error(DSI_ENOMEM, "out of memory");
    for (int s = 0; rc == DSI_OK && s < n_seq; s++) {
        if (s % P != me) continue;
        nb[s] = DSI_CEIL_DIV(lens[s], DSI_KV_BLOCK_TOKENS);
        if (!(blocks[s] = malloc(sizeof(int32_t) * nb[s]))) { rc = dsi_error(DSI_ENOMEM, "out of memory"); break; }
        for (int b = 0; b < nb[s]; b++)
            if ((blocks[s][b] = dsi_kv_alloc(kv)) < 0) {
                for (int j = 0; j < b; j++) dsi_kv_release(kv, blocks[s][j]);
                nb[s] = 0;
                rc = dsi_error(DSI_EBUSY, "KV pool full");
                break;
            }
    }
    int step = chunk > 0 ? DSI_MIN(chunk, max) : max;
    while (rc == DSI_OK) {
        int n = 0, T = 0;
        for (int s = 0; s < n_seq; s++) {
            if (s % P != me || pos[s] >= lens[s]) continue;
            int pend = decode_from >= 0 && decode_from < lens[s] ? decode_from : lens[s];
            int k = pos[s] < pend ? DSI_MIN(step, pend - pos[s]) : 1;
            if (T + k > max) continue;
            batch[n++] = (dsi_seq_step){ids[s] + pos[s], k, pos[s], blocks[s], nb[s], DSI_LOGITS_ALL,
                                        outs[s] + (size_t)pos[s] * V};
            pos[s] += k;
            T += k;
        }
        if (n == 0) break;
        rc = ep ? dsi_ep_step(ep, batch, n) : dsi_engine_step(e, batch, n);
    }
    if (rc == DSI_OK && ep) rc = dsi_ep_idle(ep);
    for (int s = 0; blocks && s < n_seq; s++) {
        for (int b = 0; b < nb[s]; b++) dsi_kv_release(kv, blocks[s][b]);
        free(blocks[s]);
    }
    free(blocks); free(nb); free(pos); free(batch);
    return rc;
}

int dsi_cmd_logits(int argc, char **argv) {
    int dev = dsi_cli_device(argc, argv); /* --device cuda: cmd_cuda.c */
    if (dev) return dev < 0 ? 2 : dsi_cmd_logits_cuda(argc, argv);
    engine_flags f = {0};
    const char *ids_s = NULL, *out_path = NULL;
    int chunk = 0, decode_from = -1, bad = 0;
    for (int i = 1; i < argc; i++) {
        int missing = 0, r;
        const char *v;
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            printf("usage: dsinfer logits --model DIR --ids 1,2,3 --out FILE [options]\n"
                   "Writes float32 logits for every position, [n, vocab], raw little-endian.\n"
                   "Several sequences separated by ';' run batched; sequence i > 0 goes to FILE.i.\n"
                   "Under mpirun -np N, sequence i runs on rank i %% N (DP attention) and that rank\n"
                   "writes its file; every rank serves its share of the experts.\n\n"
                   "  --ids LIST             comma-separated token ids (';' between sequences)\n"
                   "  --out FILE             output file\n"
                   "  --chunk K              prefill in chunks of K tokens\n"
                   "  --decode-from P        prefill P tokens, then one token per step (absorbed path)\n" ENGINE_FLAGS_HELP);
            return 0;
        }
        if ((r = parse_engine_flag(argc, argv, &i, &f, "logits", &bad))) { if (r < 0) return 2; continue; }
        if ((v = dsi_cli_flag(argc, argv, &i, "--ids", &missing))) ids_s = v;
        else if ((v = dsi_cli_flag(argc, argv, &i, "--out", &missing))) out_path = v;
        else if ((v = dsi_cli_flag(argc, argv, &i, "--chunk", &missing)))
            chunk = dsi_cli_int("logits", "--chunk", v, &bad);
        else if ((v = dsi_cli_flag(argc, argv, &i, "--decode-from", &missing)))
            decode_from = dsi_cli_int("logits", "--decode-from", v, &bad);
        else if (!missing) { fprintf(stderr, "dsinfer logits: unknown option '%s' (see --help)\n", argv[i]); return 2; }
        if (missing) { fprintf(stderr, "dsinfer logits: %s needs a value\n", argv[i]); return 2; }
    }
    if (bad) return 2;
    if (!ids_s || !out_path) { fprintf(stderr, "dsinfer logits: --ids and --out are required (see --help)\n"); return 2; }
    if (chunk < 0 || decode_from < -1) { fprintf(stderr, "dsinfer logits: bad --chunk or --decode-from\n"); return 2; }
    /* split the sequences */
    int n_seq = 1, total = 0;
    for (const char *p = ids_s; *p; p++) n_seq += *p == ';';
    int32_t **ids = calloc(n_seq, sizeof(int32_t *));
    int *lens = calloc(n_seq, sizeof(int));
    float **outs = calloc(n_seq, sizeof(float *));
    char *copy = strdup(ids_s);
    bad = !ids || !lens || !outs || !copy; /* 0 here: the flags parsed */
    char *save = NULL, *tok = bad ? NULL : strtok_r(copy, ";", &save);
    for (int s = 0; !bad && s < n_seq; s++, tok = strtok_r(NULL, ";", &save)) {
        if (!tok || (lens[s] = dsi_cli_parse_ids(tok, &ids[s])) <= 0) bad = 1;
        else total += lens[s];
    }
    free(copy);
    int rc = DSI_OK, code = 0;
    dsi_model *m = NULL; dsi_kv_pool *kv = NULL; dsi_engine *e = NULL; dsi_ep *ep = NULL;
    if (bad) {
        fprintf(stderr, "dsinfer logits: --ids must be comma-separated token ids, ';' between sequences\n");
        code = 2;
    } else if (open_engine(&f, total, &m, &kv, &e)) {
        code = 1;
    } else {
        open_ep(&f, e, &ep);
        int V = dsi_model_config(m)->vocab_size, P = ep ? dsi_ep_size() : 1, me = ep ? dsi_ep_rank() : 0;
        for (int s = 0; s < n_seq && rc == DSI_OK; s++)
            if (s % P == me && !(outs[s] = malloc(sizeof(float) * (size_t)lens[s] * V))) rc = dsi_error(DSI_ENOMEM, "out of memory");
        if (rc == DSI_OK) rc = run_logits_batch(e, ep, ids, lens, n_seq, chunk, decode_from, outs);
        if (rc != DSI_OK) ep_fail(ep, "logits");
        for (int s = 0; rc == DSI_OK && s < n_seq; s++) {
            if (s % P != me) continue;
            char path[4096];
            if (s == 0) snprintf(path, sizeof path, "%s", out_path);
            else snprintf(path, sizeof path, "%s.%d", out_path, s);
            FILE *fo = fopen(path, "wb");
            size_t n = (size_t)lens[s] * V;
            if (!fo || fwrite(outs[s], sizeof(float), n, fo) != n || fclose(fo) != 0)
                rc = dsi_error(DSI_EIO, "%s: write failed", path);
            if (rc) fprintf(stderr, "dsinfer logits: %s\n", dsi_last_error());
        }
        code = rc ? 1 : 0;
        close_ep(ep);
        close_engine(m, kv, e);
    }
    for (int s = 0; s < n_seq; s++) {
        if (ids) free(ids[s]);
        if (outs) free(outs[s]);
    }
    free(ids); free(lens); free(outs);
    return code;
}

/* Generates n tokens after the prompt (one sequence), printing ids. */
static int run_generate(dsi_engine *e, dsi_ep *ep, const int32_t *prompt, int n_prompt, int n_new,
                        const dsi_sampling *sp, int32_t *out_ids, double *prefill_s, double *decode_s) {
    const dsi_config *c = dsi_model_config(dsi_engine_model(e));
    dsi_kv_pool *kv = dsi_engine_kv(e);
    int total = n_prompt + n_new, nb = DSI_CEIL_DIV(total, DSI_KV_BLOCK_TOKENS);
    int32_t *blocks = malloc(sizeof(int32_t) * nb);
    float *logits = malloc(sizeof(float) * c->vocab_size);
    void *scratch = malloc(dsi_sampler_scratch_bytes(c->vocab_size));
    int got = 0, rc = DSI_OK;
    if (!blocks || !logits || !scratch) rc = dsi_error(DSI_ENOMEM, "out of memory");
    for (; !rc && got < nb; got++) {
        if ((blocks[got] = dsi_kv_alloc(kv)) < 0) rc = dsi_error(DSI_EBUSY, "KV pool too small for %d tokens", total);
    }
    dsi_sampler smp;
    dsi_sampler_init(&smp, sp);
    double t0 = dsi_now();
    int max = dsi_engine_max_tokens(e);
    for (int p = 0; !rc && p < n_prompt; p += max) {
        int k = DSI_MIN(max, n_prompt - p);
        dsi_seq_step s = {prompt + p, k, p, blocks, nb, p + k == n_prompt ? DSI_LOGITS_LAST : DSI_LOGITS_NONE, logits};
        rc = ep ? dsi_ep_step(ep, &s, 1) : dsi_engine_step(e, &s, 1);
    }
    double t1 = dsi_now();
    for (int i = 0; !rc && i < n_new; i++) {
        int32_t tok = dsi_sampler_pick(&smp, logits, c->vocab_size, scratch);
        out_ids[i] = tok;
        if (i + 1 == n_new) break;
        dsi_seq_step s = {&out_ids[i], 1, n_prompt + i, blocks, nb, DSI_LOGITS_LAST, logits};
        rc = ep ? dsi_ep_step(ep, &s, 1) : dsi_engine_step(e, &s, 1);
    }
    if (rc == DSI_OK && ep) rc = dsi_ep_idle(ep);
    double t2 = dsi_now();
    if (prefill_s) *prefill_s = t1 - t0;
    if (decode_s) *decode_s = t2 - t1;
    for (int i = 0; i < got; i++) dsi_kv_release(kv, blocks[i]);
    free(blocks);
    free(logits);
    free(scratch);
    return rc;
}

int dsi_cmd_generate(int argc, char **argv) {
    int dev = dsi_cli_device(argc, argv); /* --device cuda: cmd_cuda.c */
    if (dev) return dev < 0 ? 2 : dsi_cmd_generate_cuda(argc, argv);
    engine_flags f = {0};
    const char *ids_s = NULL;
    int n_new = 16, bad = 0;
    dsi_sampling sp = {0};
    for (int i = 1; i < argc; i++) {
        int missing = 0, r;
        const char *v;
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            printf("usage: dsinfer generate [--model DIR] --ids 1,2,3 [-n N] [sampling] [options]\n"
                   "Prints the generated token ids (greedy unless sampling flags are given).\n\n"
                   "  --ids LIST             prompt token ids\n"
                   "  -n N                   tokens to generate (default 16)\n"
                   "  --temperature T        sampling temperature (default 0 = greedy)\n"
                   "  --top-p P, --top-k K   nucleus / top-k filtering\n"
                   "  --seed S               sampling seed\n" ENGINE_FLAGS_HELP);
            return 0;
        }
        if ((r = parse_engine_flag(argc, argv, &i, &f, "generate", &bad))) { if (r < 0) return 2; continue; }
        if ((v = dsi_cli_flag(argc, argv, &i, "--ids", &missing))) ids_s = v;
        else if ((v = dsi_cli_flag(argc, argv, &i, "-n", &missing))) n_new = dsi_cli_int("generate", "-n", v, &bad);
        else if ((v = dsi_cli_flag(argc, argv, &i, "--temperature", &missing)))
            sp.temperature = (float)dsi_cli_num("generate", "--temperature", v, &bad);
        else if ((v = dsi_cli_flag(argc, argv, &i, "--top-p", &missing)))
            sp.top_p = (float)dsi_cli_num("generate", "--top-p", v, &bad);
        else if ((v = dsi_cli_flag(argc, argv, &i, "--top-k", &missing)))
            sp.top_k = dsi_cli_int("generate", "--top-k", v, &bad);
        else if ((v = dsi_cli_flag(argc, argv, &i, "--seed", &missing)))
            sp.seed = dsi_cli_u64("generate", "--seed", v, &bad);
        else if (!missing) { fprintf(stderr, "dsinfer generate: unknown option '%s' (see --help)\n", argv[i]); return 2; }
        if (missing) { fprintf(stderr, "dsinfer generate: %s needs a value\n", argv[i]); return 2; }
    }
    if (bad) return 2;
    if (!ids_s) { fprintf(stderr, "dsinfer generate: --ids is required (see --help)\n"); return 2; }
    if (n_new <= 0) { fprintf(stderr, "dsinfer generate: -n must be positive\n"); return 2; }
    int32_t *ids;
    int n = dsi_cli_parse_ids(ids_s, &ids);
    if (n <= 0) { fprintf(stderr, "dsinfer generate: --ids must be a comma-separated list of token ids\n"); return 2; }
    if (n_new > (1 << 30) - n) { /* n + n_new must not overflow */
        fprintf(stderr, "dsinfer generate: -n %d is too large\n", n_new);
        free(ids);
        return 2;
    }
    dsi_model *m; dsi_kv_pool *kv; dsi_engine *e;
    if (open_engine(&f, n + n_new, &m, &kv, &e)) { free(ids); return 1; }
    int32_t *out = malloc(sizeof(int32_t) * n_new);
    double tp, td;
    dsi_ep *ep;
    open_ep(&f, e, &ep);
    /* under EP, rank 0 owns the sequence; the others serve their experts */
    int rc = !ep || dsi_ep_rank() == 0 ? run_generate(e, ep, ids, n, n_new, &sp, out, &tp, &td) : dsi_ep_idle(ep);
    if (rc) ep_fail(ep, "generate");
    else if (ep && dsi_ep_rank() != 0) {
    } else {
        for (int i = 0; i < n_new; i++) printf("%s%d", i ? " " : "", out[i]);
        printf("\n");
        fprintf(stderr, "dsinfer: prefill %d tokens %.1f tok/s, decode %d tokens %.1f tok/s (%s, %d threads)\n", n,
                n / tp, n_new - 1, n_new > 1 ? (n_new - 1) / td : 0.0, dsi_engine_kernels_name(e), dsi_engine_n_threads(e));
    }
    free(out);
    free(ids);
    close_ep(ep);
    close_engine(m, kv, e);
    return rc ? 1 : 0;
}

/* N of the preset "v3-layers:N" (all of it a positive integer), else 0. */
static int v3_layers(const char *preset) {
    if (strncmp(preset, "v3-layers:", 10)) return 0;
    const char *n = preset + 10;
    char *end;
    if (!(*n >= '0' && *n <= '9')) return 0;
    errno = 0;
    long x = strtol(n, &end, 10);
    return !*end && !errno && x > 0 && x <= INT_MAX ? (int)x : 0;
}

int dsi_cmd_make_model(int argc, char **argv) {
    const char *preset = "tiny", *dtype = "fp8", *out = NULL;
    uint64_t seed = 1;
    int shard_mb = 0, bad = 0;
    for (int i = 1; i < argc; i++) {
        int missing = 0;
        const char *v;
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            printf("usage: dsinfer make-model --preset tiny|small|v3-layers:N --dtype fp8|bf16 --out DIR [--seed S] [--shard-mb M]\n"
                   "Writes a random-weight checkpoint in Hugging Face DeepSeek-V3 format (config.json,\n"
                   "sharded safetensors + index, FP8 e4m3 with 128x128 weight_scale_inv).\n"
                   "  tiny      the golden models' shape (4 layers, hidden 256)\n"
                   "  small     ~3.75B total / ~0.67B active: hidden 2048, 12 layers, 64 experts top-6\n"
                   "  v3-layers:N  DeepSeek-V3 width with N layers (first 3 dense)\n");
            return 0;
        }
        if ((v = dsi_cli_flag(argc, argv, &i, "--preset", &missing))) preset = v;
        else if ((v = dsi_cli_flag(argc, argv, &i, "--dtype", &missing))) dtype = v;
        else if ((v = dsi_cli_flag(argc, argv, &i, "--out", &missing))) out = v;
        else if ((v = dsi_cli_flag(argc, argv, &i, "--seed", &missing)))
            seed = dsi_cli_u64("make-model", "--seed", v, &bad);
        else if ((v = dsi_cli_flag(argc, argv, &i, "--shard-mb", &missing)))
            shard_mb = dsi_cli_int("make-model", "--shard-mb", v, &bad);
        else if (!missing) { fprintf(stderr, "dsinfer make-model: unknown option '%s'\n", argv[i]); return 2; }
        if (missing) { fprintf(stderr, "dsinfer make-model: %s needs a value\n", argv[i]); return 2; }
    }
    if (bad) return 2;
    if (!out) { fprintf(stderr, "dsinfer make-model: --out DIR is required\n"); return 2; }
    int fp8;
    if (!strcmp(dtype, "fp8")) fp8 = 1;
    else if (!strcmp(dtype, "bf16")) fp8 = 0;
    else { fprintf(stderr, "dsinfer make-model: --dtype must be fp8 or bf16\n"); return 2; }
    dsi_config c;
    if (!strcmp(preset, "tiny")) dsi_config_preset(DSI_PRESET_TINY, 0, fp8, &c);
    else if (!strcmp(preset, "small")) dsi_config_preset(DSI_PRESET_SMALL, 0, fp8, &c);
    else if (v3_layers(preset) > 0) dsi_config_preset(DSI_PRESET_V3, v3_layers(preset), fp8, &c);
    else { fprintf(stderr, "dsinfer make-model: unknown preset '%s' (tiny, small, v3-layers:N)\n", preset); return 2; }
    size_t shard = shard_mb > 0 ? (size_t)shard_mb << 20 : (size_t)2 << 30;
    if (!strcmp(preset, "tiny") && shard_mb <= 0) shard = 4 << 20; /* several shards even for tiny */
    double t0 = dsi_now();
    int rc = dsi_make_model(&c, out, seed, shard, 1);
    if (rc) { fprintf(stderr, "dsinfer make-model: %s\n", dsi_last_error()); return 1; }
    fprintf(stderr, "make-model: wrote %s (%s, %s) in %.1f s\n", out, preset, dtype, dsi_now() - t0);
    return 0;
}

int dsi_cmd_inspect(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        printf("usage: dsinfer inspect DIR\nValidates a checkpoint and prints its shape and size.\n");
        return argc < 2 ? 2 : 0;
    }
    /* an option here is a typo, not a folder named "--x" */
    if (argc > 2 || argv[1][0] == '-') {
        fprintf(stderr, "dsinfer inspect: unexpected argument '%s' (see --help)\n", argc > 2 ? argv[2] : argv[1]);
        return 2;
    }
    dsi_model *m;
    if (dsi_model_load(argv[1], NULL, &m)) { fprintf(stderr, "dsinfer inspect: %s\n", dsi_last_error()); return 1; }
    const dsi_config *c = dsi_model_config(m);
    printf("model %s: %d layers (%d dense), hidden %d, %d heads, q_lora %d, kv_lora %d, rope %d, nope %d, v %d\n",
           dsi_model_name(m), c->n_layers, c->first_k_dense, c->hidden, c->n_heads, c->q_lora_rank, c->kv_lora_rank,
           c->qk_rope_dim, c->qk_nope_dim, c->v_head_dim);
    printf("moe: %d experts top-%d in %d groups keep %d, %d shared, inter %d; vocab %d; %s\n", c->n_experts,
           c->n_experts_per_tok, c->n_group, c->topk_group, c->n_shared_experts, c->moe_inter, c->vocab_size,
           c->fp8 ? "fp8 e4m3 weights" : "bf16 weights");
    printf("weights %.3f GB total, %.3f GB read per token, %.3f GFLOP per token, fingerprint %016llx\n",
           dsi_model_total_bytes(m) / 1e9, dsi_model_active_bytes_per_token(m) / 1e9,
           dsi_model_flops_per_token(m) / 1e9, (unsigned long long)dsi_model_fingerprint(m));
    dsi_model_destroy(m);
    return 0;
}

/* The engine part of `dsinfer demo` (cmd_demo.c): greedy generation on the
 * built-in model. Returns 0 or prints the error and returns 1. */
int dsi__demo_engine(void) {
    engine_flags f = {0};
    dsi_model *m; dsi_kv_pool *kv; dsi_engine *e;
    if (open_engine(&f, 4096, &m, &kv, &e)) return 1;
    const dsi_config *c = dsi_model_config(m);
    int32_t prompt[32];
    for (int i = 0; i < 32; i++) prompt[i] = (i * 37 + 11) % c->vocab_size;
    int32_t out[64];
    dsi_sampling sp = {0};
    double tp, td;
    int rc = run_generate(e, NULL, prompt, 32, 64, &sp, out, &tp, &td);
    if (rc) { fprintf(stderr, "dsinfer demo: %s\n", dsi_last_error()); close_engine(m, kv, e); return 1; }
    printf("engine: built-in model (%d layers, hidden %d, MLA kv_lora %d, %d experts top-%d in %d groups, FP8 "
           "weights, fingerprint %016llx)\n",
           c->n_layers, c->hidden, c->kv_lora_rank, c->n_experts, c->n_experts_per_tok, c->n_group,
           (unsigned long long)dsi_model_fingerprint(m));
    printf("  32-token prompt, greedy continuation:");
    for (int i = 0; i < 16; i++) printf(" %d", out[i]);
    printf(" ...\n  prefill %.0f tok/s, decode %.0f tok/s (%s kernels, %d threads)\n", 32 / tp, 63 / td,
           dsi_engine_kernels_name(e), dsi_engine_n_threads(e));
    close_engine(m, kv, e);
    return 0;
}
