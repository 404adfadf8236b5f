/* Small fused ops of the forward pass (norms, activation, embedding, the MoE
 * gate, dispatch and combine) and the host wrappers C code uses. Each one is
 * specified by the CPU code it mirrors (src/engine/ stage files), operation for
 * operation where float rounding order matters. */
#include <float.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/common.cuh"

/* ------------------------------------------------------------------ host wrappers */

extern "C" int dsi_cuda_device_count(void) {
    int n = 0;
    cudaError_t err = cudaGetDeviceCount(&n);
    if (err != cudaSuccess) {
        (void)cudaGetLastError(); /* no driver / no device: not an error for the caller */
        return 0;
    }
    return n;
}

extern "C" int dsi_cuda_device_describe(int dev, char *buf, size_t n) {
    cudaDeviceProp p;
    int rc = DSI_CU(cudaGetDeviceProperties(&p, dev));
    if (rc) return rc;
    snprintf(buf, n, "%s, sm_%d%d, %d SMs, %.1f GiB", p.name, p.major, p.minor, p.multiProcessorCount,
             p.totalGlobalMem / 1073741824.0);
    return DSI_OK;
}

extern "C" int dsi__cuda_malloc(void **p, size_t bytes) {
    *p = NULL;
    if (bytes == 0) bytes = 16;
    cudaError_t err = cudaMalloc(p, bytes);
    if (err != cudaSuccess) {
        *p = NULL;
        return dsi_error(err == cudaErrorMemoryAllocation ? DSI_ENOMEM : DSI_EINTERNAL,
                         "cuda: cannot allocate %.1f MiB of device memory: %s", bytes / 1048576.0,
                         cudaGetErrorString(err));
    }
    return DSI_OK;
}
extern "C" void dsi__cuda_free(void *p) {
    if (p) cudaFree(p);
}
extern "C" int dsi__cuda_h2d(void *dst, const void *src, size_t bytes) {
    return DSI_CU(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
}
extern "C" int dsi__cuda_d2h(void *dst, const void *src, size_t bytes) {
    return DSI_CU(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
}
extern "C" int dsi__cuda_d2d(void *dst, const void *src, size_t bytes) {
    return DSI_CU(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, 0));
}
extern "C" int dsi__cuda_memset(void *dst, int v, size_t bytes) { return DSI_CU(cudaMemset(dst, v, bytes)); }
extern "C" int dsi__cuda_sync(void) { return DSI_CU(cudaDeviceSynchronize()); }

extern "C" int dsi__cuda_upload_mat(const dsi_mat *W, dsi_dmat *out) {
    memset(out, 0, sizeof *out);
    if (!W || !W->data || W->rows <= 0 || W->cols <= 0) return dsi_error(DSI_EINVAL, "cuda upload: empty weight");
    out->dtype = W->dtype;
    out->rows = W->rows;
    out->cols = W->cols;
    out->batch = 1;
    out->block_rows = W->block_rows > 0 ? W->block_rows : 128;
    out->block_cols = W->block_cols > 0 ? W->block_cols : 128;
    size_t bytes = (size_t)W->rows * W->cols * dsi_dtype_size(W->dtype);
    int rc = dsi__cuda_malloc(&out->data, bytes);
    if (!rc) rc = dsi__cuda_h2d(out->data, W->data, bytes);
    if (!rc && W->dtype == DSI_F8_E4M3) {
        if (!W->scale_inv) rc = dsi_error(DSI_EINVAL, "cuda upload: FP8 weight without scales");
        out->scale_rows = (W->rows + out->block_rows - 1) / out->block_rows;
        out->scale_cols = (W->cols + out->block_cols - 1) / out->block_cols;
        size_t sb = sizeof(float) * out->scale_rows * out->scale_cols;
        if (!rc) rc = dsi__cuda_malloc((void **)&out->scale, sb);
        if (!rc) rc = dsi__cuda_h2d(out->scale, W->scale_inv, sb);
    }
    if (rc) dsi__cuda_free_mat(out);
    return rc;
}

extern "C" void dsi__cuda_free_mat(dsi_dmat *m) {
    if (!m) return;
    dsi__cuda_free(m->data);
    dsi__cuda_free(m->scale);
    dsi__cuda_free(m->scale_lt);
    memset(m, 0, sizeof *m);
}

struct dsi_cuda_timer {
    cudaEvent_t a, b;
};
extern "C" int dsi__cuda_timer_create(dsi_cuda_timer **t) {
    *t = (dsi_cuda_timer *)calloc(1, sizeof **t);
    if (!*t) return dsi_error(DSI_ENOMEM, "out of memory");
    int rc = DSI_CU(cudaEventCreate(&(*t)->a));
    if (!rc) rc = DSI_CU(cudaEventCreate(&(*t)->b));
    if (rc) { free(*t); *t = NULL; }
    return rc;
}
extern "C" void dsi__cuda_timer_start(dsi_cuda_timer *t) { cudaEventRecord(t->a, 0); }
extern "C" double dsi__cuda_timer_stop(dsi_cuda_timer *t) {
    float ms = 0;
    cudaEventRecord(t->b, 0);
    cudaEventSynchronize(t->b);
    cudaEventElapsedTime(&ms, t->a, t->b);
    return ms * 1e-3;
}
extern "C" void dsi__cuda_timer_destroy(dsi_cuda_timer *t) {
    if (!t) return;
    cudaEventDestroy(t->a);
    cudaEventDestroy(t->b);
    free(t);
}

/* ------------------------------------------------------------------ RMSNorm, SiLU-mul, embedding */

__global__ void rmsnorm_kernel(const float *x, long ldx, const float *w, int n, float eps, float *out, long ldo) {
    __shared__ double red[32];
    const float *xr = x + (long)blockIdx.x * ldx;
    float *o = out + (long)blockIdx.x * ldo;
    double ss = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) ss += (double)xr[i] * xr[i];
    ss = dsi_block_sum(ss, red);
    float r = (float)(1.0 / sqrt(ss / n + eps));
    for (int i = threadIdx.x; i < n; i += blockDim.x) o[i] = xr[i] * r * w[i];
}

