/* AVX2 + FMA kernels (8 lanes), the same scheme as kernels_avx512.c, for
 * CPUs without AVX-512 (Zen 2/3, Intel client cores). Weights are converted
 * in registers:
 *   FP8 e4m3: a 32-byte load holds 8 dwords; byte i of each dword is
 *             brought to the top of a word, shifted right arithmetically by
 *             4 and masked: a float32 equal to the e4m3 value x 2^-120
 *             (subnormals exactly); the 2^120 and the block scale are folded
 *             into a scaled copy of the activations, permuted so that
 *             sub-vector i, lane l of each 32-column group holds column
 *             4l + i (the order the shifts decode).
 *   BF16: shift left 16 (even columns) or mask (odd), against a copy of the
 *         activations split into even and odd columns; F16: vcvtph2ps.
 * Forms: one row at a time for a single activation row (decode, memory
 * bound), 2x4 micro-tiles for a few rows, a packed-panel 6x16 GEMM from
 * DSI_PANEL_MIN_ROWS rows on (prefill, FMA bound). K tails are scalar. */
#include "kernels/dtype.h"
#include "kernels/kernels.h"

#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

/* The micro-tiles guard every read and write of their register arrays with the
 * same (j < nr, m < mr) conditions; GCC cannot see that and warns. */
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#define MR 4  /* activation rows per micro-tile */
#define NR 2  /* weight rows per micro-tile: 8 accumulators + 4 activations of the 16 registers */
#define NB 64 /* weight rows per cache block (divides the 128-row scale block) */

static const float TWO_POW_120 = 1.329227995784916e+36f;

/* One 32-byte weight load kept in a register (GCC would otherwise fold the
 * load into each shift that decodes it: four loads per line). */
static inline __m256i load_line(const void *p) {
    __m256i d = _mm256_loadu_si256((const __m256i *)p);
    __asm__("" : "+x"(d));
    return d;
}

/* lanes [0, n) set, for maskload/maskstore (0 <= n <= 8) */
static inline __m256i lane_mask(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 8 consecutive weights as float32 (FP8: value x 2^-120) */
static inline __m256 cvt_e4m3(const uint8_t *p) {
    __m256i d = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p));
    d = _mm256_slli_epi32(d, 20);
    return _mm256_castsi256_ps(_mm256_and_si256(d, _mm256_set1_epi32((int)0x87f00000)));
}
static inline __m256 cvt_bf16(const uint16_t *p) {
    __m256i d = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(d, 16));
}
static inline __m256 cvt_f16(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
static inline __m256 cvt_f32(const float *p) { return _mm256_loadu_ps(p); }

/* The four sub-vectors of a 32-byte FP8 line (v[i] lane l = byte 4l + i
 * as float32, value x 2^-120). 16-bit arithmetic shifts decode two bytes at
 * once: u = d >>a 4 per word leaves byte 3 in place in the upper word and
 * byte 1 in the lower word, which a 16-bit left shift of the dword lifts;
 * v does the same for bytes 2 and 0 after moving them to the top of their
 * words. The mask keeps sign | exponent | mantissa: 9 operations per line
 * instead of 11 for a shift to the top per byte (18.5 -> 20.7 GB/s in L2). */
#define E4M3_MASK _mm256_set1_epi32((int)0x87f00000)
static inline __attribute__((always_inline)) void dec4(__m256i d, __m256i mask, __m256 v[4]) {
    __m256i u = _mm256_srai_epi16(d, 4), t = _mm256_srai_epi16(_mm256_slli_epi16(d, 8), 4);
    v[0] = _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(t, 16), mask));
    v[1] = _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(u, 16), mask));
    v[2] = _mm256_castsi256_ps(_mm256_and_si256(t, mask));
    v[3] = _mm256_castsi256_ps(_mm256_and_si256(u, mask));
}

/* scalar value of a weight element in the scaled domain used by each path */
static inline float w_e4m3_raw(const uint8_t *p) { return dsi_e4m3_to_f32(*p) / TWO_POW_120; }
static inline float w_bf16(const uint16_t *p) { return dsi_bf16_to_f32(*p); }
static inline float w_f16(const uint16_t *p) { return dsi_f16_to_f32(*p); }
static inline float w_f32(const float *p) { return *p; }

/* 32 floats in decode order: o[8i + l] = x[4l + i]. Per 128-bit lane a 4x4
 * transpose gives [rows 0 2 4 6 | rows 1 3 5 7] of column i, then one lane
 * permutation puts the rows in order. */
static inline void permute32(const float *x, __m256 o[4]) {
    __m256 v0 = _mm256_loadu_ps(x), v1 = _mm256_loadu_ps(x + 8), v2 = _mm256_loadu_ps(x + 16),
           v3 = _mm256_loadu_ps(x + 24);
    __m256 t0 = _mm256_unpacklo_ps(v0, v1), t1 = _mm256_unpackhi_ps(v0, v1), t2 = _mm256_unpacklo_ps(v2, v3),
           t3 = _mm256_unpackhi_ps(v2, v3);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    o[0] = _mm256_permutevar8x32_ps(_mm256_shuffle_ps(t0, t2, 0x44), order);
    o[1] = _mm256_permutevar8x32_ps(_mm256_shuffle_ps(t0, t2, 0xee), order);
    o[2] = _mm256_permutevar8x32_ps(_mm256_shuffle_ps(t1, t3, 0x44), order);
    o[3] = _mm256_permutevar8x32_ps(_mm256_shuffle_ps(t1, t3, 0xee), order);
}

/* ---- one activation row, FP8: the decode GEMV ----
 * One weight row at a time, so a thread's chunk of rows is one contiguous
 * stream (interleaved rows are several short streams that restart every
 * tile, which the hardware prefetcher follows badly), with a software
 * prefetch ROW_PF_BYTES ahead clamped to the chunk's last line. Two lines
 * per step, eight accumulators (each line's four sub-vectors), each line
 * decoded and consumed before the next is loaded: decoding both first left
 * GCC one register short, and an accumulator went through the stack on
 * every step (decode 8% slower). Two rows at a time, sharing the activation
 * loads, is faster in L2 (18 vs 16 GB/s) but slower from memory: the small
 * model decoded 15.7 vs 18.9 tok/s. K % 32 == 0. Out of line with nothing
 * else live.
 * The far prefetch goes into L2 (T1), 8 KB ahead, and a near one into L1.
 * Measured on a Zen 4 running these kernels (DSI_KERNELS=avx2), alternating
 * 16-token windows: T0 4 KB 19.0 tok/s, T1 4 KB 23.4, T1 8 KB 26.0; the near
 * prefetch +1.3%; the BF16 LM head with T1 +4.4%. Not yet re-measured on the
 * Zen 3 this path was written on. */
