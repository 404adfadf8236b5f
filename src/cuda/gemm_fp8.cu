/* FP8 tensor-core GEMM for routed experts (and any FP8 weight): both
 * operands e4m3, DeepSeek's scaling (activations 1x128 per row, weights
 * 128x128), through mma.sync.m16n8k32 (sm_89+; Hopper runs it at a fraction
 * of wgmma's rate). Prefill's experts go to cuBLASLt one expert at a time
 * (dsi__lt_gemm_grouped); this kernel serves decode, where the row counts
 * stay on the device so that a CUDA graph can replay the step.
 *
 * Block tile BM x 128 x 128 (one weight scale block per K step), 8 warps as
 * WM x WN, each warp MI x NI mma tiles of 16 x 8, at least MINB blocks per SM
 * (the loads are synchronous: other blocks hide them). Two shapes:
 *   BM 64 (2 x 4 warps of 32 x 32): many rows per group;
 *   BM 16 (1 x 8 warps of 16 x 16): decode, a few rows per expert, where a
 *     64-row tile computed 16x more than the rows there are (measured: a
 *     DeepSeek-V3 MoE layer at batch 128 took 13.3 ms on an H100, compute
 *     on empty rows, against a 3.8 ms floor for reading its weights).
 * Each 128-deep K block is accumulated apart and then promoted into the
 * float32 accumulators with its two scales, as DeepGEMM does.
 *
 * Fragment layouts (PTX ISA, mma.m16n8k32 with 8-bit types), lane = 4g + t:
 *   A (row-major 16x32): a0 = A[g][4t..4t+3], a1 = A[g+8][4t..], a2 = A[g][16+4t..], a3 = A[g+8][16+4t..]
 *   B (col-major 32x8, i.e. W rows): b0 = W[n=g][k=4t..4t+3], b1 = W[g][16+4t..]
 *   C (16x8 float): c0,c1 = C[g][2t, 2t+1], c2,c3 = C[g+8][2t, 2t+1]
 * tests/test_cuda.c (test_gemm_fp8_mma) checks both shapes against the CPU reference. */
#include "cuda/common.cuh"

#define F8_BN 128
#define F8_STR 144 /* bytes per shared row: 128 + 16 keeps the 8 rows x 4 words of a fragment load in 32 banks */