extern "C" int dsi__cuda_rmsnorm(const float *d_x, long ldx, const float *d_w, int rows, int n, float eps,
                                 float *d_out, long ldo, void *stream) {
    if (rows <= 0) return DSI_OK;
    rmsnorm_kernel<<<rows, 256, 0, (cudaStream_t)stream>>>(d_x, ldx, d_w, n, eps, d_out, ldo);
    return DSI_CU_LAUNCHED("rmsnorm_kernel");
}

__global__ void silu_mul_kernel(float *h1, const float *h2, int rows, const int *d_rows, int n) {
    long total = (long)(d_rows ? *d_rows : rows) * n;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
        float a = h1[i];
        h1[i] = a / (1.0f + expf(-a)) * h2[i];
    }
}

extern "C" int dsi__cuda_silu_mul(float *d_h1, const float *d_h2, int rows, const int *d_rows, int n, void *stream) {
    if (rows <= 0 || n <= 0) return DSI_OK;
    long total = (long)rows * n;
    unsigned blocks = (unsigned)DSI_MIN((total + 255) / 256, 8192L);
    silu_mul_kernel<<<blocks, 256, 0, (cudaStream_t)stream>>>(d_h1, d_h2, rows, d_rows, n);
    return DSI_CU_LAUNCHED("silu_mul_kernel");
}

__global__ void embed_kernel(dsi_dev_mat E, const int32_t *tokens, float *x) {
    int t = blockIdx.x, tok = tokens[t];
    if (tok < 0 || tok >= E.rows) tok = 0; /* validated on the host; never read out of bounds */
    for (int d = threadIdx.x; d < E.cols; d += blockDim.x) x[(long)t * E.cols + d] = E.get(0, tok, d);
}