#define ROW_PF_BYTES 8192
#define ROW_NEAR_BYTES 1024
static inline __attribute__((always_inline)) float gemv1_e4m3_body(const uint8_t *w, size_t K, const float *xs,
                                                                   const uint8_t *pfw, const uint8_t *pf_last,
                                                                   int near) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    const __m256i mask = E4M3_MASK;
    size_t k = 0;
#define LINE(off, A0, A1, A2, A3)                                               \
    {                                                                           \
        __m256 v[4];                                                            \
        dec4(load_line(w + k + (off)), mask, v);                                \
        A0 = _mm256_fmadd_ps(_mm256_loadu_ps(xs + k + (off)), v[0], A0);        \
        A1 = _mm256_fmadd_ps(_mm256_loadu_ps(xs + k + (off) + 8), v[1], A1);    \
        A2 = _mm256_fmadd_ps(_mm256_loadu_ps(xs + k + (off) + 16), v[2], A2);   \
        A3 = _mm256_fmadd_ps(_mm256_loadu_ps(xs + k + (off) + 24), v[3], A3);   \
    }
    for (; k + 64 <= K; k += 64) {
        const uint8_t *pf = pfw + k, *pn = w + k + ROW_NEAR_BYTES;
        _mm_prefetch((const char *)(pf < pf_last ? pf : pf_last), _MM_HINT_T1);
        if (near) _mm_prefetch((const char *)(pn < pf_last ? pn : pf_last), _MM_HINT_T0);
        LINE(0, a0, a1, a2, a3)
        LINE(32, b0, b1, b2, b3)
    }
    if (k < K) LINE(0, a0, a1, a2, a3)
#undef LINE
    return hsum(_mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, b0), _mm256_add_ps(a1, b1)),
                              _mm256_add_ps(_mm256_add_ps(a2, b2), _mm256_add_ps(a3, b3))));
}

static __attribute__((noinline)) float gemv1_e4m3(const uint8_t *w, size_t K, const float *xs, const uint8_t *pf_last) {
    return gemv1_e4m3_body(w, K, xs, w + ROW_PF_BYTES, pf_last, 1);
}

/* A segment of a long row (dsi__gemv_rows), as the AVX-512 form, without
 * the near prefetch. On the Zen 4 running these kernels, rows from memory:
 * whole K = 8192 rows streamed at 0.56x the rate of K = 2048 rows in the same
 * run (14 vs 26 GB/s), in segments at 0.9-1.07x (a loaded host: 17-19 GB/s
 * for both). */
static __attribute__((noinline)) float gemv1_e4m3_seg(const uint8_t *w, size_t K, const float *xs, const uint8_t *pfw,
                                                       const uint8_t *pf_last) {
    return gemv1_e4m3_body(w, K, xs, pfw, pf_last, 0);
}

/* Per-thread scratch for the scaled activation tile (grown, never shrunk). */
static float *xs_buffer(size_t n) { return dsi__tls_buffer(DSI_TLS_XS, n * sizeof(float)); }

/* Scales mr rows of x by the FP8 block scales of row-block rb (x 2^120),
 * each full 32-column group permuted into decode order; a tail past the
 * last full group keeps its order (scalar code reads it). */
static void scale_rows(const dsi_mat *W, int rb, const float *x, int ldx, int mr, float *xs) {
    int K = W->cols, bc = W->block_cols, K32 = K & ~31;
    const float *s = W->scale_inv + (size_t)rb * W->scale_cols;
    for (int m = 0; m < mr; m++) {
        const float *xm = x + (size_t)m * ldx;
        float *o = xs + (size_t)m * K;
        int k = 0;
        if (bc % 32 == 0) {
            for (int cb = 0, kend = bc; k < K32; k += 32) {
                if (k == kend) cb++, kend += bc; /* the block index without a division */
                __m256 sv = _mm256_set1_ps(s[cb] * TWO_POW_120), v[4];
                permute32(xm + k, v);
                for (int i = 0; i < 4; i++) _mm256_storeu_ps(o + k + 8 * i, _mm256_mul_ps(v[i], sv));
            }
        } else {
            for (; k < K32; k += 32)
                for (int i = 0; i < 4; i++)
                    for (int l = 0; l < 8; l++) o[k + 8 * i + l] = xm[k + 4 * l + i] * (s[(k + 4 * l + i) / bc] * TWO_POW_120);
        }
        for (; k < K; k++) o[k] = xm[k] * (s[k / bc] * TWO_POW_120);
    }
}

/* M = 1, FP8, K % 32 == 0: the row permuted once, scaled once per scale
 * row-block (the same product as scale_rows), the block's rows one by one. */
static void gemv_e4m3_path(const dsi_mat *W, const float *x, float *y, int y_col0, int n0, int n1, int accumulate) {
    int K = W->cols, br = W->block_rows, bc = W->block_cols;
    float *xs = xs_buffer((size_t)2 * K);
    if (!xs) return;
    dsi__prefetch_scales(W, n0, n1);
    float *xp = xs + K;
    int fast = bc % 32 == 0;
    if (fast)
        for (int k = 0; k < K; k += 32) {
            __m256 v[4];
            permute32(x + k, v);
            for (int i = 0; i < 4; i++) _mm256_storeu_ps(xp + k + 8 * i, v[i]);
        }
    const uint8_t *base = W->data, *last = base + (size_t)n1 * K - 32;
    int seg = dsi__gemv_seg_bytes(K);
    for (int n = n0; n < n1;) {
        int rb = n / br, end = DSI_MIN(n1, (rb + 1) * br);
        if (fast) {
            const float *sr = W->scale_inv + (size_t)rb * W->scale_cols;
            for (int k = 0; k < K; k += 32) {
                __m256 sv = _mm256_set1_ps(sr[k / bc] * TWO_POW_120);
                for (int i = 0; i < 4; i++)
                    _mm256_storeu_ps(xs + k + 8 * i, _mm256_mul_ps(_mm256_loadu_ps(xp + k + 8 * i), sv));
            }
        } else {
            scale_rows(W, rb, x, K, 1, xs);
        }
        while (n < end) {
            float out[DSI_SEG_ROWS];
            int g = DSI_MIN(DSI_SEG_ROWS, end - n);
            dsi__gemv_rows(base + (size_t)n * K, K, seg, g, xs, last, out, gemv1_e4m3, gemv1_e4m3_seg);
            for (int r = 0; r < g; r++, n++) {
                float *d = &y[n - y_col0];
                *d = accumulate ? *d + out[r] : out[r];
            }
        }
    }
}

