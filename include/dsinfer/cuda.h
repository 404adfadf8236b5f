/* dsinfer/cuda.h - the CUDA backend (Hopper, sm_90a): the whole forward pass
 * on one GPU, weights resident in their stored dtype (FP8 e4m3 + 128x128
 * scales, BF16), a paged latent KV cache in device memory.
 *
 * It mirrors dsi_engine (dsinfer/engine.h) and takes the same dsi_seq_step
 * batches, but owns its KV blocks (device memory): block ids in a step's
 * block tables come from dsi_cuda_kv_alloc on the same engine.
 *
 *     if (dsi_cuda_device_count() <= 0) ... no GPU: use the CPU engine
 *     dsi_cuda_engine *g;
 *     dsi_cuda_opts o = {.kv_blocks = 64};
 *     if (dsi_cuda_engine_create(model, &o, &g) != DSI_OK) die(dsi_last_error());
 *     float *logits = malloc(n * vocab * sizeof(float));
 *     dsi_cuda_engine_logits(g, ids, n, 0, -1, logits);
 *     dsi_cuda_engine_destroy(g);
 *
 * Built only when nvcc is found (DSI_HAVE_CUDA); otherwise every function
 * returns DSI_EUNSUPPORTED and dsi_cuda_device_count() returns 0. No CUDA
 * type appears here. One step at a time per engine. */
#ifndef DSINFER_CUDA_H
#define DSINFER_CUDA_H

#include "dsinfer/engine.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Number of usable CUDA devices; 0 when the build has no CUDA, no driver is
 * installed or no device is present (never an error). */
int dsi_cuda_device_count(void);
/* One-line description of device `dev` ("NVIDIA H100 80GB HBM3, sm_90, 132 SMs,
 * 79.1 GiB") into buf; DSI_OK or an error status. */
int dsi_cuda_device_describe(int dev, char *buf, size_t n);

typedef enum dsi_cuda_gemm {
    DSI_CUDA_GEMM_SIMPLE = 0,  /* our tiled CUDA-core kernel: float32 activations, exact dequantisation */
    DSI_CUDA_GEMM_CUBLASLT,    /* FP8 on the tensor cores, activations quantised to e4m3 per 1x128
                                  tile as DeepSeek serves: dense FP8 weights through cuBLASLt
                                  (128x128 weight scales), routed experts through our grouped
                                  mma.sync kernel; other weights and shapes: simple */
} dsi_cuda_gemm;

typedef struct dsi_cuda_opts {
    int device;          /* CUDA device ordinal (default 0) */
    int max_tokens;      /* most tokens in one step; 0 = 2048 */
    int max_logits;      /* most logit rows in one step; 0 = max_tokens */
    int max_seqs;        /* most sequences in one step; 0 = max(1, min(max_tokens, 256)) */
    int kv_blocks;       /* device KV blocks of 64 tokens; 0 = 64 */
    int max_blocks_per_seq; /* block-table width; 0 = ceil(max_position_embeddings / 64) capped at 1024 */
    int kv_bf16;         /* store the latent cache in BF16 (as FlashMLA) instead of float32 */
    int attn_tc;         /* attention on the tensor cores (needs kv_bf16 and DeepSeek's 512 + 64
                            latent; queries/probabilities in BF16); else the float32 kernel */
    dsi_cuda_gemm gemm;
    int graphs;          /* replay decode steps (<= graph_max_tokens) from CUDA graphs */
    int graph_max_tokens;/* 0 = 256 */
} dsi_cuda_opts;

typedef struct dsi_cuda_engine dsi_cuda_engine;

/* Uploads the model's weights (borrowed only during the call) and allocates
 * the KV cache and scratch on the device. */
int dsi_cuda_engine_create(const dsi_model *m, const dsi_cuda_opts *opts, dsi_cuda_engine **out);
void dsi_cuda_engine_destroy(dsi_cuda_engine *e);
/* One forward step; same contract as dsi_engine_step (block ids from
 * dsi_cuda_kv_alloc). Logits are copied to the callers' buffers before it
 * returns. */
int dsi_cuda_engine_step(dsi_cuda_engine *e, const dsi_seq_step *seqs, int n_seqs);
/* Same contract as dsi_engine_logits. */
int dsi_cuda_engine_logits(dsi_cuda_engine *e, const int32_t *ids, int n, int chunk, int decode_from, float *out);

/* Device KV blocks: a free list on the host side of the engine. */
int dsi_cuda_kv_alloc(dsi_cuda_engine *e);          /* block id, or -1 when none is free */
void dsi_cuda_kv_release(dsi_cuda_engine *e, int block);
int dsi_cuda_kv_n_free(const dsi_cuda_engine *e);
/* Bytes of device memory the weights take. */
double dsi_cuda_engine_weight_bytes(const dsi_cuda_engine *e);

#ifdef __cplusplus
}
#endif
#endif