extern "C" int dsi__cuda_embed(const dsi_dmat *E, const int32_t *d_tokens, int T, float *d_x, void *stream) {
    if (T <= 0) return DSI_OK;
    embed_kernel<<<T, 256, 0, (cudaStream_t)stream>>>(dsi__dev_mat(E), d_tokens, d_x);
    return DSI_CU_LAUNCHED("embed_kernel");
}

__global__ void gather_rows_kernel(const float *x, const int *rows, int D, float *out) {
    const float *src = x + (long)rows[blockIdx.x] * D;
    float *dst = out + (long)blockIdx.x * D;
    for (int d = threadIdx.x; d < D; d += blockDim.x) dst[d] = src[d];
}

extern "C" int dsi__cuda_gather_rows(const float *d_x, const int *d_rows, int R, int D, float *d_out, void *stream) {
    if (R <= 0) return DSI_OK;
    gather_rows_kernel<<<R, 256, 0, (cudaStream_t)stream>>>(d_x, d_rows, D, d_out);
    return DSI_CU_LAUNCHED("gather_rows_kernel");
}

/* ------------------------------------------------------------------ MoE gate */

/* One block per token: sigmoid in parallel, then one thread runs the
 * selection exactly as dsi__moe_gate (same comparisons, same tie order);
 * E <= 4096 and G <= 4096 as on the CPU. Shared: score[E], choice[E], gs[G], keep[G]. */
__global__ void moe_gate_kernel(const float *logits, const float *bias, int E, int G, int topk_group, int K,
                                int norm, float scaling, int *ids_out, float *w_out) {
    extern __shared__ float sh[];
    float *score = sh, *choice = sh + E, *gs = sh + 2 * E;
    int *keep = (int *)(gs + G);
    int t = blockIdx.x;
    const float *lg = logits + (long)t * E;
    for (int i = threadIdx.x; i < E; i += blockDim.x) {
        score[i] = 1.0f / (1.0f + expf(-lg[i]));
        choice[i] = score[i] + (bias ? bias[i] : 0.0f);
    }
    __syncthreads();
    if (threadIdx.x != 0) return;
    int per = E / G;
    int *ids = ids_out + (long)t * K;
    float *w = w_out + (long)t * K;
    if (G > 1) {
        for (int g = 0; g < G; g++) {
            float a = -FLT_MAX, b = -FLT_MAX;
            for (int i = g * per; i < (g + 1) * per; i++) {
                float v = choice[i];
                if (v > a) { b = a; a = v; }
                else if (v > b) b = v;
            }
            gs[g] = per >= 2 ? a + b : a;
            keep[g] = 0;
        }
        for (int r = 0; r < topk_group; r++) {
            int best = -1;
            for (int g = 0; g < G; g++)
                if (!keep[g] && (best < 0 || gs[g] > gs[best])) best = g;
            if (best >= 0) keep[best] = 1;
        }
        for (int g = 0; g < G; g++)
            if (!keep[g])
                for (int i = g * per; i < (g + 1) * per; i++) choice[i] = -INFINITY;
    }
    for (int r = 0; r < K; r++) {
        int best = -1;
        for (int i = 0; i < E; i++) {
            if (choice[i] == -INFINITY) continue;
            int taken = 0;
            for (int q = 0; q < r; q++) taken |= ids[q] == i;
            if (!taken && (best < 0 || choice[i] > choice[best])) best = i;
        }
        ids[r] = best < 0 ? 0 : best; /* cannot happen for a valid config (K <= kept experts) */
    }
    double sum = 0;
    for (int r = 0; r < K; r++) { w[r] = score[ids[r]]; sum += w[r]; }
    for (int r = 0; r < K; r++) {
        if (norm) w[r] = (float)(w[r] / (sum + 1e-20));
        w[r] *= scaling;
    }
}

