/* CPU compute kernels behind a vtable, chosen once at start-up.
 *
 * The scalar versions (kernels_ref.c) are the specification; the AVX-512 and
 * AVX2 versions are tested against them on random shapes (tests/test_kernels.c).
 * Weights are read in their stored dtype and converted in registers. */
#ifndef DSI_KERNELS_H
#define DSI_KERNELS_H

#include "model/model_impl.h"

/* y[m*ldy + (n - y_col0)] = sum_k x[m*ldx + k] * W[n, k]
 *   for m in [0, M), n in [n0, n1). x: float32 [M, W->cols] (input).
 * When `accumulate` is set, the result is added to y instead of stored. */
typedef void (*dsi_matmul_fn)(const dsi_mat *W, const float *x, int M, int ldx, float *y, int ldy, int y_col0,
                              int n0, int n1, int accumulate);

/* Transposed product over a row range of W:
 * y[m*ldy + (c - c0)] = sum_{r in [r0, r1)} x[m*ldx + (r - r0)] * W[r, c]
 *   for m in [0, M), c in [c0, c1). */
typedef void (*dsi_matmul_t_fn)(const dsi_mat *W, int r0, int r1, const float *x, int M, int ldx, float *y, int ldy,
                                int c0, int c1);

/* FP8 x FP8 product (DeepSeek's serving numerics): activations quantised per
 * 1x128 tile to e4m3, given as their e4m3 values in bf16 (exact) xq [M][ldq]
 * (ldq >= K rounded up to 128, zero padded) with scales xs [M][lds] (one per
 * 128 columns); W FP8 with 128-column scale blocks. Per 128-column tile the
 * exact products are summed in float32, then scaled by xs * W's block scale:
 * y[m*ldy + (n - y_col0)] (+)= sum_t xs[m][t] ws[n][t] sum_{k in t} xq[m][k] wq[n][k]. */
typedef void (*dsi_matmul_q8_fn)(const dsi_mat *W, const uint16_t *xq, int ldq, const float *xs, int lds, int M,
                                 float *y, int ldy, int y_col0, int n0, int n1, int accumulate);

typedef struct dsi_kernels {
    const char *name;
    dsi_matmul_fn matmul;
    dsi_matmul_t_fn matmul_t;
    /* dot product and y += a*x over float32 vectors */
    float (*dot)(const float *a, const float *b, int n);
    void (*axpy)(float a, const float *x, float *y, int n);
    /* attention inner loops over n rows of a strided matrix:
     * dots: out[j] (+)= q . k[j*ldk .. +d]   (accumulate selects +=)
     * wsum: out[0..d) += sum_j p[j] * v[j*ldv .. +d] */
    void (*dots)(const float *q, const float *k, int n, size_t ldk, int d, float *out, int accumulate);
    void (*wsum)(const float *p, const float *v, int n, size_t ldv, int d, float *out);
    dsi_matmul_q8_fn matmul_q8; /* NULL when this CPU path has no fast form */
    /* matmul whose every output row is the same bits whatever M and the row's
     * place in x (batch-invariant): one tile shape for all M, no panels, no
     * separate M = 1 form. Slower for large M; for deterministic runs. */
    dsi_matmul_fn matmul_rowwise;
    /* dots and wsum for nh heads sharing the same rows (absorbed attention:
     * every head of a token attends over the same latent cache), so each row
     * is loaded once per few heads instead of once per head. Per (head, row)
     * the sums are those of dots/wsum. NULL: loop over heads.
     * dots_mh: out[h*ldo + j] (+)= q[h*ldq ..] . k[j*ldk ..] over d; `next`
     *          (or NULL): the rows that will be read after these, same
     *          stride, only prefetched
     * wsum_mh: out[h*ldo + c] += sum_j p[h*ldp + j] * v[j*ldv + c], c < d */
    void (*dots_mh)(const float *q, size_t ldq, int nh, const float *k, int n, size_t ldk, int d, float *out,
                    size_t ldo, int accumulate, const float *next);
    void (*wsum_mh)(const float *p, size_t ldp, int nh, const float *v, int n, size_t ldv, int d, float *out,
                    size_t ldo);
    /* x[i] = exp(x[i] - sub) for i < n, returns the sum (softmax weights);
     * within 2 ulp of expf. NULL: expf in a loop. */
    float (*expsum)(float *x, int n, float sub);
    /* SwiGLU's product: g[i] = silu(g[i]) * u[i], silu(x) = x / (1 + exp(-x)),
     * exp within 2 ulp of expf (the reference's expf). */
    void (*silu_mul)(float *g, const float *u, size_t n);
    /* FP8 activation quantisation in place (--fp8-act, and the FP8 dispatch
     * as one process reproduces it): per 128 elements (the last group may be
     * shorter), s = amax / 448 (1 when all are zero) and
     * x[i] = dsi_e4m3_round(x[i] / s) * s; every form gives the reference's bits. */
    void (*fp8_round)(float *x, int n);
    /* The same quantisation as matmul_q8 reads it: per 128 elements of x
     * (the last group may be shorter) s[t] = that scale and q[k] = the bf16
     * bits of dsi_e4m3_round(x[k] / s[t]), q zero up to the next multiple of
     * 128; every form gives the reference's bits. */
    void (*fp8_quant)(const float *x, int n, uint16_t *q, float *s);
} dsi_kernels;

extern const dsi_kernels dsi_kernels_ref;
extern const dsi_kernels dsi_kernels_avx512;
extern const dsi_kernels dsi_kernels_avx512_nobf16;
extern const dsi_kernels dsi_kernels_avx2;