/* ---- one activation row, BF16 (the LM head): 32 bytes hold 16 bf16; the
 * even ones become float32 by a 16-bit left shift, the odd ones by masking
 * the low half, against x split per 16 columns into 8 even, 8 odd. */
static __attribute__((noinline)) float gemv1_bf16(const uint16_t *w, size_t K, const float *xp, const uint16_t *pf_last) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
    const __m256i hi = _mm256_set1_epi32((int)0xffff0000);
    size_t k = 0;
    for (; k + 32 <= K; k += 32) {
        const uint16_t *pf = w + k + ROW_PF_BYTES / 2;
        _mm_prefetch((const char *)(pf < pf_last ? pf : pf_last), _MM_HINT_T1);
        __m256i d = load_line(w + k), e = load_line(w + k + 16);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xp + k), _mm256_castsi256_ps(_mm256_slli_epi32(d, 16)), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(xp + k + 8), _mm256_castsi256_ps(_mm256_and_si256(d, hi)), a1);
        b0 = _mm256_fmadd_ps(_mm256_loadu_ps(xp + k + 16), _mm256_castsi256_ps(_mm256_slli_epi32(e, 16)), b0);
        b1 = _mm256_fmadd_ps(_mm256_loadu_ps(xp + k + 24), _mm256_castsi256_ps(_mm256_and_si256(e, hi)), b1);
    }
    if (k < K) {
        __m256i d = load_line(w + k);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xp + k), _mm256_castsi256_ps(_mm256_slli_epi32(d, 16)), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(xp + k + 8), _mm256_castsi256_ps(_mm256_and_si256(d, hi)), a1);
    }
    return hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(b0, b1)));
}

/* M = 1, BF16 weights, K % 16 == 0 */
static void gemv_bf16_path(const dsi_mat *W, const float *x, float *y, int y_col0, int n0, int n1, int accumulate) {
    int K = W->cols;
    float *xp = xs_buffer((size_t)K);
    if (!xp) return;
    const __m256i ev = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    for (int k = 0; k < K; k += 16) { /* per 16 columns: the 8 even ones, then the 8 odd ones */
        __m256 a = _mm256_permutevar8x32_ps(_mm256_loadu_ps(x + k), ev);     /* e0..e3 | o0..o3 */
        __m256 b = _mm256_permutevar8x32_ps(_mm256_loadu_ps(x + k + 8), ev); /* e4..e7 | o4..o7 */
        _mm256_storeu_ps(xp + k, _mm256_permute2f128_ps(a, b, 0x20));
        _mm256_storeu_ps(xp + k + 8, _mm256_permute2f128_ps(a, b, 0x31));
    }
    const uint16_t *base = W->data, *last = base + (size_t)n1 * K - 16;
    for (int n = n0; n < n1; n++) {
        float v = gemv1_bf16(base + (size_t)n * K, (size_t)K, xp, last), *d = &y[n - y_col0];
        *d = accumulate ? *d + v : v;
    }
}

/* ---- a few activation rows: NR x MR micro-tiles ----
 * Rows [n, n+nr) of W against mr activation rows xs (stride ldx); the
 * (nr x mr) dot products go to out[j][m]. Each (j, m) sum is the same
 * whatever mr is (what matmul_rowwise relies on). The weights of a later
 * tile are prefetched into L2 (T1; see PF_MIN_BYTES in kernels_avx512.c):
 * against T0, 768x2048 matrices from memory on one Zen 4 core, BF16 M = 2-8
 * ran 28-55 -> 38-72 GFLOP/s, FP8 M = 2-3 41-60 -> 41-70 (compute-bound
 * from M = 4, unchanged). */
#define PF_MIN_BYTES 4096
static inline size_t pf_elems(size_t ldw, size_t elem) {
    size_t tile = (size_t)NR * ldw * elem;
    return (size_t)NR * ldw * ((PF_MIN_BYTES + tile - 1) / tile);
}

#define MICRO(NAME, T, CVT, SCAL)                                                                            \
    static inline __attribute__((always_inline)) void NAME(const T *w, size_t ldw, int nr, const float *xs, \
                                                           int ldx, int mr, int K, float out[NR][MR]) {     \
        __m256 acc[NR][MR];                                                                                   \
        _Pragma("GCC unroll 8") for (int j = 0; j < NR; j++)                                                  \
            _Pragma("GCC unroll 8") for (int m = 0; m < MR; m++) acc[j][m] = _mm256_setzero_ps();             \
        int k = 0;                                                                                            \
        for (; k + 8 <= K; k += 8) {                                                                          \
            if (k % (64 / sizeof(T)) == 0)                                                                    \
                _Pragma("GCC unroll 8") for (int j = 0; j < NR; j++) if (j < nr)                              \
                    _mm_prefetch((const char *)(w + j * ldw + pf_elems(ldw, sizeof(T)) + k), _MM_HINT_T1);    \
            __m256 xv[MR];                                                                                    \
            _Pragma("GCC unroll 8") for (int m = 0; m < MR; m++)                                              \
                if (m < mr) xv[m] = _mm256_loadu_ps(xs + (size_t)m * ldx + k);                                \
            _Pragma("GCC unroll 8") for (int j = 0; j < NR; j++) {                                            \
                if (j >= nr) break;                                                                           \
                __m256 wv = CVT(w + j * ldw + k);                                                             \
                _Pragma("GCC unroll 8") for (int m = 0; m < MR; m++)                                          \
                    if (m < mr) acc[j][m] = _mm256_fmadd_ps(xv[m], wv, acc[j][m]);                            \
            }                                                                                                 \
        }                                                                                                     \
        _Pragma("GCC unroll 8") for (int j = 0; j < NR; j++)                                                  \
            _Pragma("GCC unroll 8") for (int m = 0; m < MR; m++)                                              \
                if (j < nr && m < mr) {                                                                       \
                    float s = hsum(acc[j][m]);                                                                \
                    for (int kk = k; kk < K; kk++) s += xs[(size_t)m * ldx + kk] * SCAL(w + j * ldw + kk);    \
                    out[j][m] = s;                                                                            \
                }                                                                                             \
    }

MICRO(micro_bf16, uint16_t, cvt_bf16, w_bf16)
MICRO(micro_f16, uint16_t, cvt_f16, w_f16)
MICRO(micro_f32, float, cvt_f32, w_f32)