__device__ __forceinline__ void mma_e4m3(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <int MI, int NI, int WN, int MINB>
__global__ void __launch_bounds__(256, MINB) gemm_fp8_kernel(dsi_dev_mat W, const uint8_t *xq, const float *xs, int M,
                                                       int N, int K, float *y, long ldy, int accumulate,
                                                       const int *goff) {
    constexpr int BM = (8 / WN) * MI * 16;
    static_assert(WN * NI * 8 == F8_BN, "a block covers one 128-row weight scale block");
    __shared__ __align__(16) uint8_t as[BM * F8_STR];
    __shared__ __align__(16) uint8_t bs[F8_BN * F8_STR];
    __shared__ float sxs[BM];
    int z = blockIdx.z, m_begin = 0, m_end = M;
    long mat = 0;
    if (goff) {
        m_begin = goff[z];
        m_end = goff[z + 1];
        mat = z;
    }
    int mt = m_begin + blockIdx.y * BM, nt = blockIdx.x * F8_BN;
    if (mt >= m_end) return; /* whole block: no barrier hazard */
    int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    int wm = (warp / WN) * MI * 16, wn = (warp % WN) * NI * 8;
    int KB = (K + 127) / 128;
    const uint8_t *wd = (const uint8_t *)W.data + mat * (long)W.rows * W.cols;
    float acc[MI][NI][4];
#pragma unroll
    for (int i = 0; i < MI; i++)
#pragma unroll
        for (int j = 0; j < NI; j++)
#pragma unroll
            for (int r = 0; r < 4; r++) acc[i][j][r] = 0.0f;
    for (int kb = 0; kb < KB; kb++) {
        int k0 = kb * 128;
        for (int i = tid; i < BM * 8; i += 256) {
            int r = i >> 3, ch = i & 7, gm = mt + r, gk = k0 + ch * 16;
            uint4 v = make_uint4(0, 0, 0, 0);
            if (gm < m_end && gk < K) v = *(const uint4 *)(xq + (long)gm * K + gk);
            *(uint4 *)(as + r * F8_STR + ch * 16) = v;
        }
        for (int i = tid; i < F8_BN * 8; i += 256) {
            int r = i >> 3, ch = i & 7, gn = nt + r, gk = k0 + ch * 16;
            uint4 v = make_uint4(0, 0, 0, 0);
            if (gn < N && gk < K) v = *(const uint4 *)(wd + (long)gn * K + gk);
            *(uint4 *)(bs + r * F8_STR + ch * 16) = v;
        }
        if (tid < BM) {
            int gm = mt + tid;
            sxs[tid] = gm < m_end ? xs[(long)gm * KB + kb] : 0.0f;
        }
        __syncthreads();
        float part[MI][NI][4];
#pragma unroll
        for (int i = 0; i < MI; i++)
#pragma unroll
            for (int j = 0; j < NI; j++)
#pragma unroll
                for (int r = 0; r < 4; r++) part[i][j][r] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            uint32_t a[MI][4], b[NI][2];
#pragma unroll
            for (int mi = 0; mi < MI; mi++) {
                const uint8_t *p = as + (wm + mi * 16 + g) * F8_STR + kk * 32 + 4 * t;
                a[mi][0] = *(const uint32_t *)p;
                a[mi][1] = *(const uint32_t *)(p + 8 * F8_STR);
                a[mi][2] = *(const uint32_t *)(p + 16);
                a[mi][3] = *(const uint32_t *)(p + 8 * F8_STR + 16);
            }
#pragma unroll
            for (int ni = 0; ni < NI; ni++) {
                const uint8_t *q = bs + (wn + ni * 8 + g) * F8_STR + kk * 32 + 4 * t;
                b[ni][0] = *(const uint32_t *)q;
                b[ni][1] = *(const uint32_t *)(q + 16);
            }
#pragma unroll
            for (int mi = 0; mi < MI; mi++)
#pragma unroll
                for (int ni = 0; ni < NI; ni++) mma_e4m3(part[mi][ni], a[mi], b[ni]);
        }
        float sw = W.scale[(mat * W.scale_rows + nt / 128) * (long)W.scale_cols + kb];
#pragma unroll
        for (int mi = 0; mi < MI; mi++) {
            int r0 = wm + mi * 16 + g;
            float s0 = sxs[r0] * sw, s1 = sxs[r0 + 8] * sw;
#pragma unroll
            for (int ni = 0; ni < NI; ni++) {
                acc[mi][ni][0] = fmaf(part[mi][ni][0], s0, acc[mi][ni][0]);
                acc[mi][ni][1] = fmaf(part[mi][ni][1], s0, acc[mi][ni][1]);
                acc[mi][ni][2] = fmaf(part[mi][ni][2], s1, acc[mi][ni][2]);
                acc[mi][ni][3] = fmaf(part[mi][ni][3], s1, acc[mi][ni][3]);
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int mi = 0; mi < MI; mi++)
#pragma unroll
        for (int ni = 0; ni < NI; ni++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                int r = mt + wm + mi * 16 + g + 8 * h;
                if (r >= m_end) continue;
#pragma unroll
                for (int c = 0; c < 2; c++) {
                    int col = nt + wn + ni * 8 + 2 * t + c;
                    if (col >= N) continue;
                    float *dst = y + (long)r * ldy + col;
                    float v = acc[mi][ni][2 * h + c];
                    *dst = accumulate ? *dst + v : v;
                }
            }
}

extern "C" int dsi__cuda_gemm_fp8(const dsi_dmat *W, const uint8_t *d_xq, const float *d_xs, int M, float *d_y,
                                  long ldy, int accumulate, const int *d_group_offset, int Z, int avg_rows,
                                  void *stream) {
    if (!W || W->dtype != DSI_F8_E4M3 || !W->scale) return dsi_error(DSI_EUNSUPPORTED, "fp8 gemm: not an FP8 weight");
    if (W->cols % 16 || W->block_rows != 128 || W->block_cols != 128)
        return dsi_error(DSI_EUNSUPPORTED, "fp8 gemm: K=%d not a multiple of 16 or blocks not 128x128", W->cols);
    if (Z < 1 || (d_group_offset ? Z > W->batch : Z != 1)) return dsi_error(DSI_EINVAL, "fp8 gemm: bad group count");
    if (M <= 0) return DSI_OK;
    int small = avg_rows > 0 && avg_rows <= 16, bm = small ? 16 : 64;
    dim3 grid((W->rows + F8_BN - 1) / F8_BN, (M + bm - 1) / bm, Z);
    if (grid.y > 65535u || grid.z > 65535u) return dsi_error(DSI_ERANGE, "fp8 gemm: grid too large");
    cudaStream_t s = (cudaStream_t)stream;
    if (small)
        gemm_fp8_kernel<1, 2, 8, 4><<<grid, 256, 0, s>>>(dsi__dev_mat(W), d_xq, d_xs, M, W->rows, W->cols, d_y, ldy,
                                                       accumulate, d_group_offset);
    else
        gemm_fp8_kernel<2, 4, 4, 2><<<grid, 256, 0, s>>>(dsi__dev_mat(W), d_xq, d_xs, M, W->rows, W->cols, d_y, ldy,
                                                       accumulate, d_group_offset);
    return DSI_CU_LAUNCHED("gemm_fp8_kernel");
}