/* The best kernels this CPU supports; DSI_KERNELS=ref|avx2|avx512 overrides. */
const dsi_kernels *dsi_kernels_select(void);
/* Kernels by name ("ref", "avx2", "avx512"), or NULL if not usable here. */
const dsi_kernels *dsi_kernels_by_name(const char *name);

/* The FP8 activation scale of n values: amax / 448, 1 when all are zero
 * (a NaN is skipped, as fmaxf skips it). */
float dsi_fp8_scale(const float *x, int n);
/* The reference FP8 activation quantiser (see dsi_kernels.fp8_round). */
void dsi_fp8_round_ref(float *x, int n);
/* The reference row quantiser for matmul_q8 (see dsi_kernels.fp8_quant). */
void dsi_fp8_quant_ref(const float *x, int n, uint16_t *q, float *s);

/* The reference FP8 x FP8 product (see dsi_matmul_q8_fn). */
void dsi_matmul_q8_ref(const dsi_mat *W, const uint16_t *xq, int ldq, const float *xs, int lds, int M, float *y,
                       int ldy, int y_col0, int n0, int n1, int accumulate);

/* A per-thread scratch buffer of at least `bytes` (64-byte aligned), one per
 * slot (0-4), reused across calls and freed at thread exit. NULL on OOM. */
void *dsi__tls_buffer(int slot, size_t bytes);
enum { DSI_TLS_XS = 0, DSI_TLS_PANEL = 1, DSI_TLS_Q8PANEL = 2, DSI_TLS_XBLOCK = 3, DSI_TLS_SUMS = 4 };

/* The AVX-512 and AVX2 matmuls use their packed-panel GEMM from this many
 * activation rows on, the 4-row tiles below it (measurements at the
 * definition's use in kernels_avx512.c). */
#define DSI_PANEL_MIN_ROWS 32

/* Panel GEMMs: prefetches into L2 the weights the next pack reads, rows
 * [n, n + pn) x columns [k0, k0 + kc) of W, or, past the last column, the
 * next panel's first block (none past row n1). The micro-kernels of the
 * current block run meanwhile; without it packing waited on memory row by
 * row (prefill of 512 tokens on AVX-512: +2.5-5% on one thread, +16% on two;
 * the AVX2 kernels on the same Zen 4: +4% and +11%). */
void dsi__prefetch_panel(const dsi_mat *W, int n, int n1, int k0, int pn, int kc);

/* FP8 GEMVs: the block-scale rows of weight rows [n0, n1), into L1 at the
 * call's start. They sit apart from the weights, so each row-block's first
 * scale was a demand miss to memory in the middle of the weight stream: in
 * 1-thread decode of `small` (AVX-512), 18% of gemv_e4m3_path's own samples
 * sat on that load (perf annotate); after, it is not among its top lines.
 * The function is ~3% of decode, so the gain is below tok/s noise. */
void dsi__prefetch_scales(const dsi_mat *W, int n0, int n1);

/* Panel GEMM (AVX-512): the activation block x[0..M)[k0, k0 + kc) its micro-kernels
 * read, at *ldb floats per row: x itself, or, when x's rows are a multiple of
 * 2 KB apart, a per-thread copy with rows 16 floats longer than the block.
 * A micro-kernel reads PM rows at once; at an 8 KB stride (K = 2048) all of
 * them fall in the same few L1 sets, more lines than the sets' ways beside
 * the packed panel, and were re-fetched from L2 on every reuse. The engine
 * pads such activations once per matmul (dsi__pad_rows), so this copy
 * serves the rest: FP8-activation rows (quantised into the scratch the
 * engine pads into), more rows than that scratch holds, direct callers.
 * NULL on OOM. */
const float *dsi__panel_x(const float *x, int M, int ldx, int k0, int kc, int *ldb);
#define DSI_PANEL_GROUP 128 /* weight rows swept per activation block (AVX-512 panel GEMM) */

/* The FP8 decode GEMV on long rows (both SIMD files). A segment kernel:
 * row segment w[0, K) . xs, its far prefetch aimed at pfw + offset (clamped
 * to pf_last), for offsets 0..K. */
typedef float (*dsi_gemv_seg_fn)(const uint8_t *w, size_t K, const float *xs, const uint8_t *pfw,
                                 const uint8_t *pf_last);
#define DSI_SEG_ROWS 32
/* The segment length for rows of K bytes: K itself up to 4 KB, else equal
 * 64-byte multiples of at most 4 KB. */
int dsi__gemv_seg_bytes(int K);
typedef float (*dsi_gemv_row_fn)(const uint8_t *w, size_t K, const float *xs, const uint8_t *pf_last);
/* out[r] = row r . xs for g <= DSI_SEG_ROWS rows of K bytes from w: whole
 * rows through `row` when seg >= K, else segment by segment over the rows
 * through `segment` (seg from dsi__gemv_seg_bytes). */
void dsi__gemv_rows(const uint8_t *w, int K, int seg, int g, const float *xs, const uint8_t *last, float *out,
                    dsi_gemv_row_fn row, dsi_gemv_seg_fn segment);
/* How far ahead of a group of g rows (K bytes, segments of seg) the far
 * prefetch of the segmented GEMV starts, in bytes: it then advances one line
 * per line computed. */
size_t dsi__gemv_seg_ahead(int K, int seg, int g);

/* Element of a weight as float32 (scalar helper used by references). */
float dsi_mat_get(const dsi_mat *W, int r, int c);
/* Converts row r, columns [c0, c1) of W to float32 in out (scale applied). */
void dsi_mat_row_f32(const dsi_mat *W, int r, int c0, int c1, float *out);

#endif
