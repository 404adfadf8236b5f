/* Absorbed MLA decode on the tensor cores (mma.sync m16n8k16 BF16, float
 * accumulation), for DeepSeek's geometry only: BF16 latent cache, 512 latent
 * + 64 rope dims. One block per (token, 64 heads): the cache is read once per
 * 64 heads (twice for 128), chunks of 32 positions staged in shared memory
 * by cp.async, two buffers deep: the next chunk loads while this one's math
 * runs (one block per SM, so nothing else would hide the load).
 * 8 warps: warp w owns heads 16*(w/2).. and value columns 256*(w%2)..; the
 * two warps of a head group each score 16 of a chunk's 32 positions and
 * trade their row maxima and P fragments through shared memory (a 64-thread
 * named barrier per pair); each accumulates half of the 512 output columns.
 * (Both warps scoring all 32 positions, as first written, spent 144 of each
 * warp's 208 mma per chunk on scores.)
 * Queries and probabilities are rounded to BF16 as FlashMLA does.
 *
 * Fragment layouts (PTX ISA, m16n8k16 BF16), lane = 4g + t; a 32-bit register
 * holds two consecutive k (the lower k in the low half):
 *   A 16x16 row: a0 = A[g][2t,2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..]
 *   B 16x8 col:  b0 = B[2t,2t+1][g], b1 = B[2t+8,2t+9][g]
 *   C 16x8:      c0,c1 = C[g][2t,2t+1], c2,c3 = C[g+8][2t,2t+1]
 * The score tiles of two adjacent 8-position groups are exactly the A
 * fragment of P for one 16-position k step (no shuffles needed).
 * tests/test_cuda.c (test_mla) checks it against a float64 softmax. */
#include <cuda_bf16.h>

#include "cuda/common.cuh"

#define TC_HEADS 64
#define TC_CH 32
#define TC_STR 584 /* bf16 per shared row: 576 + 8 keeps fragment loads in distinct banks */
#define TC_KVD 576
#define TC_LORA 512

__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* 16 bytes global -> shared without a register round trip; src_bytes 0 fills zeros */
__device__ __forceinline__ void cp_async16(void *smem, const void *gmem, int src_bytes) {
    unsigned sa = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(sa), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait1() { asm volatile("cp.async.wait_group 1;\n" ::: "memory"); }

/* Issues the copies of positions [c0, c0 + 32) (zeros past n_ctx) into Ks. */
__device__ __forceinline__ void tc_stage(uint16_t *Ks, const uint16_t *cache, const dsi_mla_geom &g, int layer,
                                         const int *bt, int c0, int n_ctx, int tid) {
    int valid = min(TC_CH, n_ctx - c0);
    /* 32 consecutive positions from a multiple of 32 lie in one 64-row block */
    long off = (((long)bt[c0 / g.block_tokens] * g.n_layers + layer) * g.block_tokens + c0 % g.block_tokens) *
               (long)TC_KVD;
    const uint4 *src = (const uint4 *)(cache + off);
    for (int i = tid; i < TC_CH * (TC_KVD / 8); i += 256) {
        int r = i / (TC_KVD / 8), u = i % (TC_KVD / 8);
        cp_async16(Ks + r * TC_STR + u * 8, r < valid ? src + (long)r * (TC_KVD / 8) + u : src, r < valid ? 16 : 0);
    }
    cp_async_commit();
}

/* Four 8x8 bf16 matrices from shared memory, one row address per lane
 * (lanes 8i..8i+7: rows of matrix i); r[i] = (row lane/4, cols 2(lane%4), +1)
 * of matrix i, or with .trans (rows 2(lane%4), +1; col lane/4). */
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const uint16_t *row) {
    unsigned a = (unsigned)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const uint16_t *row) {
    unsigned a = (unsigned)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

/* Barrier for the two warps of head group hg (warps 2hg, 2hg + 1); ids 1..4 (0 is __syncthreads). */
__device__ __forceinline__ void pair_sync(int hg) { asm volatile("bar.sync %0, 64;\n" ::"r"(hg + 1) : "memory"); }

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    return (uint32_t)dsi_dev_to_bf16(lo) | ((uint32_t)dsi_dev_to_bf16(hi) << 16);
}

