/* The simple tiled GEMM: the reference GPU path for every linear layer
 * (dense, per-head batched, transposed for the absorbed q, grouped for routed
 * experts). Weights are dequantised exactly into shared memory, activations
 * and accumulation stay float32, so its results match the CPU kernels to
 * float32 rounding. CUDA cores only (FFMA): correct first; the FP8 tensor
 * core path is gemm_lt.cu. */
#include <cuda_fp8.h>

#include "cuda/common.cuh"

#define GM_BM 64
#define GM_BN 64
#define GM_BK 16
#define GM_THREADS 256

struct gemm_params {
    dsi_dev_mat W;
    int row0, row_zstride;
    const float *x;
    long ldx, x_zstride;
    float *y;
    long ldy, y_zstride;
    int M, N, K, accumulate;
    const int *goff;
};

template <int TRANS>
__global__ void __launch_bounds__(GM_THREADS) gemm_kernel(gemm_params p) {
    __shared__ float xs[GM_BK][GM_BM + 4];
    __shared__ float ws[GM_BK][GM_BN + 4];
    int z = blockIdx.z, tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    long mat = 0;
    int r0 = p.row0 + z * p.row_zstride, m_begin = 0, m_end = p.M;
    const float *x = p.x;
    float *y = p.y;
    if (p.goff) {
        m_begin = p.goff[z];
        m_end = p.goff[z + 1];
        mat = z;
        r0 = 0;
    } else {
        x += (long)z * p.x_zstride;
        y += (long)z * p.y_zstride;
    }
    int mt = m_begin + blockIdx.y * GM_BM, nt = blockIdx.x * GM_BN;
    if (mt >= m_end) return; /* grouped: this expert has fewer rows (whole block exits: no barrier hazard) */
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = 0.0f;
    for (int k0 = 0; k0 < p.K; k0 += GM_BK) {
#pragma unroll
        for (int i = 0; i < (GM_BM * GM_BK) / GM_THREADS; i++) {
            int idx = tid + i * GM_THREADS, m = idx / GM_BK, k = idx % GM_BK;
            int gm = mt + m, gk = k0 + k;
            xs[k][m] = (gm < m_end && gk < p.K) ? x[(long)gm * p.ldx + gk] : 0.0f;
        }
#pragma unroll
        for (int i = 0; i < (GM_BN * GM_BK) / GM_THREADS; i++) {
            int idx = tid + i * GM_THREADS, n, k;
            if (TRANS) { k = idx / GM_BN; n = idx % GM_BN; }
            else { n = idx / GM_BK; k = idx % GM_BK; }
            int gn = nt + n, gk = k0 + k;
            float v = 0.0f;
            if (gn < p.N && gk < p.K) v = TRANS ? p.W.get(mat, r0 + gk, gn) : p.W.get(mat, r0 + gn, gk);
            ws[k][n] = v;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < GM_BK; kk++) {
            float a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; i++) a[i] = xs[kk][ty * 4 + i];
#pragma unroll
            for (int j = 0; j < 4; j++) b[j] = ws[kk][tx * 4 + j];
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        int gm = mt + ty * 4 + i;
        if (gm >= m_end) continue;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            int gn = nt + tx * 4 + j;
            if (gn >= p.N) continue;
            float *dst = y + (long)gm * p.ldy + gn;
            *dst = p.accumulate ? *dst + acc[i][j] : acc[i][j];
        }
    }
}

extern "C" int dsi__cuda_gemm(const dsi_gemm_args *a, void *stream) {
    if (!a || !a->W || !a->W->data || !a->d_x || !a->d_y || a->M < 0 || a->N < 0 || a->K < 0 || a->Z < 1)
        return dsi_error(DSI_EINVAL, "cuda gemm: bad arguments");
    if (a->M == 0 || a->N == 0) return DSI_OK;
    const dsi_dmat *W = a->W;
    /* bounds of the weight the kernel will touch (a wrong view would read out of bounds) */
    long rows_needed, cols_needed;
    if (a->d_group_offset) {
        if (a->Z > W->batch) return dsi_error(DSI_EINVAL, "cuda gemm: %d groups for %d matrices", a->Z, W->batch);
        rows_needed = a->trans ? a->K : a->N;
        cols_needed = a->trans ? a->N : a->K;
    } else {
        long last = a->row0 + (long)(a->Z - 1) * a->row_zstride;
        rows_needed = last + (a->trans ? a->K : a->N);
        cols_needed = a->trans ? a->N : a->K;
    }
    if (rows_needed > W->rows || cols_needed > W->cols || a->row0 < 0)
        return dsi_error(DSI_EINVAL, "cuda gemm: view [%ld x %ld] exceeds the weight [%d x %d]", rows_needed,
                         cols_needed, W->rows, W->cols);
    gemm_params p;
    p.W = dsi__dev_mat(W);
    p.row0 = a->row0;
    p.row_zstride = a->row_zstride;
    p.x = a->d_x;
    p.ldx = a->ldx;
    p.x_zstride = a->x_zstride;
    p.y = a->d_y;
    p.ldy = a->ldy;
    p.y_zstride = a->y_zstride;
    p.M = a->M;
    p.N = a->N;
    p.K = a->K;
    p.accumulate = a->accumulate;
    p.goff = a->d_group_offset;
    dim3 grid((a->N + GM_BN - 1) / GM_BN, (a->M + GM_BM - 1) / GM_BM, a->Z);
    if (grid.y > 65535u || grid.z > 65535u) return dsi_error(DSI_ERANGE, "cuda gemm: grid too large");
    cudaStream_t s = (cudaStream_t)stream;
    if (a->trans) gemm_kernel<1><<<grid, GM_THREADS, 0, s>>>(p);
    else gemm_kernel<0><<<grid, GM_THREADS, 0, s>>>(p);
    return DSI_CU_LAUNCHED("gemm_kernel");
}

