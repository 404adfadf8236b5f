/* CUDA backend internals, callable from C (tests, bench) and from the .cu
 * files. Pointers named d_* are device memory; `stream` is a cudaStream_t
 * passed as void* so that this header needs no CUDA include. Every launcher
 * only enqueues work: errors of the launch are returned (DSI_EINTERNAL with
 * the CUDA message), errors of the kernel show at the next synchronisation. */
#ifndef DSI_CUDA_IMPL_H
#define DSI_CUDA_IMPL_H

#include "dsinfer/common.h"
#include "dsinfer/cuda.h"
#include "model/model_impl.h"

#ifdef __cplusplus
extern "C" {
#endif

/* A weight on the device, in its stored dtype. `batch` matrices of the same
 * shape lie back to back (routed experts of one layer): matrix b starts at
 * element b*rows*cols and its scales at b*scale_rows*scale_cols. */
typedef struct dsi_dmat {
    int dtype;              /* dsi_dtype: DSI_F8_E4M3, DSI_BF16, DSI_F16, DSI_F32 */
    int rows, cols;
    int batch;
    void *data;             /* device [batch][rows][cols] */
    float *scale;           /* device [batch][scale_rows][scale_cols], FP8 only */
    int block_rows, block_cols, scale_rows, scale_cols;
    /* cuBLASLt's layout of the weight scales (built at upload, FP8 only; see gemm_lt.cu) */
    float *scale_lt;
} dsi_dmat;

/* Generic GEMM on the simple tiled kernel:
 *   y[m*ldy + z*y_zstride + n] (+)= sum_k x[m*ldx + z*x_zstride + k] * Wz(n, k)
 * for m in [0, M), n in [0, N), k in [0, K), z in [0, Z), where
 *   Wz(n, k) = W[mat][row0 + z*row_zstride + n][k]          (trans = 0)
 *   Wz(n, k) = W[mat][row0 + z*row_zstride + k][n]          (trans = 1)
 * dequantised exactly (FP8: e4m3 * scale of its 128x128 block), with
 * mat = 0. Grouped form (d_group_offset != NULL): z is the matrix index of a
 * batched weight (routed expert), row0 = row_zstride = 0, x_zstride =
 * y_zstride = 0, and the rows m of group z are [off[z], off[z+1]) (M is the
 * most rows any group may have, used only to size the grid; read from the
 * device, so a CUDA graph can replay it). */
typedef struct dsi_gemm_args {
    const dsi_dmat *W;      /* host struct describing device data */
    int trans;
    int row0, row_zstride;
    const float *d_x;
    long ldx, x_zstride;
    float *d_y;
    long ldy, y_zstride;
    int M, N, K, Z;
    int accumulate;
    const int *d_group_offset; /* [Z+1] or NULL */
} dsi_gemm_args;

int dsi__cuda_gemm(const dsi_gemm_args *a, void *stream);

/* cuBLASLt FP8 path: y[M][N] (+)= x[M][K] W^T with x quantised to e4m3 per
 * 1x128 tile into d_xq / d_xs (scratch of M*K bytes and M*ceil(K/128)
 * floats). Returns DSI_EUNSUPPORTED (nothing enqueued) when cuBLASLt has no
 * algorithm for the shape; the caller falls back to dsi__cuda_gemm. */
typedef struct dsi_lt dsi_lt;
int dsi__lt_create(dsi_lt **out);
void dsi__lt_destroy(dsi_lt *lt);
int dsi__lt_gemm(dsi_lt *lt, const dsi_dmat *W, const float *d_x, int M, long ldx, float *d_y, long ldy,
                 int accumulate, uint8_t *d_xq, float *d_xs, void *stream);
/* The same on activations already quantised (e4m3 [M][K], scales in the
 * layout dsi__lt_gemm writes them: [K/128][M]). */
int dsi__lt_gemm_q(dsi_lt *lt, const dsi_dmat *W, const uint8_t *d_xq, const float *d_xs, int M, float *d_y,
                   long ldy, int accumulate, void *stream);
/* Prints which type/scale-mode combinations cuBLASLt accepts (bench_cuda --lt-probe). */
int dsi__lt_probe(int M, int N, int K);
/* Grouped form for routed experts when the group row offsets h_off[Z+1] are
 * known on the host (prefill): one cuBLASLt call per non-empty group on
 * matrix z of the batched weight W, rows [h_off[z], h_off[z+1]) of x and y,
 * no accumulate. Rows are rounded up to whole tiles (16, or 64 past 64
 * rows): x, y, d_xq and d_xs need 64 spare rows past h_off[Z]. */
int dsi__lt_gemm_grouped(dsi_lt *lt, const dsi_dmat *W, const int *h_off, int Z, const float *d_x, long ldx,
                         float *d_y, long ldy, uint8_t *d_xq, float *d_xs, void *stream);
/* Builds W->scale_lt from W->scale (device to device). */
int dsi__lt_prepare_weight(dsi_dmat *W);

/* FP8 x FP8 tensor-core GEMM (gemm_fp8.cu): y[m][n] (+)= sum_k
 * deq(xq[m][k]) deq(W[mat][n][k]), activations e4m3 [rows][K] (row stride K)
 * with scales xs[m*ceil(K/128) + kb] (k-major, as dsi__cuda_quant_fp8 with
 * mn_major = 0). Grouped like dsi__cuda_gemm when d_group_offset != NULL
 * (Z groups, M = most rows of a group); else Z = 1 and rows [0, M). Needs
 * K % 16 == 0 and 128x128 weight blocks (else DSI_EUNSUPPORTED). avg_rows:
 * the rows a group is expected to have (0 = unknown); <= 16 picks 16-row
 * tiles (decode), else 64. */
int dsi__cuda_gemm_fp8(const dsi_dmat *W, const uint8_t *d_xq, const float *d_xs, int M, float *d_y, long ldy,
                       int accumulate, const int *d_group_offset, int Z, int avg_rows, void *stream);

/* e4m3 quantisation per 1x128 tile: q[m][k] = e4m3(x / s), s = amax/448
 * (1 when the tile is all zeros); scales written s[kb*M + m] (mn_major) or
 * s[m*KB + kb]. */
int dsi__cuda_quant_fp8(const float *d_x, long ldx, int M, int K, uint8_t *d_q, float *d_s, int mn_major,
                        void *stream);

/* silu(h1) * h2 over [M][K] (contiguous rows), quantised straight to e4m3
 * per 1x128 tile with k-major scales, as dsi__cuda_silu_mul followed by
 * dsi__cuda_quant_fp8(mn_major = 0) without the float intermediate. */
int dsi__cuda_silu_mul_quant(const float *d_h1, const float *d_h2, int M, int K, uint8_t *d_q, float *d_s,
                             void *stream);

/* out[r] = x[r] / rms(x[r]) * w, rows of n floats (out may equal x). */
int dsi__cuda_rmsnorm(const float *d_x, long ldx, const float *d_w, int rows, int n, float eps, float *d_out,
                      long ldo, void *stream);
/* h1[r][i] = silu(h1[r][i]) * h2[r][i] for i < n; the row count is
 * *d_rows when d_rows != NULL (device), else rows. */
int dsi__cuda_silu_mul(float *d_h1, const float *d_h2, int rows, const int *d_rows, int n, void *stream);
/* x[t] = row tokens[t] of the embedding (dequantised). */
int dsi__cuda_embed(const dsi_dmat *E, const int32_t *d_tokens, int T, float *d_x, void *stream);

/* MoE gate for T tokens from router logits [T][E] (same algorithm and tie
 * order as dsi__moe_gate): ids/weights [T][K]. */
int dsi__cuda_moe_gate(const dsi_config *c, const float *d_logits, const float *d_bias, int T, int *d_ids,
                       float *d_w, void *stream);
/* Groups the T*K (token, expert) pairs by expert: d_count [E] (scratch),
 * d_offset [E+1], d_slot_of [T*K] (slot of pair i), d_slot_tok [T*K], and
 * d_ex [T*K][D] gathers xn rows in slot order. */
int dsi__cuda_moe_dispatch(const int *d_ids, int T, int K, int E, const float *d_xn, int D, int *d_count,
                           int *d_offset, int *d_slot_of, int *d_slot_tok, float *d_ex, void *stream);
/* x[t] += sum_r w[t][r] * eo[slot_of[t*K + r]] (r in order: deterministic). */
int dsi__cuda_moe_combine(const float *d_eo, const int *d_slot_of, const float *d_w, int T, int K, int D, float *d_x,
                          void *stream);

/* ATTN-0 tail for T tokens: ropes q's rope part per head in place and copies
 * it to qabs[t][h][lora..]; normalises the latent (kv_a_norm) and ropes the
 * shared key from kva[t], writing both to the cache row of (block, layer,
 * pos % 64). d_inv_freq [rope/2]; geometry in the args. */
typedef struct dsi_mla_geom {
    int H, nope, rope, lora, vd;
    int n_layers, block_tokens;
    int kv_bf16;
    long max_blocks;           /* block-table row width */
    float softmax_scale, rope_mscale, eps;
    int rope_interleave;
} dsi_mla_geom;
int dsi__cuda_mla_prepare(const dsi_mla_geom *g, int layer, int T, float *d_q, const float *d_kva,
                          const float *d_kv_norm, const float *d_inv_freq, const int *d_tok_pos,
                          const int *d_tok_seq, const int *d_btab, void *d_cache, float *d_qabs, void *stream);
/* Absorbed MLA over the paged latent cache: for every token t and head h,
 * o[t][h][:lora] = softmax_p(scale * qabs[t][h] . kv[p]) kv[p][:lora] over
 * positions p <= tok_pos[t] of its sequence. */
int dsi__cuda_mla_decode(const dsi_mla_geom *g, int layer, int T, const float *d_qabs, const void *d_cache,
                         const int *d_tok_pos, const int *d_tok_seq, const int *d_btab, float *d_olat, void *stream);
/* The same on the tensor cores (mla_tc.cu): BF16 cache, lora 512 + rope 64
 * only (dsi__cuda_mla_tc_supported), queries and probabilities rounded to
 * BF16. dsi__cuda_mla_tc_setup raises its shared-memory limit (once, outside
 * capture). */
int dsi__cuda_mla_tc_supported(const dsi_mla_geom *g);
int dsi__cuda_mla_tc_setup(void);
int dsi__cuda_mla_decode_tc(const dsi_mla_geom *g, int layer, int T, const float *d_qabs, const void *d_cache,
                            const int *d_tok_pos, const int *d_tok_seq, const int *d_btab, float *d_olat,
                            void *stream);
/* Raises the attention kernels' shared-memory limit for a geometry; once,
 * before the first launch and outside graph capture. */
int dsi__cuda_mla_setup(const dsi_mla_geom *g);
/* Bytes of one cache block (all layers). */
size_t dsi__cuda_kv_block_bytes(const dsi_mla_geom *g);

/* Gathers rows: out[i] = x[rows[i]] (D floats each). */
int dsi__cuda_gather_rows(const float *d_x, const int *d_rows, int R, int D, float *d_out, void *stream);

/* Runs only the first n layers from now on (0: all), dropping the cached
 * graphs: bench_cuda measures one layer's cost as the difference. */
int dsi__cuda_engine_run_layers(dsi_cuda_engine *e, int n);
/* Routed experts that got at least one row in the last MoE layer of the last
 * step (bench_cuda: how evenly a random model routes), or -1. */
int dsi__cuda_engine_experts_hit(dsi_cuda_engine *e);

/* Thin wrappers so C tests need no CUDA headers. */
int dsi__cuda_malloc(void **p, size_t bytes);
void dsi__cuda_free(void *p);
int dsi__cuda_h2d(void *dst, const void *src, size_t bytes);
int dsi__cuda_d2h(void *dst, const void *src, size_t bytes);
int dsi__cuda_d2d(void *dst, const void *src, size_t bytes); /* enqueued on the legacy stream */
int dsi__cuda_memset(void *dst, int v, size_t bytes);
int dsi__cuda_sync(void);
/* Uploads a host weight view into a new device dmat (batch 1). */
int dsi__cuda_upload_mat(const dsi_mat *W, dsi_dmat *out);
void dsi__cuda_free_mat(dsi_dmat *m);
/* Timing with CUDA events (bench): seconds between two recorded points. */
typedef struct dsi_cuda_timer dsi_cuda_timer;
int dsi__cuda_timer_create(dsi_cuda_timer **t);
void dsi__cuda_timer_start(dsi_cuda_timer *t);
double dsi__cuda_timer_stop(dsi_cuda_timer *t); /* seconds; synchronises */
void dsi__cuda_timer_destroy(dsi_cuda_timer *t);

#ifdef __cplusplus
}
#endif
#endif