/* FP8 micro-tile on the permuted, scaled rows of scale_rows: one 32-byte
 * load per weight row per 32 columns, decoded in four sub-vectors. */
static inline __attribute__((always_inline)) void micro_e4m3(const uint8_t *w, size_t ldw, int nr, const float *xs,
                                                             int ldx, int mr, int K, float out[NR][MR]) {
    __m256 acc[NR][MR];
    _Pragma("GCC unroll 8") for (int j = 0; j < NR; j++)
        _Pragma("GCC unroll 8") for (int m = 0; m < MR; m++) acc[j][m] = _mm256_setzero_ps();
    const __m256i mask = E4M3_MASK;
    int K32 = K & ~31, k = 0;
    for (; k < K32; k += 32) {
        __m256 wd[NR][4];
        _Pragma("GCC unroll 8") for (int j = 0; j < NR; j++) if (j < nr) {
            if (k % 64 == 0) _mm_prefetch((const char *)(w + j * ldw + pf_elems(ldw, 1) + k), _MM_HINT_T1);
            dec4(load_line(w + j * ldw + k), mask, wd[j]);
        }
        _Pragma("GCC unroll 4") for (int i = 0; i < 4; i++) {
            __m256 xv[MR];
            _Pragma("GCC unroll 8") for (int m = 0; m < MR; m++)
                if (m < mr) xv[m] = _mm256_loadu_ps(xs + (size_t)m * ldx + k + 8 * i);
            _Pragma("GCC unroll 8") for (int j = 0; j < NR; j++) {
                if (j >= nr) break;
                __m256 wv = wd[j][i];
                _Pragma("GCC unroll 8") for (int m = 0; m < MR; m++)
                    if (m < mr) acc[j][m] = _mm256_fmadd_ps(xv[m], wv, acc[j][m]);
            }
        }
    }
    _Pragma("GCC unroll 8") for (int j = 0; j < NR; j++)
        _Pragma("GCC unroll 8") for (int m = 0; m < MR; m++)
            if (j < nr && m < mr) {
                float s = hsum(acc[j][m]);
                for (int kk = k; kk < K; kk++) s += xs[(size_t)m * ldx + kk] * w_e4m3_raw(w + j * ldw + kk);
                out[j][m] = s;
            }
}

static inline void store_tile(float out[NR][MR], int nr, int mr, float *y, int ldy, int ycol, int acc) {
    for (int m = 0; m < mr; m++)
        for (int j = 0; j < nr; j++) {
            float *d = &y[(size_t)m * ldy + ycol + j];
            *d = acc ? *d + out[j][m] : out[j][m];
        }
}

/* Micro-tiles over any M. `rowwise`: a lone row takes the 1-row micro-tile
 * (the same sums as in a 4-row tile) instead of the GEMV. */
static void tiles_matmul(const dsi_mat *W, const float *x, int M, int ldx, float *y, int ldy, int y_col0, int n0,
                         int n1, int accumulate, int rowwise) {
    int K = W->cols;
    float out[NR][MR] = {{0}};
    if (W->dtype == DSI_F8_E4M3) {
        float *xs = xs_buffer((size_t)MR * K);
        if (!xs) return;
        for (int nb = n0; nb < n1; nb += NB) {
            int nb_end = DSI_MIN(n1, nb + NB);
            for (int m = 0; m < M; m += MR) {
                int mr = DSI_MIN(MR, M - m), cur_rb = -1;
                for (int n = nb; n < nb_end; n += NR) {
                    int nr = DSI_MIN(NR, nb_end - n);
                    /* a tile must not straddle a scale row-block */
                    int rb = n / W->block_rows, rb_end = (n + nr - 1) / W->block_rows;
                    if (rb_end != rb) nr = (rb + 1) * W->block_rows - n;
                    if (rb != cur_rb) { scale_rows(W, rb, x + (size_t)m * ldx, ldx, mr, xs); cur_rb = rb; }
                    const uint8_t *w = (const uint8_t *)W->data + (size_t)n * K;
                    switch (mr) {
                    case 4: micro_e4m3(w, K, nr, xs, K, 4, K, out); break;
                    case 3: micro_e4m3(w, K, nr, xs, K, 3, K, out); break;
                    case 2: micro_e4m3(w, K, nr, xs, K, 2, K, out); break;
                    default:
                        if (!rowwise && K % 32 == 0) { /* the same sums as an M = 1 GEMV */
                            const uint8_t *last = (const uint8_t *)W->data + (size_t)n1 * K - 32;
                            float o1[NR];
                            dsi__gemv_rows(w, K, dsi__gemv_seg_bytes(K), nr, xs, last, o1, gemv1_e4m3, gemv1_e4m3_seg);
                            for (int j = 0; j < nr; j++) out[j][0] = o1[j];
                        } else micro_e4m3(w, K, nr, xs, K, 1, K, out);
                        break;
                    }
                    store_tile(out, nr, mr, y + (size_t)m * ldy, ldy, n - y_col0, accumulate);
                    if (nr < NR && n + nr < nb_end) n -= NR - nr; /* resume right after a straddle split */
                }
            }
        }
        return;
    }
    for (int nb = n0; nb < n1; nb += NB) {
        int nb_end = DSI_MIN(n1, nb + NB);
        for (int m = 0; m < M; m += MR) {
            int mr = DSI_MIN(MR, M - m);
            const float *xm = x + (size_t)m * ldx;
            for (int n = nb; n < nb_end; n += NR) {
                int nr = DSI_MIN(NR, nb_end - n);
#define DISPATCH(FN, T)                                                  \
    {                                                                    \
        const T *w = (const T *)W->data + (size_t)n * K;                 \
        switch (mr) {                                                    \
        case 4: FN(w, K, nr, xm, ldx, 4, K, out); break;                 \
        case 3: FN(w, K, nr, xm, ldx, 3, K, out); break;                 \
        case 2: FN(w, K, nr, xm, ldx, 2, K, out); break;                 \
        default: FN(w, K, nr, xm, ldx, 1, K, out); break;                \
        }                                                                \
    }
                if (W->dtype == DSI_BF16) DISPATCH(micro_bf16, uint16_t)
                else if (W->dtype == DSI_F16) DISPATCH(micro_f16, uint16_t)
                else DISPATCH(micro_f32, float)
#undef DISPATCH
                store_tile(out, nr, mr, y + (size_t)m * ldy, ldy, n - y_col0, accumulate);
            }
        }
    }
}