/* ------------------------------------------------------------------ FP8 activation quantisation */

/* The tile's scale from the 4 values each lane holds (columns lane*4..+3 of
 * a 1x128 tile), and the lane's 4 codes written to row[0..3] (n of them
 * valid; one 4-byte store when all are and row is 4-byte aligned). The
 * hardware conversion (satfinite, round to nearest even) equals
 * dsi_f32_to_e4m3 bit for bit (test_quant_fp8). */
__device__ __forceinline__ float quant_lane4(const float (&v)[4], int n, uint8_t *row) {
    float amax = fmaxf(fmaxf(fabsf(v[0]), fabsf(v[1])), fmaxf(fabsf(v[2]), fabsf(v[3])));
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    float sc = amax > 0.0f ? amax / 448.0f : 1.0f;
    uint8_t c[4];
#pragma unroll
    for (int i = 0; i < 4; i++) c[i] = (uint8_t)__nv_cvt_float_to_fp8(v[i] / sc, __NV_SATFINITE, __NV_E4M3);
    if (n >= 4 && ((uintptr_t)row & 3) == 0)
        *(uint32_t *)row = (uint32_t)c[0] | (uint32_t)c[1] << 8 | (uint32_t)c[2] << 16 | (uint32_t)c[3] << 24;
    else
        for (int i = 0; i < n; i++) row[i] = c[i];
    return sc;
}

/* The lane's 4 values of x's tile (zeros past K), one 16-byte load when aligned. */
__device__ __forceinline__ void load_lane4(const float *p, int n, float (&v)[4]) {
    if (n >= 4 && ((uintptr_t)p & 15) == 0) {
        float4 f = *(const float4 *)p;
        v[0] = f.x; v[1] = f.y; v[2] = f.z; v[3] = f.w;
    } else {
#pragma unroll
        for (int i = 0; i < 4; i++) v[i] = i < n ? p[i] : 0.0f;
    }
}

/* One warp per 1x128 tile; lanes hold 4 consecutive values each. */
__global__ void quant_fp8_kernel(const float *x, long ldx, int M, int K, uint8_t *q, float *s, int mn_major) {
    int KB = (K + 127) / 128;
    long tile = (long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x & 31;
    if (tile >= (long)M * KB) return;
    int m = (int)(tile / KB), kb = (int)(tile % KB), k = kb * 128 + lane * 4, n = max(0, min(4, K - k));
    float v[4];
    load_lane4(x + (long)m * ldx + k, n, v);
    float sc = quant_lane4(v, n, q + (long)m * K + k);
    if (lane == 0) s[mn_major ? (long)kb * M + m : (long)m * KB + kb] = sc;
}

extern "C" int dsi__cuda_quant_fp8(const float *d_x, long ldx, int M, int K, uint8_t *d_q, float *d_s, int mn_major,
                                   void *stream) {
    if (M <= 0 || K <= 0) return DSI_OK;
    long tiles = (long)M * ((K + 127) / 128);
    unsigned blocks = (unsigned)((tiles + 7) / 8);
    quant_fp8_kernel<<<blocks, 256, 0, (cudaStream_t)stream>>>(d_x, ldx, M, K, d_q, d_s, mn_major);
    return DSI_CU_LAUNCHED("quant_fp8_kernel");
}

/* SiLU-mul fused with the quantisation of its result (the input of the expert
 * down projection): one warp per 1x128 tile, h = silu(h1) * h2 never goes to
 * memory. Scales k-major (s[m*KB + kb]). */
__global__ void silu_mul_quant_kernel(const float *h1, const float *h2, int M, int K, uint8_t *q, float *s) {
    int KB = (K + 127) / 128;
    long tile = (long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x & 31;
    if (tile >= (long)M * KB) return;
    int m = (int)(tile / KB), kb = (int)(tile % KB), k = kb * 128 + lane * 4, n = max(0, min(4, K - k));
    float a[4], b[4], v[4];
    load_lane4(h1 + (long)m * K + k, n, a);
    load_lane4(h2 + (long)m * K + k, n, b);
#pragma unroll
    for (int i = 0; i < 4; i++) v[i] = a[i] / (1.0f + expf(-a[i])) * b[i];
    float sc = quant_lane4(v, n, q + (long)m * K + k);
    if (lane == 0) s[(long)m * KB + kb] = sc;
}

extern "C" int dsi__cuda_silu_mul_quant(const float *d_h1, const float *d_h2, int M, int K, uint8_t *d_q, float *d_s,
                                        void *stream) {
    if (M <= 0 || K <= 0) return DSI_OK;
    long tiles = (long)M * ((K + 127) / 128);
    silu_mul_quant_kernel<<<(unsigned)((tiles + 7) / 8), 256, 0, (cudaStream_t)stream>>>(d_h1, d_h2, M, K, d_q, d_s);
    return DSI_CU_LAUNCHED("silu_mul_quant_kernel");
}
