/* AVX2 + FMA kernels (8 lanes), same scheme as kernels_avx512.c: weights
 * converted in registers, FP8 block scales folded into a scaled copy of the
 * activation tile. K tails are handled with scalar code. */
#include "kernels/dtype.h"
#include "kernels/kernels.h"

#include <immintrin.h>
#include <stdlib.h>

#define MR 4
#define NR 4
#define NB 64

static const float TWO_POW_120 = 1.329227995784916e+36f;

static inline __m256 cvt_e4m3(const uint8_t *p) {
    __m256i d = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p));
    d = _mm256_slli_epi32(d, 20);
    d = _mm256_and_si256(d, _mm256_set1_epi32((int)0x87ffffff));
    return _mm256_castsi256_ps(d);
}
static inline __m256 cvt_bf16(const uint16_t *p) {
    __m256i d = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(d, 16));
}
static inline __m256 cvt_f16(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
static inline __m256 cvt_f32(const float *p) { return _mm256_loadu_ps(p); }

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* scalar value of a weight element in the scaled domain used by each path */
static inline float w_e4m3_raw(const uint8_t *p) { return dsi_e4m3_to_f32(*p) / TWO_POW_120; }
static inline float w_bf16(const uint16_t *p) { return dsi_bf16_to_f32(*p); }
static inline float w_f16(const uint16_t *p) { return dsi_f16_to_f32(*p); }
static inline float w_f32(const float *p) { return *p; }

#define MICRO(NAME, T, CVT, SCAL)                                                                           \
    static inline __attribute__((always_inline)) void NAME(const T *w, size_t ldw, int nr, const float *xs, \
                                                           int ldx, int mr, int K, float out[NR][MR]) {     \
        __m256 acc[NR][MR];                                                                                   \
        _Pragma("GCC unroll 8") for (int j = 0; j < NR; j++)                                                                          \
            _Pragma("GCC unroll 8") for (int m = 0; m < MR; m++) acc[j][m] = _mm256_setzero_ps();                                     \
        int k = 0;                                                                                            \
        for (; k + 8 <= K; k += 8) {                                                                          \
            __m256 xv[MR];                                                                                    \
            _Pragma("GCC unroll 8") for (int m = 0; m < MR; m++)                                                                      \
                if (m < mr) xv[m] = _mm256_loadu_ps(xs + (size_t)m * ldx + k);                                \
            _Pragma("GCC unroll 8") for (int j = 0; j < NR; j++) {                                                                    \
                if (j >= nr) break;                                                                           \
                __m256 wv = CVT(w + j * ldw + k);                                                             \
                _Pragma("GCC unroll 8") for (int m = 0; m < MR; m++)                                                                  \
                    if (m < mr) acc[j][m] = _mm256_fmadd_ps(xv[m], wv, acc[j][m]);                            \
            }                                                                                                 \
        }                                                                                                     \
        _Pragma("GCC unroll 8") for (int j = 0; j < NR; j++)                                                                          \
            _Pragma("GCC unroll 8") for (int m = 0; m < MR; m++)                                                                      \
                if (j < nr && m < mr) {                                                                       \
                    float s = hsum(acc[j][m]);                                                                \
                    for (int kk = k; kk < K; kk++) s += xs[(size_t)m * ldx + kk] * SCAL(w + j * ldw + kk);    \
                    out[j][m] = s;                                                                            \
                }                                                                                             \
    }

MICRO(micro_e4m3, uint8_t, cvt_e4m3, w_e4m3_raw)
MICRO(micro_bf16, uint16_t, cvt_bf16, w_bf16)
MICRO(micro_f16, uint16_t, cvt_f16, w_f16)
MICRO(micro_f32, float, cvt_f32, w_f32)

static float *xs_buffer(size_t n) { return dsi__tls_buffer(DSI_TLS_XS, n * sizeof(float)); }

static void scale_rows(const dsi_mat *W, int rb, const float *x, int ldx, int mr, float *xs) {
    int K = W->cols, bc = W->block_cols;
    const float *s = W->scale_inv + (size_t)rb * W->scale_cols;
    for (int m = 0; m < mr; m++)
        for (int k = 0; k < K; k++) xs[(size_t)m * K + k] = x[(size_t)m * ldx + k] * (s[k / bc] * TWO_POW_120);
}

static inline void store_tile(float out[NR][MR], int nr, int mr, float *y, int ldy, int ycol, int acc) {
    for (int m = 0; m < mr; m++)
        for (int j = 0; j < nr; j++) {
            float *d = &y[(size_t)m * ldy + ycol + j];
            *d = acc ? *d + out[j][m] : out[j][m];
        }
}

static void avx2_matmul(const dsi_mat *W, const float *x, int M, int ldx, float *y, int ldy, int y_col0, int n0,
                        int n1, int accumulate) {
    int K = W->cols;
    float out[NR][MR] = {{0}};
    int fp8 = W->dtype == DSI_F8_E4M3;
    float *xs = fp8 ? xs_buffer((size_t)MR * K) : NULL;
    if (fp8 && !xs) return;
    for (int nb = n0; nb < n1; nb += NB) {
        int nb_end = DSI_MIN(n1, nb + NB);
        for (int m = 0; m < M; m += MR) {
            int mr = DSI_MIN(MR, M - m), cur_rb = -1;
            const float *xm = x + (size_t)m * ldx;
            for (int n = nb; n < nb_end; n += NR) {
                int nr = DSI_MIN(NR, nb_end - n);
                if (fp8) {
                    int rb = n / W->block_rows, rb_end = (n + nr - 1) / W->block_rows;
                    if (rb_end != rb) nr = (rb + 1) * W->block_rows - n;
                    if (rb != cur_rb) { scale_rows(W, rb, xm, ldx, mr, xs); cur_rb = rb; }
                    const uint8_t *w = (const uint8_t *)W->data + (size_t)n * K;
                    switch (mr) {
                    case 4: micro_e4m3(w, K, nr, xs, K, 4, K, out); break;
                    case 3: micro_e4m3(w, K, nr, xs, K, 3, K, out); break;
                    case 2: micro_e4m3(w, K, nr, xs, K, 2, K, out); break;
                    default: micro_e4m3(w, K, nr, xs, K, 1, K, out); break;
                    }
                } else {
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
                }
                store_tile(out, nr, mr, y + (size_t)m * ldy, ldy, n - y_col0, accumulate);
                if (nr < NR && n + nr < nb_end) n -= NR - nr;
            }
        }
    }
}

static void avx2_matmul_t(const dsi_mat *W, int r0, int r1, const float *x, int M, int ldx, float *y, int ldy, int c0,
                          int c1) {
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

static float avx2_dot(const float *a, const float *b, int n) {
    __m256 s = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s);
    float r = hsum(s);
    for (; i < n; i++) r += a[i] * b[i];
    return r;
}

static void avx2_axpy(float a, const float *x, float *y, int n) {
    __m256 av = _mm256_set1_ps(a);
    int i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * x[i];
}

static void avx2_dots(const float *q, const float *k, int n, size_t ldk, int d, float *out, int accumulate) {
    for (int j = 0; j < n; j++) {
        float v = avx2_dot(q, k + j * ldk, d);
        out[j] = accumulate ? out[j] + v : v;
    }
}

static void avx2_wsum(const float *p, const float *v, int n, size_t ldv, int d, float *out) {
    for (int j = 0; j < n; j++) avx2_axpy(p[j], v + j * ldv, out, d);
}

const dsi_kernels dsi_kernels_avx2 = {"avx2", avx2_matmul, avx2_matmul_t, avx2_dot, avx2_axpy, avx2_dots, avx2_wsum,
                                      NULL, avx2_matmul /* already one tile shape for every M */, NULL, NULL, NULL};
