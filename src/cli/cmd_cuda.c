/* `dsinfer logits|generate --device cuda`: the same subcommands on the CUDA
 * engine (dsinfer/cuda.h). cmd_model.c hands over here when --device cuda is
 * given; flags mean the same, plus the CUDA-only ones below. */
#include "cli/cli.h"
#include "dsinfer/cuda.h"
#include "dsinfer/model.h"
#include "dsinfer/sampler.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DEMO_SEED 20250227ull /* the same built-in demo model as cmd_model.c */

int dsi_cli_device(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        int missing = 0;
        const char *v = dsi_cli_flag(argc, argv, &i, "--device", &missing);
        if (missing) { fprintf(stderr, "dsinfer: --device needs a value (cpu or cuda)\n"); return -1; }
        if (!v) continue;
        if (!strcmp(v, "cpu")) return 0;
        if (!strcmp(v, "cuda")) return 1;
        fprintf(stderr, "dsinfer: --device must be cpu or cuda\n");
        return -1;
    }
    return 0;
}

typedef struct cuda_flags {
    const char *model, *ids;
    const char *out;            /* logits */
    int chunk, decode_from;     /* logits */
    int n_new;                  /* generate */
    dsi_sampling sp;            /* generate */
    dsi_cuda_opts o;
    int kv_tokens;
} cuda_flags;

#define CUDA_FLAGS_HELP                                                                             \
    "  --model DIR            checkpoint directory (default: the built-in demo model)\n"            \
    "  --device cuda          run on GPU 0 (this help); --device cpu is the default engine\n"       \
    "  --gemm simple|cublaslt linear layers: exact CUDA-core kernel, or FP8 through cuBLASLt\n"     \
    "                         (activations quantised per 1x128 tile, as DeepSeek serves)\n"         \
    "  --kv-bf16              keep the latent cache in BF16 (default float32)\n"                    \
    "  --no-graphs            do not replay decode steps from CUDA graphs\n"                        \
    "  --attn-tc              attention on the tensor cores (implies --kv-bf16; 512+64 latent only)\n" \
    "  --max-batch-tokens N   tokens per forward step (default 2048)\n"                             \
    "  --kv-tokens N          device KV capacity in tokens (default: enough for the request)\n"     \
    "  (--threads, --kernels, --attn, --fp8-act are CPU options and are ignored here)\n"

/* Returns 1 if consumed, 0 if not a shared flag, -1 on error. A value that
 * is not a number sets *bad (message printed) and is consumed. */
static int parse_flag(int argc, char **argv, int *i, cuda_flags *f, const char *cmd, int *bad) {
    int missing = 0;
    const char *v;
    if ((v = dsi_cli_flag(argc, argv, i, "--model", &missing))) f->model = v;
    else if ((v = dsi_cli_flag(argc, argv, i, "--ids", &missing))) f->ids = v;
    else if ((v = dsi_cli_flag(argc, argv, i, "--device", &missing))) (void)v;
    else if ((v = dsi_cli_flag(argc, argv, i, "--max-batch-tokens", &missing)))
        f->o.max_tokens = dsi_cli_int(cmd, "--max-batch-tokens", v, bad);
    else if ((v = dsi_cli_flag(argc, argv, i, "--kv-tokens", &missing)))
        f->kv_tokens = dsi_cli_int(cmd, "--kv-tokens", v, bad);
    else if ((v = dsi_cli_flag(argc, argv, i, "--threads", &missing))) (void)v;
    else if ((v = dsi_cli_flag(argc, argv, i, "--kernels", &missing))) (void)v;
    else if ((v = dsi_cli_flag(argc, argv, i, "--attn", &missing))) (void)v;
    else if ((v = dsi_cli_flag(argc, argv, i, "--gemm", &missing))) {
        if (!strcmp(v, "simple")) f->o.gemm = DSI_CUDA_GEMM_SIMPLE;
        else if (!strcmp(v, "cublaslt")) f->o.gemm = DSI_CUDA_GEMM_CUBLASLT;
        else { fprintf(stderr, "dsinfer %s: --gemm must be simple or cublaslt\n", cmd); return -1; }
    } else if (!strcmp(argv[*i], "--kv-bf16")) f->o.kv_bf16 = 1;
    else if (!strcmp(argv[*i], "--no-graphs")) f->o.graphs = 0;
    else if (!strcmp(argv[*i], "--attn-tc")) f->o.attn_tc = f->o.kv_bf16 = 1;
    else if (!strcmp(argv[*i], "--fp8-act")) (void)0;
    else if (!missing) return 0;
    if (missing) { fprintf(stderr, "dsinfer %s: %s needs a value\n", cmd, argv[*i]); return -1; }
    return 1;
}


