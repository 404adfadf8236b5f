/* FP8 GEMM through cuBLASLt with DeepSeek's block scaling: weights e4m3 with
 * one float per 128x128 block (CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F),
 * activations quantised here to e4m3 with one float per 1x128 tile
 * (CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F), float32 output (+ C for the
 * residual accumulate).
 *
 * Row-major y[M][N] = x[M][K] W^T is computed column-major as
 * D[N][M] = A^T B with A = W (K x N, ld K, op T) and B = xq (K x M, ld K, op N):
 * the "TN" form FP8 requires.
 *
 * Scale layouts, as measured on an H100 with cuBLASLt 13.1 (test_cuda's
 * test_cublaslt_fp8 keeps checking them; a sweep of M = 1..200 against scale
 * strides padded to 1..128 found these; the header does not say):
 *   activations [K/128][M], M contiguous; M must be a multiple of 4 (else the
 *     heuristic finds no algorithm and the caller falls back);
 *   weights [N/128][KBP], the stored [N/128][K/128] with each row padded to
 *     KBP = K/128 rounded up to 4 floats (16 bytes). Unpadded rows read wrong
 *     scales whenever K/128 is not a multiple of 4. */
#include <cublasLt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/common.cuh"

#define LT_PLANS 256
#define LT_WORKSPACE (32u << 20)

typedef struct lt_plan {
    int M, N, K, accumulate;
    long ldy;
    cublasLtMatmulDesc_t desc;
    cublasLtMatrixLayout_t a, b, c;
    cublasLtMatmulAlgo_t algo;
    int ok; /* 0: no algorithm for this shape (cached negative answer) */
} lt_plan;

struct dsi_lt {
    cublasLtHandle_t h;
    void *workspace;
    lt_plan plans[LT_PLANS];
    int n_plans, next_evict;
};

/* Floats per row of a weight's cuBLASLt scale copy. */
static int lt_scale_ld(const dsi_dmat *W) { return (W->scale_cols + 3) / 4 * 4; }

static int lt_status(cublasStatus_t st, const char *what) {
    if (st == CUBLAS_STATUS_SUCCESS) return DSI_OK;
    return dsi_error(DSI_EINTERNAL, "cublasLt: %s failed (status %d)", what, (int)st);
}

static void plan_free(lt_plan *p) {
    if (p->desc) cublasLtMatmulDescDestroy(p->desc);
    if (p->a) cublasLtMatrixLayoutDestroy(p->a);
    if (p->b) cublasLtMatrixLayoutDestroy(p->b);
    if (p->c) cublasLtMatrixLayoutDestroy(p->c);
    memset(p, 0, sizeof *p);
}

extern "C" int dsi__lt_create(dsi_lt **out) {
    *out = NULL;
    dsi_lt *lt = (dsi_lt *)calloc(1, sizeof *lt);
    if (!lt) return dsi_error(DSI_ENOMEM, "out of memory");
    int rc = lt_status(cublasLtCreate(&lt->h), "cublasLtCreate");
    if (!rc) rc = dsi__cuda_malloc(&lt->workspace, LT_WORKSPACE);
    if (rc) {
        if (lt->h) cublasLtDestroy(lt->h);
        free(lt);
        return rc;
    }
    *out = lt;
    return DSI_OK;
}

extern "C" void dsi__lt_destroy(dsi_lt *lt) {
    if (!lt) return;
    for (int i = 0; i < lt->n_plans; i++) plan_free(&lt->plans[i]);
    dsi__cuda_free(lt->workspace);
    cublasLtDestroy(lt->h);
    free(lt);
}

/* out[b][r][c] (rows of ld floats) = s[b][r][c] (rows of KB), zeros in the padding */
__global__ void lt_scale_pad_kernel(const float *s, long n_rows, int KB, int ld, float *out) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i >= n_rows * ld) return;
    long r = i / ld;
    int c = (int)(i % ld);
    out[i] = c < KB ? s[r * KB + c] : 0.0f;
}