/* ---- many activation rows (prefill): a packed-panel GEMM ----
 * A panel of PN = 16 weight rows x KC columns is converted once into a
 * float32 block P[k][16] (8 KB, L1-resident; FP8 scales applied while
 * packing), then every group of PM = 6 activation rows runs an
 * outer-product micro-kernel over it: two weight vectors per k, one
 * broadcast per row, 12 accumulators (of the 16 registers). */
#define PN 16
#define PM 6
#define KC 128
/* DSI_PANEL_MIN_ROWS (kernels.h) for these kernels too: on Zen 4, 2048x2048,
 * GFLOP/s tiles vs panel, FP8 M = 8 64 vs 28, 16 65 vs 48, 32 66 vs 62, 48
 * 65 vs 73; BF16 about even to 32, 48 68 vs 79. */

/* In-register 8x8 transpose: r[i] lane j -> r[j] lane i. */
static inline void transpose8(__m256 r[8]) {
    __m256 t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xee);
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xee);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
        r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
    }
}

/* 8 weight rows x 8 columns from (r, k) as float32 vectors, FP8 scales applied. */
static inline void load_block8(const dsi_mat *W, int r, int k, __m256 v[8]) {
    size_t K = W->cols;
    switch (W->dtype) {
    case DSI_F8_E4M3: {
        int kb = k / W->block_cols, br = W->block_rows, rb = r / br;
        const float *sc = W->scale_inv + kb;
        if ((r + 7) / br == rb) {
            __m256 sv = _mm256_set1_ps(sc[(size_t)rb * W->scale_cols] * TWO_POW_120);
            for (int i = 0; i < 8; i++) v[i] = _mm256_mul_ps(cvt_e4m3((const uint8_t *)W->data + (r + i) * K + k), sv);
        } else {
            for (int i = 0; i < 8; i++) {
                float s = sc[(size_t)((r + i) / br) * W->scale_cols] * TWO_POW_120;
                v[i] = _mm256_mul_ps(cvt_e4m3((const uint8_t *)W->data + (r + i) * K + k), _mm256_set1_ps(s));
            }
        }
        break;
    }
    case DSI_BF16:
        for (int i = 0; i < 8; i++) v[i] = cvt_bf16((const uint16_t *)W->data + (r + i) * K + k);
        break;
    case DSI_F16:
        for (int i = 0; i < 8; i++) v[i] = cvt_f16((const uint16_t *)W->data + (r + i) * K + k);
        break;
    default:
        for (int i = 0; i < 8; i++) v[i] = _mm256_loadu_ps((const float *)W->data + (r + i) * K + k);
    }
}

/* P[k][j] = W[n+j][k0+k] (scaled), zero for j >= nr. Full 8x8 blocks go
 * through an in-register transpose; edges element by element. */
static void pack_panel(const dsi_mat *W, int n, int nr, int k0, int kc, float *P) {
    /* an FP8 8-column group must not straddle a scale block */
    int aligned = (W->dtype != DSI_F8_E4M3 || W->block_cols % 8 == 0) && k0 % 8 == 0;
    for (int jb = 0; jb < PN; jb += 8) {
        int k = 0;
        if (jb + 8 <= nr && aligned) {
            for (; k + 8 <= kc; k += 8) {
                __m256 v[8];
                load_block8(W, n + jb, k0 + k, v);
                transpose8(v);
                for (int i = 0; i < 8; i++) _mm256_store_ps(P + (size_t)(k + i) * PN + jb, v[i]);
            }
        }
        for (int j = jb; j < jb + 8; j++)
            for (int kk = k; kk < kc; kk++) P[(size_t)kk * PN + j] = j < nr ? dsi_mat_get(W, n + j, k0 + kk) : 0.0f;
    }
}

/* y[i][0..16) (+)= sum_k x[i][k] P[k][0..16) for i < mr; `full`: all 16
 * columns exist (plain loads and stores), else masked by m0/m1. */
