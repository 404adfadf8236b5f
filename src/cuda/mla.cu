/* MLA on the paged latent cache: the ATTN-0 tail (rope, latent norm, cache
 * write) and core attention in the absorbed form (576-wide keys = latent 512
 * + rope 64, 512-wide values = the latent itself, blocks of 64 positions),
 * used for decode and, with causal bounds per token, for prefill as well.
 *
 * Cache layout = the CPU pool's (include/dsinfer/kv.h): block-major, all
 * layers of a block contiguous, [n_blocks][n_layers][64][kv_dim], float32 or
 * BF16. */
#include <float.h>

#include "cuda/common.cuh"

#define MLA_HB 16      /* heads per block: each cached row read once per 16 heads */
#define MLA_CH 16      /* context positions per shared-memory chunk (HB*CH = threads) */
#define MLA_THREADS 256
#define MLA_MAXC 4     /* latent columns per thread: lora <= 4 * 256 */

extern "C" size_t dsi__cuda_kv_block_bytes(const dsi_mla_geom *g) {
    return (size_t)g->n_layers * g->block_tokens * (g->lora + g->rope) * (g->kv_bf16 ? 2 : 4);
}

template <int BF16>
__device__ __forceinline__ long cache_row(const dsi_mla_geom &g, int layer, int block, int slot) {
    return (((long)block * g.n_layers + layer) * g.block_tokens + slot) * (long)(g.lora + g.rope);
}

/* ------------------------------------------------------------------ ATTN-0 tail */

template <int BF16>
__global__ void mla_prepare_kernel(dsi_mla_geom g, int layer, float *q, const float *kva, const float *kv_norm,
                                   const float *inv_freq, const int *tok_pos, const int *tok_seq, const int *btab,
                                   void *cache, float *qabs) {
    __shared__ double red[32];
    __shared__ float row[1024 + 256];
    int t = blockIdx.x, pos = tok_pos[t], half = g.rope / 2;
    int qk = g.nope + g.rope, kvd = g.lora + g.rope;
    /* q rope, per head, pairs as dsi__rope */
    for (int idx = threadIdx.x; idx < g.H * half; idx += blockDim.x) {
        int h = idx / half, i = idx % half;
        float ang = inv_freq[i] * (float)pos;
        float cs = (float)cos((double)ang) * g.rope_mscale, sn = (float)sin((double)ang) * g.rope_mscale;
        int a = g.rope_interleave ? 2 * i : i, b = g.rope_interleave ? 2 * i + 1 : i + half;
        float *v = q + ((long)t * g.H + h) * qk + g.nope;
        float x0 = v[a], x1 = v[b];
        float r0 = x0 * cs - x1 * sn, r1 = x1 * cs + x0 * sn;
        v[a] = r0;
        v[b] = r1;
        float *qa = qabs + ((long)t * g.H + h) * kvd + g.lora;
        qa[a] = r0;
        qa[b] = r1;
    }
    /* latent: rmsnorm; shared key: rope (as dsi__stage_attn0) */
    const float *kv = kva + (long)t * kvd;
    double ss = 0;
    for (int i = threadIdx.x; i < g.lora; i += blockDim.x) ss += (double)kv[i] * kv[i];
    ss = dsi_block_sum(ss, red);
    float r = (float)(1.0 / sqrt(ss / g.lora + g.eps));
    for (int i = threadIdx.x; i < g.lora; i += blockDim.x) row[i] = kv[i] * r * kv_norm[i];
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float ang = inv_freq[i] * (float)pos;
        float cs = (float)cos((double)ang) * g.rope_mscale, sn = (float)sin((double)ang) * g.rope_mscale;
        int a = g.rope_interleave ? 2 * i : i, b = g.rope_interleave ? 2 * i + 1 : i + half;
        float x0 = kv[g.lora + a], x1 = kv[g.lora + b];
        row[g.lora + a] = x0 * cs - x1 * sn;
        row[g.lora + b] = x1 * cs + x0 * sn;
    }
    __syncthreads();
    int s = tok_seq[t];
    int block = btab[(long)s * g.max_blocks + pos / g.block_tokens];
    long off = cache_row<BF16>(g, layer, block, pos % g.block_tokens);
    for (int i = threadIdx.x; i < kvd; i += blockDim.x) {
        if (BF16) ((uint16_t *)cache)[off + i] = dsi_dev_to_bf16(row[i]);
        else ((float *)cache)[off + i] = row[i];
    }
}