/* Loads the model (or builds the demo) and the CUDA engine. */
static int open_cuda(cuda_flags *f, int need_tokens, dsi_model **m, dsi_cuda_engine **e) {
    int rc;
    if (dsi_cuda_device_count() <= 0) {
        fprintf(stderr, "dsinfer: --device cuda: no CUDA device%s\n",
#ifdef DSI_HAVE_CUDA
                " (or no driver) on this machine"
#else
                " support in this build (nvcc was not found)"
#endif
        );
        return DSI_EUNSUPPORTED;
    }
    if (f->model) {
        rc = dsi_model_load(f->model, NULL, m);
    } else {
        dsi_config c;
        dsi_config_preset(DSI_PRESET_TINY, 0, 1, &c);
        rc = dsi_make_model_memory(&c, DEMO_SEED, m);
    }
    if (rc) { fprintf(stderr, "dsinfer: %s\n", dsi_last_error()); return rc; }
    int tokens = f->kv_tokens > 0 ? f->kv_tokens : need_tokens;
    f->o.kv_blocks = DSI_CEIL_DIV(tokens, DSI_KV_BLOCK_TOKENS) + 1;
    f->o.max_seqs = 1;
    if ((rc = dsi_cuda_engine_create(*m, &f->o, e))) {
        fprintf(stderr, "dsinfer: %s\n", dsi_last_error());
        dsi_model_destroy(*m);
    }
    return rc;
}

int dsi_cmd_logits_cuda(int argc, char **argv) {
    cuda_flags f = {.decode_from = -1, .o = {.graphs = 1}};
    int bad = 0; /* a value is not a number (message printed) */
    for (int i = 1; i < argc; i++) {
        int missing = 0, r;
        const char *v;
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            printf("usage: dsinfer logits --device cuda [--model DIR] --ids 1,2,3 --out FILE [options]\n"
                   "Writes float32 logits for every position, [n, vocab], raw little-endian.\n\n"
                   "  --ids LIST             comma-separated token ids\n"
                   "  --out FILE             output file\n"
                   "  --chunk K              prefill in chunks of K tokens\n"
                   "  --decode-from P        prefill P tokens, then one token per step\n" CUDA_FLAGS_HELP);
            return 0;
        }
        if ((r = parse_flag(argc, argv, &i, &f, "logits", &bad))) { if (r < 0) return 2; continue; }
        if ((v = dsi_cli_flag(argc, argv, &i, "--out", &missing))) f.out = v;
        else if ((v = dsi_cli_flag(argc, argv, &i, "--chunk", &missing)))
            f.chunk = dsi_cli_int("logits", "--chunk", v, &bad);
        else if ((v = dsi_cli_flag(argc, argv, &i, "--decode-from", &missing)))
            f.decode_from = dsi_cli_int("logits", "--decode-from", v, &bad);
        else if (!missing) { fprintf(stderr, "dsinfer logits: unknown option '%s' (see --help)\n", argv[i]); return 2; }
        if (missing) { fprintf(stderr, "dsinfer logits: %s needs a value\n", argv[i]); return 2; }
    }
    if (bad) return 2;
    if (!f.ids || !f.out) { fprintf(stderr, "dsinfer logits: --ids and --out are required (see --help)\n"); return 2; }
    if (f.chunk < 0 || f.decode_from < -1) { fprintf(stderr, "dsinfer logits: bad --chunk or --decode-from\n"); return 2; }
    int32_t *ids;
    int n = dsi_cli_parse_ids(f.ids, &ids);
    if (n <= 0) { fprintf(stderr, "dsinfer logits: --ids must be a comma-separated list of token ids\n"); return 2; }
    dsi_model *m;
    dsi_cuda_engine *e;
    if (open_cuda(&f, n, &m, &e)) { free(ids); return 1; }
    int V = dsi_model_config(m)->vocab_size;
    float *out = malloc(sizeof(float) * (size_t)n * V);
    int rc = out ? dsi_cuda_engine_logits(e, ids, n, f.chunk, f.decode_from, out) : dsi_error(DSI_ENOMEM, "out of memory");
    if (rc == DSI_OK) {
        FILE *fo = fopen(f.out, "wb");
        if (!fo || fwrite(out, sizeof(float), (size_t)n * V, fo) != (size_t)n * V || fclose(fo) != 0)
            rc = dsi_error(DSI_EIO, "%s: write failed", f.out);
    }
    if (rc) fprintf(stderr, "dsinfer logits: %s\n", dsi_last_error());
    free(out);
    free(ids);
    dsi_cuda_engine_destroy(e);
    dsi_model_destroy(m);
    return rc ? 1 : 0;
}