__global__ void __launch_bounds__(256, 1) mla_decode_tc_kernel(dsi_mla_geom g, int layer, const float *qabs,
                                                               const uint16_t *cache, const int *tok_pos,
                                                               const int *tok_seq, const int *btab, float *olat) {
    extern __shared__ __align__(16) uint16_t smem[];
    __shared__ float xrow[4][2][16];                   /* per head pair and warp: row maxima, then sums */
    __shared__ __align__(16) uint32_t xp[4][2][32][4]; /* per head pair and warp: its P fragment */
    uint16_t *Qs = smem, *Kbuf = smem + TC_HEADS * TC_STR; /* two chunk buffers: load one, compute the other */
    int t = blockIdx.x, h0 = blockIdx.y * TC_HEADS, tid = threadIdx.x;
    int warp = tid >> 5, lane = tid & 31, gq = lane >> 2, tq = lane & 3;
    int hg = warp >> 1, chalf = warp & 1;
    int n_ctx = tok_pos[t] + 1;
    const int *bt = btab + (long)tok_seq[t] * g.max_blocks;
    for (int i = tid; i < TC_HEADS * TC_KVD; i += 256) {
        int h = i / TC_KVD, k = i % TC_KVD;
        float v = h0 + h < g.H ? qabs[((long)t * g.H + h0 + h) * TC_KVD + k] : 0.0f;
        Qs[h * TC_STR + k] = dsi_dev_to_bf16(v);
    }
    float acc[32][4];
#pragma unroll
    for (int n = 0; n < 32; n++)
#pragma unroll
        for (int c = 0; c < 4; c++) acc[n][c] = 0.0f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f; /* rows gq and gq+8 of this warp's heads */
    /* ldmatrix row addresses of this lane (matrix mq = lane / 8, row lane % 8):
     *   Q (A of the scores): heads 8*(mq%2)+row, dims +8*(mq/2)
     *   K (B of the scores, two 8-position tiles per load): position 8*(mq/2)+row, dims +8*(mq%2)
     *   V (B of P V, transposed, two 8-column tiles per load): position 8*(mq%2)+row, columns +8*(mq/2) */
    int mq = lane >> 3, mr = lane & 7;
    const uint16_t *qrow = Qs + (hg * 16 + (mq & 1) * 8 + mr) * TC_STR + (mq >> 1) * 8;
    int krow = ((mq >> 1) * 8 + mr) * TC_STR + (mq & 1) * 8;
    int vrow = ((mq & 1) * 8 + mr) * TC_STR + chalf * 256 + (mq >> 1) * 8;
    tc_stage(Kbuf, cache, g, layer, bt, 0, n_ctx, tid);
    for (int c0 = 0, ci = 0; c0 < n_ctx; c0 += TC_CH, ci++) {
        /* the next chunk's copies go out before this one's math (its buffer
         * was last read in the previous iteration, before its final barrier) */
        if (c0 + TC_CH < n_ctx) tc_stage(Kbuf + ((ci + 1) & 1) * TC_CH * TC_STR, cache, g, layer, bt, c0 + TC_CH, n_ctx, tid);
        else cp_async_commit(); /* an empty group keeps wait_group 1 meaning "this chunk has landed" */
        cp_async_wait1();
        __syncthreads(); /* every thread's copies of this chunk (and Q, first time) visible */
        const uint16_t *Ks = Kbuf + (ci & 1) * TC_CH * TC_STR;
        int valid = min(TC_CH, n_ctx - c0);
        /* scores: 16 heads x this warp's 16 of the 32 positions (2 tiles of 8);
         * the partner warp (other chalf) scores the other 16 */
        int pb = chalf * 16;
        float s[2][4];
#pragma unroll
        for (int ni = 0; ni < 2; ni++)
#pragma unroll
            for (int c = 0; c < 4; c++) s[ni][c] = 0.0f;
#pragma unroll 4
        for (int k0 = 0; k0 < TC_KVD; k0 += 16) {
            uint32_t a[4], b[4];
            ldsm_x4(a, qrow + k0);
            ldsm_x4(b, Ks + pb * TC_STR + krow + k0); /* tiles 0, 1: {b0, b1} each */
            mma_bf16(s[0], a, b[0], b[1]);
            mma_bf16(s[1], a, b[2], b[3]);
        }
        /* online softmax over this chunk, rows gq (c0,c1) and gq+8 (c2,c3):
         * maxima over both warps' positions */
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int ni = 0; ni < 2; ni++)
#pragma unroll
            for (int c = 0; c < 2; c++) {
                int ok = pb + ni * 8 + 2 * tq + c < valid;
                s[ni][c] = ok ? s[ni][c] * g.softmax_scale : -INFINITY;
                s[ni][2 + c] = ok ? s[ni][2 + c] * g.softmax_scale : -INFINITY;
                mx0 = fmaxf(mx0, s[ni][c]);
                mx1 = fmaxf(mx1, s[ni][2 + c]);
            }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        if (tq == 0) {
            xrow[hg][chalf][gq] = mx0;
            xrow[hg][chalf][gq + 8] = mx1;
        }
        pair_sync(hg);
        mx0 = fmaxf(mx0, xrow[hg][chalf ^ 1][gq]);
        mx1 = fmaxf(mx1, xrow[hg][chalf ^ 1][gq + 8]);
        float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1); /* finite: every chunk has a valid position */
        float cr0 = m0 == -INFINITY ? 0.0f : expf(m0 - mn0), cr1 = m1 == -INFINITY ? 0.0f : expf(m1 - mn1);
        m0 = mn0; /* the same in both warps of the pair */
        m1 = mn1;
        float ps0 = 0.0f, ps1 = 0.0f;