extern "C" int dsi__lt_prepare_weight(dsi_dmat *W) {
    if (W->dtype != DSI_F8_E4M3) return DSI_OK;
    if (W->block_rows != 128 || W->block_cols != 128)
        return dsi_error(DSI_EUNSUPPORTED, "cublasLt: weight blocks %dx%d (need 128x128)", W->block_rows,
                         W->block_cols);
    long n_rows = (long)DSI_MAX(1, W->batch) * W->scale_rows;
    int ld = lt_scale_ld(W);
    size_t n = (size_t)n_rows * ld;
    int rc = dsi__cuda_malloc((void **)&W->scale_lt, n * sizeof(float));
    if (rc) return rc;
    lt_scale_pad_kernel<<<(unsigned)((n + 255) / 256), 256>>>(W->scale, n_rows, W->scale_cols, ld, W->scale_lt);
    return DSI_CU_LAUNCHED("lt_scale_pad_kernel");
}

static int plan_build(dsi_lt *lt, lt_plan *p) {
    int rc = lt_status(cublasLtMatmulDescCreate(&p->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "MatmulDescCreate");
    cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    int32_t mode_a = CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F, mode_b = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
    if (!rc) rc = lt_status(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta), "TRANSA");
    if (!rc) rc = lt_status(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb), "TRANSB");
    if (!rc)
        rc = lt_status(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &mode_a, sizeof mode_a),
                       "A_SCALE_MODE");
    if (!rc)
        rc = lt_status(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mode_b, sizeof mode_b),
                       "B_SCALE_MODE");
    if (!rc) rc = lt_status(cublasLtMatrixLayoutCreate(&p->a, CUDA_R_8F_E4M3, p->K, p->N, p->K), "layout A");
    if (!rc) rc = lt_status(cublasLtMatrixLayoutCreate(&p->b, CUDA_R_8F_E4M3, p->K, p->M, p->K), "layout B");
    if (!rc) rc = lt_status(cublasLtMatrixLayoutCreate(&p->c, CUDA_R_32F, p->N, p->M, p->ldy), "layout C");
    if (rc) return rc;
    /* With block scaling the heuristic finds no algorithm unless the scale
     * pointers are set (seen on an H100, cuBLASLt 13.1): any aligned device
     * pointer will do here; dsi__lt_gemm sets the real ones per call. */
    const void *dummy = lt->workspace;
    if (!rc)
        rc = lt_status(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &dummy, sizeof dummy),
                       "A_SCALE_POINTER");
    if (!rc)
        rc = lt_status(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &dummy, sizeof dummy),
                       "B_SCALE_POINTER");
    if (rc) return rc;
    cublasLtMatmulPreference_t pref;
    rc = lt_status(cublasLtMatmulPreferenceCreate(&pref), "PreferenceCreate");
    if (rc) return rc;
    size_t ws = LT_WORKSPACE;
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws);
    cublasLtMatmulHeuristicResult_t res;
    int found = 0;
    cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(lt->h, p->desc, p->a, p->b, p->c, p->c, pref, 1, &res, &found);
    cublasLtMatmulPreferenceDestroy(pref);
    p->ok = st == CUBLAS_STATUS_SUCCESS && found > 0;
    if (p->ok) p->algo = res.algo;
    return DSI_OK;
}

static lt_plan *plan_get(dsi_lt *lt, int M, int N, int K, long ldy, int accumulate, int *rc) {
    for (int i = 0; i < lt->n_plans; i++) {
        lt_plan *p = &lt->plans[i];
        if (p->M == M && p->N == N && p->K == K && p->ldy == ldy && p->accumulate == accumulate) return p;
    }
    lt_plan *p;
    if (lt->n_plans < LT_PLANS) p = &lt->plans[lt->n_plans++];
    else { p = &lt->plans[lt->next_evict]; lt->next_evict = (lt->next_evict + 1) % LT_PLANS; plan_free(p); }
    p->M = M; p->N = N; p->K = K; p->ldy = ldy; p->accumulate = accumulate;
    *rc = plan_build(lt, p);
    if (*rc) { plan_free(p); return NULL; }
    return p;
}