static inline __attribute__((always_inline)) void panel_kernel(const float *P, int kc, const float *x, int ldx, int mr,
                                                               float *y, int ldy, __m256i m0, __m256i m1, int full,
                                                               int load_y) {
    __m256 acc[PM][2];
    _Pragma("GCC unroll 6") for (int i = 0; i < PM; i++) {
        if (i < mr && load_y) {
            acc[i][0] = full ? _mm256_loadu_ps(y + (size_t)i * ldy) : _mm256_maskload_ps(y + (size_t)i * ldy, m0);
            acc[i][1] = full ? _mm256_loadu_ps(y + (size_t)i * ldy + 8) : _mm256_maskload_ps(y + (size_t)i * ldy + 8, m1);
        } else {
            acc[i][0] = acc[i][1] = _mm256_setzero_ps();
        }
    }
    for (int k = 0; k < kc; k++) {
        __m256 p0 = _mm256_load_ps(P + k * PN), p1 = _mm256_load_ps(P + k * PN + 8);
        _Pragma("GCC unroll 6") for (int i = 0; i < PM; i++) {
            if (i >= mr) break;
            __m256 xb = _mm256_broadcast_ss(x + (size_t)i * ldx + k);
            acc[i][0] = _mm256_fmadd_ps(xb, p0, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(xb, p1, acc[i][1]);
        }
    }
    _Pragma("GCC unroll 6") for (int i = 0; i < PM; i++) {
        if (i >= mr) break;
        if (full) {
            _mm256_storeu_ps(y + (size_t)i * ldy, acc[i][0]);
            _mm256_storeu_ps(y + (size_t)i * ldy + 8, acc[i][1]);
        } else {
            _mm256_maskstore_ps(y + (size_t)i * ldy, m0, acc[i][0]);
            _mm256_maskstore_ps(y + (size_t)i * ldy + 8, m1, acc[i][1]);
        }
    }
}

static void panel_matmul(const dsi_mat *W, const float *x, int M, int ldx, float *y, int ldy, int y_col0, int n0,
                         int n1, int accumulate) {
    int K = W->cols;
    float *P = dsi__tls_buffer(DSI_TLS_PANEL, sizeof(float) * KC * PN);
    if (!P) return;
    for (int n = n0; n < n1; n += PN) {
        int nr = DSI_MIN(PN, n1 - n), full = nr == PN;
        __m256i m0 = lane_mask(DSI_MIN(nr, 8)), m1 = lane_mask(DSI_MAX(nr - 8, 0));
        for (int k0 = 0; k0 < K; k0 += KC) {
            int kc = DSI_MIN(KC, K - k0);
            pack_panel(W, n, nr, k0, kc, P);
            dsi__prefetch_panel(W, n, n1, k0 + KC, PN, KC);
            int load_y = k0 > 0 || accumulate;
            for (int m = 0; m < M; m += PM) {
                int mr = DSI_MIN(PM, M - m);
                const float *xm = x + (size_t)m * ldx + k0;
                float *ym = y + (size_t)m * ldy + (n - y_col0);
                if (mr == PM && full) panel_kernel(P, kc, xm, ldx, PM, ym, ldy, m0, m1, 1, load_y);
                else panel_kernel(P, kc, xm, ldx, mr, ym, ldy, m0, m1, 0, load_y);
            }
        }
    }
}

static void avx2_matmul(const dsi_mat *W, const float *x, int M, int ldx, float *y, int ldy, int y_col0, int n0,
                        int n1, int accumulate) {
    if (M >= DSI_PANEL_MIN_ROWS) {
        panel_matmul(W, x, M, ldx, y, ldy, y_col0, n0, n1, accumulate);
        return;
    }
    int K = W->cols;
    if (M == 1 && K % 32 == 0 && W->dtype == DSI_F8_E4M3) {
        gemv_e4m3_path(W, x, y, y_col0, n0, n1, accumulate);
        return;
    }
    if (M == 1 && K % 16 == 0 && W->dtype == DSI_BF16) {
        gemv_bf16_path(W, x, y, y_col0, n0, n1, accumulate);
        return;
    }
    tiles_matmul(W, x, M, ldx, y, ldy, y_col0, n0, n1, accumulate, 0);
}

static void avx2_matmul_rowwise(const dsi_mat *W, const float *x, int M, int ldx, float *y, int ldy, int y_col0,
                                int n0, int n1, int accumulate) {
    tiles_matmul(W, x, M, ldx, y, ldy, y_col0, n0, n1, accumulate, 1);
}

/* ---- transposed product y[m][c] = sum_r x[m][r-r0] W[r][c] ----
 * FP8, 32-aligned column ranges (the absorbed attention's W_UK): per row,
 * 32-byte loads decoded by in-dword shifts (sub-vector i, lane l = column
 * 4l+i), 96 columns (12 accumulators) per pass, columns put back in order
 * at the end; the row's scale row and the groups' scale columns are
 * tracked without a division per row. */
#define MT_GROUPS 3
static void matmul_t_e4m3_32(const dsi_mat *W, int r0, int r1, const float *xm, float *ym, int c0, int c1) {
    size_t K = W->cols;
    const __m256i mask = E4M3_MASK;
    for (int cc = c0; cc < c1; cc += 32 * MT_GROUPS) {
        int ng = DSI_MIN(MT_GROUPS, (c1 - cc) / 32);
        __m256 acc[MT_GROUPS][4];
        _Pragma("GCC unroll 4") for (int g = 0; g < MT_GROUPS; g++)
            _Pragma("GCC unroll 4") for (int i = 0; i < 4; i++) acc[g][i] = _mm256_setzero_ps();
        int sc[MT_GROUPS];
        for (int g = 0; g < MT_GROUPS; g++) sc[g] = (cc + 32 * g) / W->block_cols;
        int rb = r0 / W->block_rows, rb_end = (rb + 1) * W->block_rows;
        const float *srow = W->scale_inv + (size_t)rb * W->scale_cols;
        for (int r = r0; r < r1; r++) {
            const uint8_t *row = (const uint8_t *)W->data + r * K + cc;
            /* the first pass fetches the row's whole column range 32 rows
             * ahead; later passes find it in L2 */
            if (cc == c0 && r + 32 < r1)
                for (int c = c0; c < c1; c += 64) _mm_prefetch((const char *)W->data + (size_t)(r + 32) * K + c, _MM_HINT_T0);
            if (r == rb_end) srow += W->scale_cols, rb_end += W->block_rows;
            float a = xm[r - r0] * TWO_POW_120;
            _Pragma("GCC unroll 4") for (int g = 0; g < MT_GROUPS; g++) {
                if (g >= ng) break;
                __m256 av = _mm256_set1_ps(a * srow[sc[g]]);
                __m256 wv[4];
                dec4(load_line(row + 32 * g), mask, wv);
                _Pragma("GCC unroll 4") for (int i = 0; i < 4; i++) acc[g][i] = _mm256_fmadd_ps(av, wv[i], acc[g][i]);
            }
        }
        for (int g = 0; g < ng; g++) {
            float tmp[32];
            for (int i = 0; i < 4; i++) _mm256_storeu_ps(tmp + 8 * i, acc[g][i]);
            float *o = ym + (cc - c0) + 32 * g;
            for (int l = 0; l < 8; l++)
                for (int i = 0; i < 4; i++) o[4 * l + i] = tmp[8 * i + l];
        }
    }
}

static void avx2_matmul_t(const dsi_mat *W, int r0, int r1, const float *x, int M, int ldx, float *y, int ldy, int c0,
                          int c1) {
    if (W->dtype == DSI_F8_E4M3 && c0 % 32 == 0 && (c1 - c0) % 32 == 0 && W->block_cols % 32 == 0) {
        for (int m = 0; m < M; m++) matmul_t_e4m3_32(W, r0, r1, x + (size_t)m * ldx, y + (size_t)m * ldy, c0, c1);
        return;
    }
    float row[256];
    for (int m = 0; m < M; m++) {
        float *ym = y + (size_t)m * ldy;
        for (int c = c0; c < c1; c++) ym[c - c0] = 0;
        for (int r = r0; r < r1; r++) {
            float a = x[(size_t)m * ldx + (r - r0)];
            __m256 av = _mm256_set1_ps(a);
            for (int cc = c0; cc < c1; cc += 256) {
                int ce = DSI_MIN(c1, cc + 256), c = cc;
                dsi_mat_row_f32(W, r, cc, ce, row);
                for (; c + 8 <= ce; c += 8)
                    _mm256_storeu_ps(ym + (c - c0), _mm256_fmadd_ps(av, _mm256_loadu_ps(row + (c - cc)),
                                                                    _mm256_loadu_ps(ym + (c - c0))));
                for (; c < ce; c++) ym[c - c0] += a * row[c - cc];
            }
        }
    }
}

/* ---- attention loops ---- */
static float avx2_dot(const float *a, const float *b, int n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    for (; i < n; i += 8) {
        __m256i k = lane_mask(n - i);
        s0 = _mm256_fmadd_ps(_mm256_maskload_ps(a + i, k), _mm256_maskload_ps(b + i, k), s0);
    }
    return hsum(_mm256_add_ps(s0, s1));
}

static void avx2_axpy(float a, const float *x, float *y, int n) {
    __m256 av = _mm256_set1_ps(a);
    int i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * x[i];
}

/* Four keys at a time: q is loaded once per 8 columns and reused. One
 * accumulator per key over the columns in order, 8 at a time, the tail
 * masked: dots_mh reproduces these sums bit for bit. */
static void avx2_dots(const float *q, const float *k, int n, size_t ldk, int d, float *out, int accumulate) {
    int j = 0, d8 = d & ~7;
    __m256i tail = lane_mask(d - d8);
    for (; j + 4 <= n; j += 4) {
        const float *k0 = k + j * ldk, *k1 = k0 + ldk, *k2 = k1 + ldk, *k3 = k2 + ldk;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int c = 0; c < d8; c += 8) {
            __m256 qv = _mm256_loadu_ps(q + c);
            a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + c), a0);
            a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k1 + c), a1);
            a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k2 + c), a2);
            a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k3 + c), a3);
        }
        if (d8 < d) {
            __m256 qv = _mm256_maskload_ps(q + d8, tail);
            a0 = _mm256_fmadd_ps(qv, _mm256_maskload_ps(k0 + d8, tail), a0);
            a1 = _mm256_fmadd_ps(qv, _mm256_maskload_ps(k1 + d8, tail), a1);
            a2 = _mm256_fmadd_ps(qv, _mm256_maskload_ps(k2 + d8, tail), a2);
            a3 = _mm256_fmadd_ps(qv, _mm256_maskload_ps(k3 + d8, tail), a3);
        }
        float r[4] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3)};
        for (int i = 0; i < 4; i++) out[j + i] = accumulate ? out[j + i] + r[i] : r[i];
    }
    for (; j < n; j++) {
        float v = avx2_dot(q, k + j * ldk, d);
        out[j] = accumulate ? out[j] + v : v;
    }
}