extern "C" int dsi__cuda_mla_prepare(const dsi_mla_geom *g, int layer, int T, float *d_q, const float *d_kva,
                                     const float *d_kv_norm, const float *d_inv_freq, const int *d_tok_pos,
                                     const int *d_tok_seq, const int *d_btab, void *d_cache, float *d_qabs,
                                     void *stream) {
    if (T <= 0) return DSI_OK;
    if (g->lora + g->rope > 1024 + 256 || g->lora > MLA_MAXC * MLA_THREADS)
        return dsi_error(DSI_EUNSUPPORTED, "cuda mla: kv_lora_rank %d too wide", g->lora);
    cudaStream_t s = (cudaStream_t)stream;
    if (g->kv_bf16)
        mla_prepare_kernel<1><<<T, 256, 0, s>>>(*g, layer, d_q, d_kva, d_kv_norm, d_inv_freq, d_tok_pos, d_tok_seq,
                                                d_btab, d_cache, d_qabs);
    else
        mla_prepare_kernel<0><<<T, 256, 0, s>>>(*g, layer, d_q, d_kva, d_kv_norm, d_inv_freq, d_tok_pos, d_tok_seq,
                                                d_btab, d_cache, d_qabs);
    return DSI_CU_LAUNCHED("mla_prepare_kernel");
}

/* ------------------------------------------------------------------ absorbed attention */

/* Block = (token t, 16 heads). Chunks of 16 cached rows are staged in shared
 * memory (rows padded by one word so the 16 rows of a score step fall in
 * different banks); thread (h, p) computes one score; 16 threads keep the
 * online-softmax state; every thread accumulates its latent columns for all
 * 16 heads in registers. */