/* The plan for W at M rows, or DSI_EUNSUPPORTED (nothing enqueued). */
static int lt_plan_for(dsi_lt *lt, const dsi_dmat *W, int M, long ldy, int accumulate, lt_plan **out) {
    *out = NULL;
    if (!lt || W->dtype != DSI_F8_E4M3 || W->batch != 1 || !W->scale_lt)
        return dsi_error(DSI_EUNSUPPORTED, "cublasLt: not an FP8 weight prepared for cuBLASLt");
    int N = W->rows, K = W->cols;
    /* FP8 needs 16-element aligned leading dimensions; block scales want whole tiles */
    if (K % 128 || N % 16 || ldy % 4) return dsi_error(DSI_EUNSUPPORTED, "cublasLt: shape %dx%d not aligned", N, K);
    int rc = DSI_OK;
    lt_plan *p = plan_get(lt, M, N, K, ldy, accumulate, &rc);
    if (!p) return rc;
    if (!p->ok) return dsi_error(DSI_EUNSUPPORTED, "cublasLt: no algorithm for M=%d N=%d K=%d", M, N, K);
    *out = p;
    return DSI_OK;
}

static int lt_run(dsi_lt *lt, lt_plan *p, const dsi_dmat *W, const uint8_t *d_xq, const float *d_xs, float *d_y,
                  int accumulate, void *stream) {
    int rc;
    cudaStream_t s = (cudaStream_t)stream;
    const void *sa = W->scale_lt, *sb = d_xs;
    rc = lt_status(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &sa, sizeof sa),
                   "A_SCALE_POINTER");
    if (!rc)
        rc = lt_status(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &sb, sizeof sb),
                       "B_SCALE_POINTER");
    if (rc) return rc;
    float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
    return lt_status(cublasLtMatmul(lt->h, p->desc, &alpha, W->data, p->a, d_xq, p->b, &beta, d_y, p->c, d_y, p->c,
                                    &p->algo, lt->workspace, LT_WORKSPACE, s),
                     "cublasLtMatmul");
}

extern "C" int dsi__lt_gemm(dsi_lt *lt, const dsi_dmat *W, const float *d_x, int M, long ldx, float *d_y, long ldy,
                            int accumulate, uint8_t *d_xq, float *d_xs, void *stream) {
    if (M <= 0) return DSI_OK;
    lt_plan *p;
    int rc = lt_plan_for(lt, W, M, ldy, accumulate, &p);
    if (!rc) rc = dsi__cuda_quant_fp8(d_x, ldx, M, W->cols, d_xq, d_xs, 1, stream);
    return rc ? rc : lt_run(lt, p, W, d_xq, d_xs, d_y, accumulate, stream);
}

extern "C" int dsi__lt_gemm_q(dsi_lt *lt, const dsi_dmat *W, const uint8_t *d_xq, const float *d_xs, int M,
                              float *d_y, long ldy, int accumulate, void *stream) {
    if (M <= 0) return DSI_OK;
    lt_plan *p;
    int rc = lt_plan_for(lt, W, M, ldy, accumulate, &p);
    return rc ? rc : lt_run(lt, p, W, d_xq, d_xs, d_y, accumulate, stream);
}