#pragma unroll
        for (int ni = 0; ni < 2; ni++)
#pragma unroll
            for (int c = 0; c < 2; c++) {
                s[ni][c] = expf(s[ni][c] - mn0); /* exp(-inf) = 0 for masked positions */
                s[ni][2 + c] = expf(s[ni][2 + c] - mn1);
                ps0 += s[ni][c];
                ps1 += s[ni][2 + c];
            }
        l0 = l0 * cr0 + ps0; /* this lane's share of its warp's positions; summed at the end */
        l1 = l1 * cr1 + ps1;
#pragma unroll
        for (int n = 0; n < 32; n++) {
            acc[n][0] *= cr0;
            acc[n][1] *= cr0;
            acc[n][2] *= cr1;
            acc[n][3] *= cr1;
        }
        /* P of this warp's 16 positions is exactly the A fragment of one
         * 16-position k step; the partner's comes through shared memory */
        uint32_t pown[4] = {pack_bf16(s[0][0], s[0][1]), pack_bf16(s[0][2], s[0][3]), pack_bf16(s[1][0], s[1][1]),
                            pack_bf16(s[1][2], s[1][3])};
        *(uint4 *)xp[hg][chalf][lane] = make_uint4(pown[0], pown[1], pown[2], pown[3]);
        pair_sync(hg);
        uint4 po = *(const uint4 *)xp[hg][chalf ^ 1][lane];
        uint32_t pother[4] = {po.x, po.y, po.z, po.w};
        /* O += P V over the two 16-position k steps; this warp's 256 columns = 32 tiles */
#pragma unroll
        for (int j = 0; j < 2; j++) {
            uint32_t a[4];
#pragma unroll
            for (int i = 0; i < 4; i++) a[i] = j == chalf ? pown[i] : pother[i];
            const uint16_t *vb = Ks + j * 16 * TC_STR + vrow;
#pragma unroll
            for (int n = 0; n < 32; n += 2) {
                uint32_t b[4]; /* {b0, b1} of column tiles n and n + 1 */
                ldsm_x4_trans(b, vb + n * 8);
                mma_bf16(acc[n], a, b[0], b[1]);
                mma_bf16(acc[n + 1], a, b[2], b[3]);
            }
        }
        __syncthreads(); /* this buffer is refilled two chunks on */
    }
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    /* plus the partner's sums (the loop's last barrier freed xrow) */
    if (tq == 0) {
        xrow[hg][chalf][gq] = l0;
        xrow[hg][chalf][gq + 8] = l1;
    }
    pair_sync(hg);
    l0 += xrow[hg][chalf ^ 1][gq];
    l1 += xrow[hg][chalf ^ 1][gq + 8];
    float inv0 = l0 > 0.0f ? 1.0f / l0 : 0.0f, inv1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
    int ha = h0 + hg * 16 + gq, hb = ha + 8;
#pragma unroll
    for (int n = 0; n < 32; n++)
#pragma unroll
        for (int c = 0; c < 2; c++) {
            int col = chalf * 256 + n * 8 + 2 * tq + c;
            if (ha < g.H) olat[((long)t * g.H + ha) * TC_LORA + col] = acc[n][c] * inv0;
            if (hb < g.H) olat[((long)t * g.H + hb) * TC_LORA + col] = acc[n][2 + c] * inv1;
        }
}

static const size_t tc_smem = sizeof(uint16_t) * (TC_HEADS + 2 * TC_CH) * TC_STR;

extern "C" int dsi__cuda_mla_tc_supported(const dsi_mla_geom *g) {
    return g->kv_bf16 && g->lora == TC_LORA && g->lora + g->rope == TC_KVD && g->block_tokens % TC_CH == 0;
}

extern "C" int dsi__cuda_mla_tc_setup(void) {
    return DSI_CU(cudaFuncSetAttribute(mla_decode_tc_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)tc_smem));
}

extern "C" int dsi__cuda_mla_decode_tc(const dsi_mla_geom *g, int layer, int T, const float *d_qabs,
                                       const void *d_cache, const int *d_tok_pos, const int *d_tok_seq,
                                       const int *d_btab, float *d_olat, void *stream) {
    if (!dsi__cuda_mla_tc_supported(g))
        return dsi_error(DSI_EUNSUPPORTED, "cuda mla (tensor cores): needs a BF16 cache and 512 + 64 latent dims");
    if (T <= 0) return DSI_OK;
    dim3 grid(T, (g->H + TC_HEADS - 1) / TC_HEADS);
    mla_decode_tc_kernel<<<grid, 256, tc_smem, (cudaStream_t)stream>>>(*g, layer, d_qabs, (const uint16_t *)d_cache,
                                                                      d_tok_pos, d_tok_seq, d_btab, d_olat);
    return DSI_CU_LAUNCHED("mla_decode_tc_kernel");
}