template <int BF16>
__global__ void __launch_bounds__(MLA_THREADS) mla_decode_kernel(dsi_mla_geom g, int layer, const float *qabs,
                                                                 const void *cache, const int *tok_pos,
                                                                 const int *tok_seq, const int *btab, float *olat) {
    extern __shared__ float sh[];
    int kvd = g.lora + g.rope, st = kvd + 1;
    float *qs = sh;                       /* [HB][st] */
    float *kvs = qs + MLA_HB * st;        /* [CH][st] */
    float *sc = kvs + MLA_CH * st;        /* [HB][CH] */
    float *m_s = sc + MLA_HB * MLA_CH, *l_s = m_s + MLA_HB, *corr_s = l_s + MLA_HB;
    int t = blockIdx.x, h0 = blockIdx.y * MLA_HB, tid = threadIdx.x;
    int pos = tok_pos[t], n_ctx = pos + 1;
    const int *bt = btab + (long)tok_seq[t] * g.max_blocks;
    for (int idx = tid; idx < MLA_HB * kvd; idx += MLA_THREADS) {
        int h = idx / kvd, k = idx % kvd;
        qs[h * st + k] = h0 + h < g.H ? qabs[((long)t * g.H + h0 + h) * kvd + k] : 0.0f;
    }
    if (tid < MLA_HB) {
        m_s[tid] = -INFINITY;
        l_s[tid] = 0.0f;
    }
    float acc[MLA_HB][MLA_MAXC];
#pragma unroll
    for (int h = 0; h < MLA_HB; h++)
#pragma unroll
        for (int j = 0; j < MLA_MAXC; j++) acc[h][j] = 0.0f;
    for (int c0 = 0; c0 < n_ctx; c0 += MLA_CH) {
        int cn = min(MLA_CH, n_ctx - c0);
        for (int idx = tid; idx < MLA_CH * kvd; idx += MLA_THREADS) {
            int p = idx / kvd, k = idx % kvd;
            float v = 0.0f;
            if (p < cn) {
                int P = c0 + p;
                long off = cache_row<BF16>(g, layer, bt[P / g.block_tokens], P % g.block_tokens) + k;
                v = BF16 ? dsi_dev_bf16(((const uint16_t *)cache)[off]) : ((const float *)cache)[off];
            }
            kvs[p * st + k] = v;
        }
        __syncthreads();
        {
            int h = tid / MLA_CH, p = tid % MLA_CH;
            const float *qh = qs + h * st, *kp = kvs + p * st;
            float d0 = 0.0f, d1 = 0.0f; /* latent and rope parts summed apart, as the CPU does */
            for (int k = 0; k < g.lora; k++) d0 = fmaf(qh[k], kp[k], d0);
            for (int k = g.lora; k < kvd; k++) d1 = fmaf(qh[k], kp[k], d1);
            sc[h * MLA_CH + p] = (p < cn && h0 + h < g.H) ? (d0 + d1) * g.softmax_scale : -INFINITY;
        }
        __syncthreads();
        if (tid < MLA_HB) {
            float *s = sc + tid * MLA_CH;
            float m_old = m_s[tid], mx = -INFINITY;
            for (int p = 0; p < MLA_CH; p++) mx = fmaxf(mx, s[p]);
            float m_new = fmaxf(m_old, mx);
            float corr = m_old == -INFINITY ? 0.0f : expf(m_old - m_new);
            float l = l_s[tid] * corr;
            for (int p = 0; p < MLA_CH; p++) {
                float e = s[p] == -INFINITY ? 0.0f : expf(s[p] - m_new);
                s[p] = e;
                l += e;
            }
            m_s[tid] = m_new;
            l_s[tid] = l;
            corr_s[tid] = corr;
        }
        __syncthreads();
#pragma unroll
        for (int h = 0; h < MLA_HB; h++) {
            float cr = corr_s[h];
#pragma unroll
            for (int j = 0; j < MLA_MAXC; j++) {
                int c = tid + j * MLA_THREADS;
                if (c < g.lora) {
                    float a = acc[h][j] * cr;
                    for (int p = 0; p < MLA_CH; p++) a = fmaf(sc[h * MLA_CH + p], kvs[p * st + c], a);
                    acc[h][j] = a;
                }
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int h = 0; h < MLA_HB; h++) {
        if (h0 + h >= g.H) continue;
        float inv = l_s[h] > 0.0f ? 1.0f / l_s[h] : 0.0f;
#pragma unroll
        for (int j = 0; j < MLA_MAXC; j++) {
            int c = tid + j * MLA_THREADS;
            if (c < g.lora) olat[((long)t * g.H + h0 + h) * g.lora + c] = acc[h][j] * inv;
        }
    }
}

static size_t decode_smem(const dsi_mla_geom *g) {
    int st = g->lora + g->rope + 1;
    return sizeof(float) * ((size_t)(MLA_HB + MLA_CH) * st + MLA_HB * MLA_CH + 3 * MLA_HB);
}

/* Raises the kernels' dynamic shared-memory limit; call once per geometry
 * before launching (outside graph capture). */
extern "C" int dsi__cuda_mla_setup(const dsi_mla_geom *g) {
    int sm = (int)decode_smem(g);
    int rc = DSI_CU(cudaFuncSetAttribute(mla_decode_kernel<0>, cudaFuncAttributeMaxDynamicSharedMemorySize, sm));
    if (!rc) rc = DSI_CU(cudaFuncSetAttribute(mla_decode_kernel<1>, cudaFuncAttributeMaxDynamicSharedMemorySize, sm));
    return rc;
}

extern "C" int dsi__cuda_mla_decode(const dsi_mla_geom *g, int layer, int T, const float *d_qabs, const void *d_cache,
                                    const int *d_tok_pos, const int *d_tok_seq, const int *d_btab, float *d_olat,
                                    void *stream) {
    if (T <= 0) return DSI_OK;
    if (g->lora > MLA_MAXC * MLA_THREADS) return dsi_error(DSI_EUNSUPPORTED, "cuda mla: kv_lora_rank %d too wide", g->lora);
    dim3 grid(T, (g->H + MLA_HB - 1) / MLA_HB);
    size_t sm = decode_smem(g);
    cudaStream_t s = (cudaStream_t)stream;
    if (g->kv_bf16)
        mla_decode_kernel<1><<<grid, MLA_THREADS, sm, s>>>(*g, layer, d_qabs, d_cache, d_tok_pos, d_tok_seq, d_btab,
                                                          d_olat);
    else
        mla_decode_kernel<0><<<grid, MLA_THREADS, sm, s>>>(*g, layer, d_qabs, d_cache, d_tok_pos, d_tok_seq, d_btab,
                                                          d_olat);
    return DSI_CU_LAUNCHED("mla_decode_kernel");
}