extern "C" int dsi__lt_gemm_grouped(dsi_lt *lt, const dsi_dmat *W, const int *h_off, int Z, const float *d_x,
                                    long ldx, float *d_y, long ldy, uint8_t *d_xq, float *d_xs, void *stream) {
    if (!lt || W->dtype != DSI_F8_E4M3 || !W->scale_lt || Z > W->batch)
        return dsi_error(DSI_EUNSUPPORTED, "cublasLt grouped: not a batched FP8 weight prepared for cuBLASLt");
    if (W->block_rows != 128 || W->block_cols != 128)
        return dsi_error(DSI_EUNSUPPORTED, "cublasLt grouped: weight blocks %dx%d", W->block_rows, W->block_cols);
    size_t mat = (size_t)W->rows * W->cols, smat = (size_t)W->scale_rows * lt_scale_ld(W);
    for (int z = 0; z < Z; z++) {
        int m = h_off[z + 1] - h_off[z];
        if (m <= 0) continue;
        /* whole tiles of rows: the extra rows fall on later groups' rows,
         * which their own calls (after this one, on the same stream) write */
        int mp = m <= 64 ? DSI_CEIL_DIV(m, 16) * 16 : DSI_CEIL_DIV(m, 64) * 64;
        dsi_dmat v = *W;
        v.batch = 1;
        v.data = (uint8_t *)W->data + z * mat;
        v.scale = W->scale + z * (size_t)W->scale_rows * W->scale_cols;
        v.scale_lt = W->scale_lt + z * smat;
        int rc = dsi__lt_gemm(lt, &v, d_x + (long)h_off[z] * ldx, mp, ldx, d_y + (long)h_off[z] * ldy, ldy, 0, d_xq,
                              d_xs, stream);
        if (rc) return dsi_error_prefix(rc, "group %d", z);
    }
    return DSI_OK;
}

/* Which type and scale-mode combinations cuBLASLt's heuristic accepts for a
 * block-scaled FP8 GEMM of this shape (bench_cuda --lt-probe): prints one
 * line per combination. */
extern "C" int dsi__lt_probe(int M, int N, int K) {
    cublasLtHandle_t h;
    if (cublasLtCreate(&h) != CUBLAS_STATUS_SUCCESS) return dsi_error(DSI_EINTERNAL, "cublasLtCreate failed");
    const struct { cudaDataType_t c, d; const char *name; } types[] = {
        {CUDA_R_32F, CUDA_R_32F, "C f32 D f32"}, {CUDA_R_16BF, CUDA_R_16BF, "C bf16 D bf16"},
        {CUDA_R_16F, CUDA_R_16F, "C f16 D f16"}, {CUDA_R_16BF, CUDA_R_32F, "C bf16 D f32"}};
    const struct { int32_t a, b; const char *name; } modes[] = {
        {CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F, CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F, "A blk128x128 B vec128"},
        {CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F, CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F, "A vec128 B blk128x128"},
        {CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F, CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F, "A vec128 B vec128"},
        {CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F, CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F, "scalar (no blocks)"}};
    void *dummy = NULL;
    cudaMalloc(&dummy, 1 << 20);
    for (int ti = 0; ti < 4; ti++)
        for (int mi = 0; mi < 4; mi++) {
            cublasLtMatmulDesc_t desc;
            cublasLtMatrixLayout_t a, b, c, d;
            cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F);
            cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
            cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta);
            cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb);
            cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &modes[mi].a, sizeof(int32_t));
            cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &modes[mi].b, sizeof(int32_t));
            cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &dummy, sizeof dummy);
            cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &dummy, sizeof dummy);
            cublasLtMatrixLayoutCreate(&a, CUDA_R_8F_E4M3, K, N, K);
            cublasLtMatrixLayoutCreate(&b, CUDA_R_8F_E4M3, K, M, K);
            cublasLtMatrixLayoutCreate(&c, types[ti].c, N, M, N);
            cublasLtMatrixLayoutCreate(&d, types[ti].d, N, M, N);
            cublasLtMatmulPreference_t pref;
            cublasLtMatmulPreferenceCreate(&pref);
            size_t ws = LT_WORKSPACE;
            cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws);
            cublasLtMatmulHeuristicResult_t res[4];
            int found = 0;
            cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(h, desc, a, b, c, d, pref, 4, res, &found);
            printf("  lt-probe M=%d N=%d K=%d %-14s %-22s status %d, %d algorithms\n", M, N, K, types[ti].name,
                   modes[mi].name, (int)st, found);
            cublasLtMatmulPreferenceDestroy(pref);
            cublasLtMatrixLayoutDestroy(a);
            cublasLtMatrixLayoutDestroy(b);
            cublasLtMatrixLayoutDestroy(c);
            cublasLtMatrixLayoutDestroy(d);
            cublasLtMatmulDescDestroy(desc);
        }
    cudaFree(dummy);
    cublasLtDestroy(h);
    return DSI_OK;
}