int dsi_cmd_generate_cuda(int argc, char **argv) {
    cuda_flags f = {.n_new = 16, .o = {.graphs = 1}};
    int bad = 0; /* a value is not a number (message printed) */
    for (int i = 1; i < argc; i++) {
        int missing = 0, r;
        const char *v;
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            printf("usage: dsinfer generate --device cuda [--model DIR] --ids 1,2,3 [-n N] [sampling] [options]\n"
                   "Prints the generated token ids (greedy unless sampling flags are given).\n\n"
                   "  -n N                   tokens to generate (default 16)\n"
                   "  --temperature T, --top-p P, --top-k K, --seed S   sampling\n" CUDA_FLAGS_HELP);
            return 0;
        }
        if ((r = parse_flag(argc, argv, &i, &f, "generate", &bad))) { if (r < 0) return 2; continue; }
        if ((v = dsi_cli_flag(argc, argv, &i, "-n", &missing))) f.n_new = dsi_cli_int("generate", "-n", v, &bad);
        else if ((v = dsi_cli_flag(argc, argv, &i, "--temperature", &missing)))
            f.sp.temperature = (float)dsi_cli_num("generate", "--temperature", v, &bad);
        else if ((v = dsi_cli_flag(argc, argv, &i, "--top-p", &missing)))
            f.sp.top_p = (float)dsi_cli_num("generate", "--top-p", v, &bad);
        else if ((v = dsi_cli_flag(argc, argv, &i, "--top-k", &missing)))
            f.sp.top_k = dsi_cli_int("generate", "--top-k", v, &bad);
        else if ((v = dsi_cli_flag(argc, argv, &i, "--seed", &missing)))
            f.sp.seed = dsi_cli_u64("generate", "--seed", v, &bad);
        else if (!missing) { fprintf(stderr, "dsinfer generate: unknown option '%s' (see --help)\n", argv[i]); return 2; }
        if (missing) { fprintf(stderr, "dsinfer generate: %s needs a value\n", argv[i]); return 2; }
    }
    if (bad) return 2;
    if (!f.ids) { fprintf(stderr, "dsinfer generate: --ids is required (see --help)\n"); return 2; }
    if (f.n_new <= 0) { fprintf(stderr, "dsinfer generate: -n must be positive\n"); return 2; }
    int32_t *ids;
    int n = dsi_cli_parse_ids(f.ids, &ids);
    if (n <= 0) { fprintf(stderr, "dsinfer generate: --ids must be a comma-separated list of token ids\n"); return 2; }
    dsi_model *m;
    dsi_cuda_engine *e;
    if (open_cuda(&f, n + f.n_new, &m, &e)) { free(ids); return 1; }
    int V = dsi_model_config(m)->vocab_size, total = n + f.n_new, nb = DSI_CEIL_DIV(total, DSI_KV_BLOCK_TOKENS);
    int32_t *blocks = malloc(sizeof(int32_t) * nb), *out = malloc(sizeof(int32_t) * f.n_new);
    float *logits = malloc(sizeof(float) * V);
    void *scratch = malloc(dsi_sampler_scratch_bytes(V));
    int rc = blocks && out && logits && scratch ? DSI_OK : dsi_error(DSI_ENOMEM, "out of memory"), got = 0;
    for (; !rc && got < nb; got++)
        if ((blocks[got] = dsi_cuda_kv_alloc(e)) < 0) rc = dsi_error(DSI_EBUSY, "KV too small for %d tokens", total);
    dsi_sampler smp;
    dsi_sampler_init(&smp, &f.sp);
    int max = f.o.max_tokens > 0 ? f.o.max_tokens : 2048;
    double t0 = dsi_now();
    for (int p = 0; !rc && p < n; p += max) {
        int k = DSI_MIN(max, n - p);
        dsi_seq_step s = {ids + p, k, p, blocks, nb, p + k == n ? DSI_LOGITS_LAST : DSI_LOGITS_NONE, logits};
        rc = dsi_cuda_engine_step(e, &s, 1);
    }
    double t1 = dsi_now();
    for (int i = 0; !rc && i < f.n_new; i++) {
        out[i] = dsi_sampler_pick(&smp, logits, V, scratch);
        if (i + 1 == f.n_new) break;
        dsi_seq_step s = {&out[i], 1, n + i, blocks, nb, DSI_LOGITS_LAST, logits};
        rc = dsi_cuda_engine_step(e, &s, 1);
    }
    double t2 = dsi_now();
    if (rc) {
        fprintf(stderr, "dsinfer generate: %s\n", dsi_last_error());
    } else {
        for (int i = 0; i < f.n_new; i++) printf("%s%d", i ? " " : "", out[i]);
        printf("\n");
        fprintf(stderr, "dsinfer: prefill %d tokens %.1f tok/s, decode %d tokens %.1f tok/s (cuda, gemm %s)\n", n,
                n / (t1 - t0), f.n_new - 1, f.n_new > 1 ? (f.n_new - 1) / (t2 - t1) : 0.0,
                f.o.gemm == DSI_CUDA_GEMM_CUBLASLT ? "cublaslt" : "simple");
    }
    for (int i = 0; i < got; i++) dsi_cuda_kv_release(e, blocks[i]);
    free(blocks); free(out); free(logits); free(scratch); free(ids);
    dsi_cuda_engine_destroy(e);
    dsi_model_destroy(m);
    return rc ? 1 : 0;
}