/* out[c] += sum_j p_j v_j[c], each output element one FMA chain over the
 * rows in order, 64 columns of the output in registers per pass. */
static void avx2_wsum(const float *p, const float *v, int n, size_t ldv, int d, float *out) {
    for (int c0 = 0; c0 < d; c0 += 64) {
        int w = DSI_MIN(64, d - c0), nv = (w + 7) / 8;
        __m256i last = lane_mask(w - 8 * (nv - 1)), all = lane_mask(8);
        __m256 acc[8];
        for (int i = 0; i < nv; i++) acc[i] = _mm256_maskload_ps(out + c0 + 8 * i, i == nv - 1 ? last : all);
        for (int j = 0; j < n; j++) {
            __m256 pj = _mm256_set1_ps(p[j]);
            const float *vj = v + j * ldv + c0;
            _Pragma("GCC unroll 8") for (int i = 0; i < 8; i++) {
                if (i >= nv) break;
                acc[i] = _mm256_fmadd_ps(pj, _mm256_maskload_ps(vj + 8 * i, i == nv - 1 ? last : all), acc[i]);
            }
        }
        for (int i = 0; i < nv; i++) _mm256_maskstore_ps(out + c0 + 8 * i, i == nv - 1 ? last : all, acc[i]);
    }
}

#define DOTS_PF_ROWS 4
/* Two heads x four rows per pass (8 accumulators): per 8 columns, 4 row
 * loads and 2 query loads feed 8 FMAs. The rows DOTS_PF_ROWS ahead (into
 * `next` past this block's end) are fetched into L2 as one contiguous run of
 * lines spread over the first four head passes, as avx512_dots_mh does (T1
 * over T0: +4.5% decode at 512 context; spread, against the whole run in
 * the first pass, on Zen 4 running these kernels with 8 heads over a
 * 576-row cache from memory: 37-46 -> 40-48 GFLOP/s, three alternating
 * runs). Each (head, row) sum is avx2_dots'. */
static void avx2_dots_mh(const float *q, size_t ldq, int nh, const float *k, int n, size_t ldk, int d, float *out,
                         size_t ldo, int accumulate, const float *next) {
    int j = 0, d8 = d & ~7;
    __m256i tail = lane_mask(d - d8);
    for (; j + 4 <= n; j += 4) {
        const float *k0 = k + j * ldk, *k1 = k0 + ldk, *k2 = k1 + ldk, *k3 = k2 + ldk;
        int r = j + DOTS_PF_ROWS;
        const char *pf = r + 4 <= n ? (const char *)(k + (size_t)r * ldk)
                         : next && r >= n ? (const char *)(next + (size_t)(r - n) * ldk)
                                          : NULL;
        int passes = nh / 2, spread = passes >= 4 ? 4 : passes == 2 ? 2 : 1, per = 4 / spread;
        int h = 0;
        for (; h + 2 <= nh; h += 2) {
            const float *q0 = q + h * ldq, *q1 = q0 + ldq;
            __m256 a[2][4];
            _Pragma("GCC unroll 2") for (int x = 0; x < 2; x++)
                _Pragma("GCC unroll 4") for (int y = 0; y < 4; y++) a[x][y] = _mm256_setzero_ps();
#define STEP(LOAD)                                                    \
    {                                                                 \
        __m256 q0v = LOAD(q0 + c), q1v = LOAD(q1 + c);                \
        const float *kr[4] = {k0, k1, k2, k3};                        \
        _Pragma("GCC unroll 4") for (int y = 0; y < 4; y++) {         \
            __m256 kv = LOAD(kr[y] + c);                              \
            a[0][y] = _mm256_fmadd_ps(q0v, kv, a[0][y]);              \
            a[1][y] = _mm256_fmadd_ps(q1v, kv, a[1][y]);              \
        }                                                             \
    }
#define TAIL_LOAD(p) _mm256_maskload_ps((p), tail)
            int c = 0;
            for (; c < d8; c += 8) {
                if (pf && h / 2 < spread && c % 16 == 0)
                    for (int l = 0; l < per; l++, pf += 64) _mm_prefetch(pf, _MM_HINT_T1);
                STEP(_mm256_loadu_ps)
            }
            if (c < d) STEP(TAIL_LOAD)
#undef TAIL_LOAD
#undef STEP
            for (int x = 0; x < 2; x++)
                for (int y = 0; y < 4; y++) {
                    float v = hsum(a[x][y]), *o = out + (size_t)(h + x) * ldo + j + y;
                    *o = accumulate ? *o + v : v;
                }
        }
        for (; h < nh; h++) avx2_dots(q + h * ldq, k0, 4, ldk, d, out + (size_t)h * ldo + j, accumulate);
    }
    if (j < n)
        for (int h = 0; h < nh; h++) avx2_dots(q + h * ldq, k + j * ldk, n - j, ldk, d, out + (size_t)h * ldo + j, accumulate);
}