extern "C" int dsi__cuda_moe_gate(const dsi_config *c, const float *d_logits, const float *d_bias, int T, int *d_ids,
                                  float *d_w, void *stream) {
    int E = c->n_experts, G = c->n_group > 0 ? c->n_group : 1;
    if (T <= 0) return DSI_OK;
    if (E <= 0 || E > 4096 || G > 4096 || E % G || c->n_experts_per_tok <= 0)
        return dsi_error(DSI_EINVAL, "cuda moe gate: unsupported geometry E=%d G=%d", E, G);
    size_t sh = sizeof(float) * (2 * E + G) + sizeof(int) * G;
    moe_gate_kernel<<<T, 128, sh, (cudaStream_t)stream>>>(d_logits, d_bias, E, G, c->topk_group,
                                                           c->n_experts_per_tok, c->norm_topk_prob,
                                                           c->routed_scaling_factor, d_ids, d_w);
    return DSI_CU_LAUNCHED("moe_gate_kernel");
}

/* ------------------------------------------------------------------ MoE dispatch / combine */

__global__ void moe_count_kernel(const int *ids, int n, int E, int *count) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        int e = ids[i];
        if (e >= 0 && e < E) atomicAdd(&count[e], 1);
    }
}

/* Exclusive scan of the counts (E is small: one thread), then the counts
 * become fill cursors. */
__global__ void moe_scan_kernel(int *count, int *offset, int E) {
    if (threadIdx.x || blockIdx.x) return;
    offset[0] = 0;
    for (int e = 0; e < E; e++) {
        offset[e + 1] = offset[e] + count[e];
        count[e] = 0;
    }
}

/* Slot order inside an expert depends on atomics; results do not, since each
 * row of an expert GEMM is computed independently and combine reads the
 * slots back in (token, rank) order. */
__global__ void moe_assign_kernel(const int *ids, int n, int K, int E, const int *offset, int *fill, int *slot_of,
                                  int *slot_tok) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    int e = ids[i];
    if (e < 0 || e >= E) e = 0;
    int slot = offset[e] + atomicAdd(&fill[e], 1);
    slot_of[i] = slot;
    slot_tok[slot] = i / K;
}

__global__ void moe_gather_kernel(const float *xn, const int *slot_tok, int D, float *ex) {
    const float *src = xn + (long)slot_tok[blockIdx.x] * D;
    float *dst = ex + (long)blockIdx.x * D;
    for (int d = threadIdx.x; d < D; d += blockDim.x) dst[d] = src[d];
}

extern "C" int dsi__cuda_moe_dispatch(const int *d_ids, int T, int K, int E, const float *d_xn, int D, int *d_count,
                                      int *d_offset, int *d_slot_of, int *d_slot_tok, float *d_ex, void *stream) {
    int n = T * K;
    if (n <= 0) return DSI_OK;
    cudaStream_t s = (cudaStream_t)stream;
    int rc = DSI_CU(cudaMemsetAsync(d_count, 0, sizeof(int) * E, s));
    if (rc) return rc;
    moe_count_kernel<<<(n + 255) / 256, 256, 0, s>>>(d_ids, n, E, d_count);
    moe_scan_kernel<<<1, 32, 0, s>>>(d_count, d_offset, E);
    moe_assign_kernel<<<(n + 255) / 256, 256, 0, s>>>(d_ids, n, K, E, d_offset, d_count, d_slot_of, d_slot_tok);
    moe_gather_kernel<<<n, 256, 0, s>>>(d_xn, d_slot_tok, D, d_ex);
    return DSI_CU_LAUNCHED("moe dispatch kernels");
}

__global__ void moe_combine_kernel(const float *eo, const int *slot_of, const float *w, int K, int D, float *x) {
    int t = blockIdx.x;
    float *xr = x + (long)t * D;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float v = xr[d];
        for (int r = 0; r < K; r++) v += w[t * K + r] * eo[(long)slot_of[t * K + r] * D + d];
        xr[d] = v;
    }
}

extern "C" int dsi__cuda_moe_combine(const float *d_eo, const int *d_slot_of, const float *d_w, int T, int K, int D,
                                     float *d_x, void *stream) {
    if (T <= 0) return DSI_OK;
    moe_combine_kernel<<<T, 256, 0, (cudaStream_t)stream>>>(d_eo, d_slot_of, d_w, K, D, d_x);
    return DSI_CU_LAUNCHED("moe_combine_kernel");
}