/* Three heads x 32 columns in registers (12 accumulators) over all rows:
 * each row's 32 columns are loaded once for three heads. Per output the
 * rows are added in order, as avx2_wsum does. */
static void avx2_wsum_mh(const float *p, size_t ldp, int nh, const float *v, int n, size_t ldv, int d, float *out,
                         size_t ldo) {
    int h = 0;
    for (; h + 3 <= nh; h += 3) {
        const float *p0 = p + h * ldp, *p1 = p0 + ldp, *p2 = p1 + ldp;
        float *o[3] = {out + (size_t)h * ldo, out + (size_t)(h + 1) * ldo, out + (size_t)(h + 2) * ldo};
        int c = 0;
        for (; c + 32 <= d; c += 32) {
            __m256 a[3][4];
            _Pragma("GCC unroll 3") for (int x = 0; x < 3; x++)
                _Pragma("GCC unroll 4") for (int y = 0; y < 4; y++) a[x][y] = _mm256_loadu_ps(o[x] + c + 8 * y);
            for (int j = 0; j < n; j++) {
                const float *vj = v + j * ldv + c;
                __m256 pb[3] = {_mm256_broadcast_ss(p0 + j), _mm256_broadcast_ss(p1 + j), _mm256_broadcast_ss(p2 + j)};
                _Pragma("GCC unroll 4") for (int y = 0; y < 4; y++) {
                    __m256 vv = _mm256_loadu_ps(vj + 8 * y);
                    _Pragma("GCC unroll 3") for (int x = 0; x < 3; x++) a[x][y] = _mm256_fmadd_ps(pb[x], vv, a[x][y]);
                }
            }
            _Pragma("GCC unroll 3") for (int x = 0; x < 3; x++)
                _Pragma("GCC unroll 4") for (int y = 0; y < 4; y++) _mm256_storeu_ps(o[x] + c + 8 * y, a[x][y]);
        }
        if (c < d)
            for (int x = 0; x < 3; x++) avx2_wsum(p + (h + x) * ldp, v + c, n, ldv, d - c, o[x] + c);
    }
    for (; h < nh; h++) avx2_wsum(p + h * ldp, v, n, ldv, d, out + (size_t)h * ldo);
}

/* exp by range reduction: x = k ln2 + r, |r| <= ln2/2, exp(r) by the
 * Cephes expf polynomial (~1 ulp), times 2^k as two exact power-of-two
 * factors (k in [-151, 128]: results below FLT_MIN come out subnormal as
 * expf's do, or 0 below -104 as the AVX-512 form flushes them). */
static inline __m256 exp8(__m256 raw) {
    const __m256 lo = _mm256_set1_ps(-104.0f), hi = _mm256_set1_ps(88.7f);
    const __m256 log2e = _mm256_set1_ps(1.44269504088896341f), c1 = _mm256_set1_ps(0.693359375f),
                 c2 = _mm256_set1_ps(-2.12194440e-4f);
    const __m256 p0 = _mm256_set1_ps(1.9875691500E-4f), p1 = _mm256_set1_ps(1.3981999507E-3f),
                 p2 = _mm256_set1_ps(8.3334519073E-3f), p3 = _mm256_set1_ps(4.1665795894E-2f),
                 p4 = _mm256_set1_ps(1.6666665459E-1f), p5 = _mm256_set1_ps(5.0000001201E-1f), one = _mm256_set1_ps(1.0f);
    const __m256i bias = _mm256_set1_epi32(127);
    __m256 v = _mm256_min_ps(_mm256_max_ps(raw, lo), hi);
    __m256 k = _mm256_round_ps(_mm256_mul_ps(v, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(k, c1, v);
    r = _mm256_fnmadd_ps(k, c2, r);
    __m256 pp = _mm256_fmadd_ps(p0, r, p1);
    pp = _mm256_fmadd_ps(pp, r, p2);
    pp = _mm256_fmadd_ps(pp, r, p3);
    pp = _mm256_fmadd_ps(pp, r, p4);
    pp = _mm256_fmadd_ps(pp, r, p5);
    pp = _mm256_fmadd_ps(pp, _mm256_mul_ps(r, r), _mm256_add_ps(r, one));
    /* 2^k = 2^(k/2) * 2^(k - k/2), each half a normal float */
    __m256i ki = _mm256_cvtps_epi32(k), kh = _mm256_srai_epi32(ki, 1), kl = _mm256_sub_epi32(ki, kh);
    __m256 f1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(kh, bias), 23));
    __m256 f2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(kl, bias), 23));
    __m256 e = _mm256_mul_ps(_mm256_mul_ps(pp, f1), f2);
    return _mm256_and_ps(e, _mm256_cmp_ps(raw, lo, _CMP_GE_OQ)); /* below -104: 0 */
}

static float avx2_expsum(float *x, int n, float sub) {
    const __m256 vsub = _mm256_set1_ps(sub);
    __m256 acc = _mm256_setzero_ps();
    for (int i = 0; i < n; i += 8) {
        __m256i km = lane_mask(n - i);
        __m256 e = exp8(_mm256_sub_ps(_mm256_maskload_ps(x + i, km), vsub));
        _mm256_maskstore_ps(x + i, km, e);
        acc = _mm256_add_ps(acc, _mm256_and_ps(e, _mm256_castsi256_ps(km)));
    }
    return hsum(acc);
}

static void avx2_silu_mul(float *g, const float *u, size_t n) {
    const __m256 one = _mm256_set1_ps(1.0f);
    for (size_t i = 0; i < n; i += 8) {
        __m256i km = lane_mask(n - i >= 8 ? 8 : (int)(n - i));
        __m256 x = _mm256_maskload_ps(g + i, km);
        __m256 s = _mm256_div_ps(x, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
        _mm256_maskstore_ps(g + i, km, _mm256_mul_ps(s, _mm256_maskload_ps(u + i, km)));
    }
}

const dsi_kernels dsi_kernels_avx2 = {"avx2", avx2_matmul, avx2_matmul_t, avx2_dot, avx2_axpy, avx2_dots, avx2_wsum,
                                      NULL, avx2_matmul_rowwise, avx2_dots_mh, avx2_wsum_mh, avx2_expsum,
                                      avx2_silu_mul, dsi_fp8_round_ref, dsi_fp8_quant_ref};
