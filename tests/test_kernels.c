/* Every kernel against the scalar reference on random shapes and inputs
 * (never zeros; outputs poisoned first), for each dtype and each SIMD path
 * this CPU supports. Also the dtype conversions on every e4m3 code. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/dtype.h"
#include "kernels/kernels.h"

static uint64_t rng = 88172645463325252ull;
static uint64_t next(void) { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return rng; }
static float unif(void) { return (float)((next() >> 40) * (1.0 / 16777216.0)) * 2 - 1; }
static int rint_(int lo, int hi) { return lo + (int)(next() % (uint64_t)(hi - lo + 1)); }

/* Encodes v in [-1, 1] as an IEEE half (normals only, round to nearest). */
static uint16_t half_of(float v) {
    float a = fabsf(v);
    if (a < ldexpf(1, -14)) return 0;
    int ex;
    float fr = frexpf(a, &ex); /* a = fr * 2^ex, fr in [0.5, 1) */
    int mant = (int)nearbyintf((fr * 2 - 1) * 1024), bexp = ex - 1 + 15;
    if (mant == 1024) { mant = 0; bexp++; }
    return (uint16_t)((v < 0 ? 0x8000 : 0) | (bexp << 10) | mant);
}

/* A random weight of the given dtype; the caller frees *data and *scale. */
static int g_block_rows = 128, g_block_cols = 128;

static dsi_mat random_mat(dsi_dtype dt, int rows, int cols, void **data, float **scale) {
    dsi_mat m = {.dtype = dt, .rows = rows, .cols = cols, .block_rows = g_block_rows, .block_cols = g_block_cols};
    size_t n = (size_t)rows * cols;
    *scale = NULL;
    *data = malloc(n * 4 + 64);
    for (size_t i = 0; i < n; i++) {
        float v = unif();
        switch (dt) {
        case DSI_F32: ((float *)*data)[i] = v; break;
        case DSI_BF16: ((uint16_t *)*data)[i] = dsi_f32_to_bf16(v); break;
        case DSI_F16: ((uint16_t *)*data)[i] = half_of(v); break;
        case DSI_F8_E4M3: {
            /* cover every code, subnormals included, except NaN */
            uint8_t b = (uint8_t)(next() & 0xff);
            if ((b & 0x7f) == 0x7f) b ^= 1;
            ((uint8_t *)*data)[i] = b;
            break;
        }
        default: break;
        }
    }
    if (dt == DSI_F8_E4M3) {
        int sr = (rows + m.block_rows - 1) / m.block_rows, sc = (cols + m.block_cols - 1) / m.block_cols;
        *scale = malloc(sizeof(float) * sr * sc);
        for (int i = 0; i < sr * sc; i++) (*scale)[i] = ldexpf(1.0f + 0.5f * unif(), rint_(-12, -4));
        m.scale_inv = *scale;
        m.scale_cols = sc;
    }
    m.data = *data;
    return m;
}

/* dsi_e4m3_round is the scalar pair's value, and dsi_f32_to_e4m3 the
 * reference encoder's code, bit for bit (sign of zero, ties, subnormals,
 * saturation, NaN): every code's value and its float neighbours, every
 * midpoint between neighbouring codes and its neighbours, every 7th float
 * from 2^-11 to 2^-5 (the subnormal seam), and every 1009th of all 2^32 bit
 * patterns. */
static void check_round(uint32_t u) {
    float f, want, got;
    memcpy(&f, &u, 4);
    uint8_t code = dsi_f32_to_e4m3_ref(f);
    if (dsi_f32_to_e4m3(f) != code)
        fail_msg("dsi_f32_to_e4m3(%a) = %#x, the reference gives %#x", (double)f, dsi_f32_to_e4m3(f), code);
    want = dsi_e4m3_to_f32(code);
    got = dsi_e4m3_round(f);
    if (isnan(want)) {
        assert_true(isnan(got));
        return;
    }
    uint32_t a, b;
    memcpy(&a, &want, 4);
    memcpy(&b, &got, 4);
    if (a != b) fail_msg("dsi_e4m3_round(%a) = %a, the scalar pair gives %a", (double)f, (double)got, (double)want);
}

static void test_e4m3_round(void **state) {
    (void)state;
    for (int b = 0; b < 256; b++) {
        float v = dsi_e4m3_to_f32((uint8_t)b), w = dsi_e4m3_to_f32((uint8_t)((b & 0x80) | ((b & 0x7f) + 1)));
        uint32_t u, m;
        memcpy(&u, &v, 4);
        for (int d = -2; d <= 2; d++) check_round(u + (uint32_t)d);
        if ((b & 0x7f) >= 0x7e || isnan(v)) continue;
        float mid = 0.5f * (v + w); /* exact: neighbours differ in one low bit at most */
        memcpy(&m, &mid, 4);
        for (int d = -2; d <= 2; d++) check_round(m + (uint32_t)d);
    }
    for (uint32_t u = 0x3a000000u; u < 0x3d000000u; u += 7) check_round(u), check_round(u | 0x80000000u);
    for (uint64_t u = 0; u < (1ull << 32); u += 1009) check_round((uint32_t)u);
    check_round(0x7f800000u), check_round(0xff800000u), check_round(0x43e00000u), check_round(0x43dfffffu);
}

static void test_e4m3_codes(void **state) {
    for (int b = 0; b < 256; b++) {
        float f = dsi_e4m3_to_f32((uint8_t)b);
        if ((b & 0x7f) == 0x7f) { assert_true(isnan(f)); continue; }
        if (f != 0) assert_int_equal(dsi_f32_to_e4m3(f), b);
    }
    assert_true(dsi_e4m3_to_f32(0x7e) == 448.0f);
    assert_true(dsi_e4m3_to_f32(0x01) == ldexpf(1, -9));
    assert_int_equal(dsi_f32_to_e4m3(1e6f), 0x7e);   /* saturates */
    assert_int_equal(dsi_f32_to_e4m3(-1e6f), 0xfe);
    assert_true(dsi_bf16_to_f32(dsi_f32_to_bf16(1.0f)) == 1.0f);
    assert_true(dsi_f16_to_f32(0x3c00) == 1.0f);
    assert_true(dsi_f16_to_f32(0x0001) == ldexpf(1, -24));
}

static double max_rel(const float *a, const float *b, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (!(d <= num)) num = d; /* NaN propagates */
        den = fmax(den, fabs(b[i]));
    }
    return num / (den > 0 ? den : 1);
}

static void check_impl(const dsi_kernels *k) {
    dsi_dtype dts[] = {DSI_F8_E4M3, DSI_BF16, DSI_F16, DSI_F32};
    for (int iter = 0; iter < 120; iter++) {
        dsi_dtype dt = dts[iter % 4];
        int rows = rint_(1, 300), cols = rint_(1, 700), M = iter % 3 == 2 ? rint_(10, 70) : rint_(1, 9); /* tiles below 32 rows, panel from 32 */
        if (iter % 5 == 0) { rows = 256 + rint_(0, 3); cols = 512; } /* aligned */
        if (iter % 8 == 0 || iter % 8 == 5) { M = 1; cols = 64 * rint_(1, 10); } /* the decode GEMV paths (FP8, BF16) */
        if (iter % 8 == 4) { /* FP8 rows longer than 4096: the GEMV's segments, alone or as a tile's last row */
            M = iter % 16 == 4 ? 1 : 5;
            cols = 64 * rint_(65, 160);
            rows = rint_(1, 100);
        }
        int panel_copy = iter % 8 == 6; /* panel GEMM: x rows 2 KB-multiples apart (its x copy), several row groups */
        if (panel_copy) {
            dt = dts[(iter / 8) % 4];
            M = rint_(32, 72); /* the kernels' PANEL_MIN_ROWS on */
            cols = 512 * rint_(1, 3);
            rows = rint_(130, 300);
        }
        void *data;
        float *scale;
        dsi_mat W = random_mat(dt, rows, cols, &data, &scale);
        int ldx = panel_copy ? cols : cols + rint_(0, 5), ldy = rows + rint_(0, 5);
        float *x = malloc(sizeof(float) * M * ldx), *y = malloc(sizeof(float) * M * ldy), *r = malloc(sizeof(float) * M * ldy);
        for (int i = 0; i < M * ldx; i++) x[i] = unif();
        for (int i = 0; i < M * ldy; i++) y[i] = r[i] = NAN;
        /* a random row range, possibly unaligned */
        int n0 = rint_(0, rows - 1), n1 = rint_(n0 + 1, rows);
        dsi_kernels_ref.matmul(&W, x, M, ldx, r, ldy, 0, n0, n1, 0);
        k->matmul(&W, x, M, ldx, y, ldy, 0, n0, n1, 0);
        for (int m = 0; m < M; m++)
            for (int n = 0; n < ldy; n++) {
                float a = y[m * ldy + n], b = r[m * ldy + n];
                if (n < n0 || n >= n1) assert_true(isnan(a)); /* untouched outside the range */
                else if (fabs(a - b) > 1e-4 * (1 + fabs(b)) * sqrt(cols)) {
                    fprintf(stderr, "%s dtype %d rows %d cols %d M %d n0 %d n1 %d: y[%d][%d]=%g ref %g\n", k->name, dt,
                            rows, cols, M, n0, n1, m, n, a, b);
                    fail();
                }
            }
        /* accumulate mode adds */
        for (int i = 0; i < M * ldy; i++) y[i] = r[i] = 1.0f;
        dsi_kernels_ref.matmul(&W, x, M, ldx, r, ldy, 0, 0, rows, 1);
        k->matmul(&W, x, M, ldx, y, ldy, 0, 0, rows, 1);
        assert_true(max_rel(y, r, (size_t)M * ldy) < 1e-5 * sqrt(cols));
        /* transposed product over a row range */
        int r0 = rint_(0, rows - 1), r1 = rint_(r0 + 1, rows), c0 = rint_(0, cols - 1), c1 = rint_(c0 + 1, cols);
        if (iter % 4 == 0 && cols >= 64) { /* FP8 (iter % 4 == 0): 64-aligned columns take the fast path */
            c0 = 64 * rint_(0, cols / 64 - 1);
            c1 = c0 + 64 * rint_(1, cols / 64 - c0 / 64);
        }
        int ldt = (c1 - c0) + 3;
        float *yt = malloc(sizeof(float) * M * ldt), *rt = malloc(sizeof(float) * M * ldt);
        float *xt = malloc(sizeof(float) * M * rows);
        for (int i = 0; i < M * rows; i++) xt[i] = unif();
        for (int i = 0; i < M * ldt; i++) yt[i] = rt[i] = NAN;
        dsi_kernels_ref.matmul_t(&W, r0, r1, xt, M, rows, rt, ldt, c0, c1);
        k->matmul_t(&W, r0, r1, xt, M, rows, yt, ldt, c0, c1);
        for (int m = 0; m < M; m++)
            for (int c = 0; c < c1 - c0; c++) {
                float a = yt[m * ldt + c], b = rt[m * ldt + c];
                if (!(fabs(a - b) <= 1e-4 * (1 + fabs(b)) * sqrt(rows))) {
                    fprintf(stderr, "%s matmul_t dtype %d: [%d][%d] %g vs %g\n", k->name, dt, m, c, a, b);
                    fail();
                }
            }
        free(yt); free(rt); free(xt);
        /* dot / axpy */
        int n = rint_(1, 300);
        float *a = malloc(sizeof(float) * n), *b = malloc(sizeof(float) * n), *c = malloc(sizeof(float) * n), *d = malloc(sizeof(float) * n);
        for (int i = 0; i < n; i++) { a[i] = unif(); b[i] = c[i] = d[i] = unif(); }
        assert_true(fabsf(k->dot(a, b, n) - dsi_kernels_ref.dot(a, b, n)) < 1e-4f * sqrtf((float)n));
        k->axpy(0.37f, a, c, n);
        dsi_kernels_ref.axpy(0.37f, a, d, n);
        assert_true(max_rel(c, d, n) < 1e-6);
        /* dots / wsum over strided rows */
        int nk = rint_(1, 70), dd = rint_(1, 600), ld = dd + rint_(0, 9);
        float *kk = malloc(sizeof(float) * nk * ld), *q = malloc(sizeof(float) * dd), *o1 = malloc(sizeof(float) * nk),
              *o2 = malloc(sizeof(float) * nk), *w1 = malloc(sizeof(float) * dd), *w2 = malloc(sizeof(float) * dd);
        for (int i = 0; i < nk * ld; i++) kk[i] = unif();
        for (int i = 0; i < dd; i++) { q[i] = unif(); w1[i] = w2[i] = unif(); }
        for (int i = 0; i < nk; i++) o1[i] = o2[i] = unif();
        int accum = iter & 1;
        k->dots(q, kk, nk, ld, dd, o1, accum);
        dsi_kernels_ref.dots(q, kk, nk, ld, dd, o2, accum);
        assert_true(max_rel(o1, o2, nk) < 1e-5 * sqrt(dd));
        k->wsum(o2, kk, nk, ld, dd, w1);
        dsi_kernels_ref.wsum(o2, kk, nk, ld, dd, w2);
        assert_true(max_rel(w1, w2, dd) < 1e-5 * sqrt(nk));
        free(kk); free(q); free(o1); free(o2); free(w1); free(w2);
        free(a); free(b); free(c); free(d);
        free(x); free(y); free(r); free(data); free(scale);
    }
}

/* The SIMD paths this CPU runs (AVX-512 machines run both). */
static const char *const simd_names[] = {"avx2", "avx512"};

/* Runs check on each SIMD path this CPU has; skips the test when none. */
static void for_each_simd(void (*check)(const dsi_kernels *)) {
    int ran = 0;
    for (int n = 0; n < 2; n++) {
        const dsi_kernels *k = dsi_kernels_by_name(simd_names[n]);
        if (!k) continue;
        check(k);
        ran++;
    }
    if (!ran) { printf("  no SIMD path on this CPU: skipped\n"); skip(); }
}

/* Scale blocks other than DeepSeek's 128x128 (config weight_block_size). */
static void check_block_sizes(const dsi_kernels *k) {
    int sizes[][2] = {{1, 1}, {4, 4}, {32, 64}, {64, 32}, {100, 60}, {128, 16}, {8, 8}, {96, 32}};
    for (int i = 0; i < 8; i++) {
        g_block_rows = sizes[i][0];
        g_block_cols = sizes[i][1];
        check_impl(k);
    }
    g_block_rows = g_block_cols = 128;
}

static void test_block_sizes(void **state) { for_each_simd(check_block_sizes); }

static void test_avx512(void **state) {
    const dsi_kernels *k = dsi_kernels_by_name("avx512");
    if (!k) { printf("  avx512 not supported on this CPU: skipped\n"); skip(); }
    check_impl(k);
}

/* FP8 x FP8 with quantised activations (the --fp8-act prefill path). */
static void test_q8(void **state) {
    const dsi_kernels *k = dsi_kernels_by_name("avx512");
    if (!k || !k->matmul_q8) { printf("  AVX512_BF16 not supported on this CPU: skipped\n"); skip(); }
    for (int iter = 0; iter < 60; iter++) {
        int rows = rint_(1, 200), cols = rint_(1, 600), M = rint_(1, 30);
        g_block_rows = iter % 3 ? 128 : rint_(1, 130);
        void *data;
        float *scale;
        dsi_mat W = random_mat(DSI_F8_E4M3, rows, cols, &data, &scale);
        int ldq = (cols + 127) / 128 * 128, lds = ldq / 128;
        uint16_t *xq = calloc((size_t)M * ldq, 2);
        float *xs = malloc(sizeof(float) * M * lds);
        for (int m = 0; m < M; m++) {
            for (int c = 0; c < cols; c++) {
                uint8_t b = (uint8_t)(next() & 0xff);
                if ((b & 0x7f) == 0x7f) b ^= 1;
                xq[(size_t)m * ldq + c] = dsi_f32_to_bf16(dsi_e4m3_to_f32(b));
            }
            for (int t = 0; t < lds; t++) xs[m * lds + t] = ldexpf(1.0f + 0.5f * unif(), rint_(-8, 0));
        }
        int n0 = rint_(0, rows - 1), n1 = rint_(n0 + 1, rows), acc = iter & 1;
        float *y = malloc(sizeof(float) * M * rows), *r = malloc(sizeof(float) * M * rows);
        for (int i = 0; i < M * rows; i++) y[i] = r[i] = acc ? unif() : NAN;
        dsi_matmul_q8_ref(&W, xq, ldq, xs, lds, M, r, rows, 0, n0, n1, acc);
        k->matmul_q8(&W, xq, ldq, xs, lds, M, y, rows, 0, n0, n1, acc);
        for (int m = 0; m < M; m++)
            for (int n = 0; n < rows; n++) {
                float a = y[m * rows + n], b = r[m * rows + n];
                if (n < n0 || n >= n1) { assert_true(acc ? a == b : isnan(a)); continue; }
                double mag = 0; /* the size of the products summed */
                for (int c = 0; c < cols; c++)
                    mag = fmax(mag, fabs(dsi_bf16_to_f32(xq[(size_t)m * ldq + c]) * dsi_mat_get(&W, n, c) * xs[m * lds + c / 128]));
                if (!(fabs(a - b) <= 1e-5 * mag * cols + 1e-6 * fabs(b))) {
                    fprintf(stderr, "q8 rows %d cols %d M %d: y[%d][%d] = %g, ref %g\n", rows, cols, M, m, n, a, b);
                    fail();
                }
            }
        free(xq); free(xs); free(y); free(r); free(data); free(scale);
    }
    g_block_rows = 128;
}

/* matmul_rowwise: near the reference, and every output row the same bits as
 * that row computed alone, at another place in a batch, over another row
 * range split (batch invariance: what --batch-invariant relies on). */
static void check_rowwise(const dsi_kernels *k) {
    dsi_dtype dts[] = {DSI_F8_E4M3, DSI_BF16, DSI_F16, DSI_F32};
    for (int iter = 0; iter < 40; iter++) {
        dsi_dtype dt = dts[iter % 4];
        int rows = rint_(1, 300), cols = iter % 3 ? 64 * rint_(1, 8) : rint_(1, 500), M = rint_(2, 40);
        void *data;
        float *scale;
        dsi_mat W = random_mat(dt, rows, cols, &data, &scale);
        float *x = malloc(sizeof(float) * M * cols), *y = malloc(sizeof(float) * M * rows);
        float *r = malloc(sizeof(float) * M * rows), *one = malloc(sizeof(float) * (M + 3) * rows);
        for (int i = 0; i < M * cols; i++) x[i] = unif();
        dsi_kernels_ref.matmul(&W, x, M, cols, r, rows, 0, 0, rows, 0);
        k->matmul_rowwise(&W, x, M, cols, y, rows, 0, 0, rows, 0);
        for (int i = 0; i < M * rows; i++)
            if (!(fabs(y[i] - r[i]) <= 1e-4 * (1 + fabs(r[i])) * sqrt(cols))) {
                fprintf(stderr, "%s rowwise dtype %d rows %d cols %d M %d: [%d] %g vs %g\n", k->name, dt, rows, cols, M, i,
                        y[i], r[i]);
                fail();
            }
        int m = rint_(0, M - 1), at = rint_(0, 3), split = rint_(1, rows);
        /* row m alone, then as row `at` of a batch of (at + 1), in two row ranges */
        k->matmul_rowwise(&W, x + (size_t)m * cols, 1, cols, one, rows, 0, 0, rows, 0);
        assert_memory_equal(one, y + (size_t)m * rows, sizeof(float) * rows);
        float *xb = malloc(sizeof(float) * (at + 1) * cols);
        for (int i = 0; i < (at + 1) * cols; i++) xb[i] = unif();
        memcpy(xb + (size_t)at * cols, x + (size_t)m * cols, sizeof(float) * cols);
        k->matmul_rowwise(&W, xb, at + 1, cols, one, rows, 0, 0, split, 0);
        k->matmul_rowwise(&W, xb, at + 1, cols, one, rows, 0, split, rows, 0);
        assert_memory_equal(one + (size_t)at * rows, y + (size_t)m * rows, sizeof(float) * rows);
        free(xb); free(x); free(y); free(r); free(one); free(data); free(scale);
    }
}

static void test_rowwise(void **state) {
    const char *names[] = {"ref", "avx2", "avx512"};
    int ran = 0;
    for (int i = 0; i < 3; i++) {
        const dsi_kernels *k = dsi_kernels_by_name(names[i]);
        if (!k) continue;
        check_rowwise(k);
        ran++;
    }
    assert_true(ran >= 1);
}

/* The multi-head attention loops: the same bits as dots/wsum per head, on
 * random head counts, row counts, widths and strides. */
static void check_multi_head(const dsi_kernels *k) {
    assert_non_null(k->dots_mh);
    assert_non_null(k->wsum_mh);
    for (int iter = 0; iter < 60; iter++) {
        int nh = rint_(1, 11), n = rint_(1, 70), d = iter % 3 ? rint_(1, 600) : 64 * rint_(1, 9);
        size_t ldk = d + rint_(0, 9), ldq = d + rint_(0, 5), ldo = n + rint_(0, 5), ldw = d + rint_(0, 5);
        float *kk = malloc(sizeof(float) * n * ldk), *q = malloc(sizeof(float) * nh * ldq);
        float *o1 = malloc(sizeof(float) * nh * ldo), *o2 = malloc(sizeof(float) * nh * ldo);
        float *w1 = malloc(sizeof(float) * nh * ldw), *w2 = malloc(sizeof(float) * nh * ldw);
        for (size_t i = 0; i < (size_t)n * ldk; i++) kk[i] = unif();
        for (size_t i = 0; i < (size_t)nh * ldq; i++) q[i] = unif();
        for (size_t i = 0; i < (size_t)nh * ldo; i++) o1[i] = o2[i] = unif();
        for (size_t i = 0; i < (size_t)nh * ldw; i++) w1[i] = w2[i] = unif();
        int acc = iter & 1;
        k->dots_mh(q, ldq, nh, kk, n, ldk, d, o1, ldo, acc, iter % 4 == 3 ? kk : NULL); /* `next` only prefetches */
        for (int h = 0; h < nh; h++) k->dots(q + h * ldq, kk, n, ldk, d, o2 + h * ldo, acc);
        assert_memory_equal(o1, o2, sizeof(float) * nh * ldo);
        k->wsum_mh(o1, ldo, nh, kk, n, ldk, d, w1, ldw);
        for (int h = 0; h < nh; h++) k->wsum(o1 + h * ldo, kk, n, ldk, d, w2 + h * ldw);
        assert_memory_equal(w1, w2, sizeof(float) * nh * ldw);
        free(kk); free(q); free(o1); free(o2); free(w1); free(w2);
    }
}

static void test_multi_head(void **state) { for_each_simd(check_multi_head); }

/* expsum against expf: within 2 ulp-ish (3e-7 relative) over the softmax
 * range, exactly 0 far below it, the sum of what it wrote. */
static void check_expsum(const dsi_kernels *k) {
    assert_non_null(k->expsum);
    double worst = 0;
    for (int iter = 0; iter < 200; iter++) {
        int n = rint_(1, 100);
        float x[100], y[100], sub = (float)(unif() * 10);
        for (int i = 0; i < n; i++) x[i] = y[i] = sub - (float)(fabs(unif()) * (iter % 4 == 0 ? 120 : 30));
        float s = k->expsum(x, n, sub);
        double ref_sum = 0, got_sum = 0;
        for (int i = 0; i < n; i++) {
            double r = expf(y[i] - sub);
            if (y[i] - sub < -104) assert_true(x[i] == 0.0f);
            else if (r > 1e-30) worst = fmax(worst, fabs(x[i] - r) / r);
            ref_sum += r;
            got_sum += x[i];
        }
        assert_true(fabs(s - got_sum) <= 1e-6 * got_sum + 1e-30);
        assert_true(fabs(s - ref_sum) <= 1e-5 * ref_sum + 1e-30);
    }
    printf("  %s expsum: worst relative error vs expf %.2e\n", k->name, worst);
    assert_true(worst <= 3e-7);
}

static void test_expsum(void **state) { for_each_simd(check_expsum); }

/* silu_mul against the reference (glibc expf): within 1e-6 relative of each
 * product, over SwiGLU's range and far outside it (+-120: exp's clamps),
 * any length (masked tails), and nothing written past n. */
static void check_silu_mul(const dsi_kernels *k) {
    assert_non_null(k->silu_mul);
    double worst = 0;
    for (int iter = 0; iter < 200; iter++) {
        int n = rint_(1, 100);
        float g[101], r[101], u[100];
        for (int i = 0; i < n; i++) {
            g[i] = r[i] = (float)(unif() * (iter % 4 == 0 ? 240 : 16));
            u[i] = (float)unif();
        }
        g[n] = r[n] = 12345.0f;
        k->silu_mul(g, u, (size_t)n);
        dsi_kernels_ref.silu_mul(r, u, (size_t)n);
        assert_true(g[n] == 12345.0f);
        for (int i = 0; i < n; i++) {
            double d = fabs((double)g[i] - r[i]), m = fabs((double)r[i]);
            if (m > 1e-30) worst = fmax(worst, d / m);
            else assert_true(d <= 1e-30);
        }
    }
    printf("  %s silu_mul: worst relative error vs the reference %.2e\n", k->name, worst);
    assert_true(worst <= 1e-6);
}

static void test_silu_mul(void **state) { for_each_simd(check_silu_mul); }

/* fp8_round: the reference's bits for every element (NaN: any NaN), any
 * length (groups of 128 and a shorter last one, masked tails), nothing
 * written past n. Rows mix magnitudes so that a group's scale puts values in
 * e4m3's subnormal range, on rounding ties and at 448; some rows hold
 * zeros only, infinities or a NaN (which amax skips, as fmaxf). */
static void check_fp8_round(const dsi_kernels *k) {
    assert_non_null(k->fp8_round);
    enum { N = 700 };
    float x[N + 1], r[N + 1];
    for (int iter = 0; iter < 300; iter++) {
        int n = rint_(1, N), kind = iter % 6;
        for (int i = 0; i < n; i++) {
            float v = unif() * ldexpf(1.0f, rint_(-30, 10));
            if (kind == 1) v = ldexpf((float)rint_(-31, 31), rint_(-12, 0)); /* ties at some scales */
            if (kind == 2) v = 0.0f;
            x[i] = r[i] = v;
        }
        if (kind == 3) x[rint_(0, n - 1)] = NAN;
        if (kind == 4) x[rint_(0, n - 1)] = rint_(0, 1) ? INFINITY : -INFINITY;
        for (int i = 0; i < n; i++) r[i] = x[i];
        x[n] = r[n] = 12345.0f;
        k->fp8_round(x, n);
        dsi_fp8_round_ref(r, n);
        assert_true(x[n] == 12345.0f);
        for (int i = 0; i < n; i++) {
            if (isnan(r[i])) { assert_true(isnan(x[i])); continue; }
            if (memcmp(&x[i], &r[i], 4)) {
                fprintf(stderr, "%s fp8_round n %d kind %d: x[%d] = %a, ref %a\n", k->name, n, kind, i, x[i], r[i]);
                fail();
            }
        }
    }
}

static void test_fp8_round(void **state) { for_each_simd(check_fp8_round); }

/* fp8_quant: the reference's scales and bf16 codes bit for bit (a NaN's
 * code included), zeros up to the next multiple of 128 and nothing past
 * it; the same rows as fp8_round's, and its values: q * s is fp8_round's
 * result wherever that is not a NaN. */
static void check_fp8_quant(const dsi_kernels *k) {
    assert_non_null(k->fp8_quant);
    enum { N = 700, NQ = 768 };
    float x[N], r[N], s[NQ / 128 + 1], rs[NQ / 128 + 1];
    uint16_t q[NQ + 1], rq[NQ + 1];
    for (int iter = 0; iter < 300; iter++) {
        int n = rint_(1, N), kind = iter % 6, nq = (n + 127) / 128 * 128;
        for (int i = 0; i < n; i++) {
            float v = unif() * ldexpf(1.0f, rint_(-30, 10));
            if (kind == 1) v = ldexpf((float)rint_(-31, 31), rint_(-12, 0));
            if (kind == 2) v = 0.0f;
            x[i] = v;
        }
        if (kind == 3) x[rint_(0, n - 1)] = NAN;
        if (kind == 4) x[rint_(0, n - 1)] = rint_(0, 1) ? INFINITY : -INFINITY;
        for (int i = 0; i <= NQ; i++) q[i] = rq[i] = 0xabcd;
        s[nq / 128] = rs[nq / 128] = 12345.0f;
        k->fp8_quant(x, n, q, s);
        dsi_fp8_quant_ref(x, n, rq, rs);
        assert_true(q[nq] == 0xabcd && s[nq / 128] == 12345.0f);
        if (memcmp(q, rq, sizeof q) || memcmp(s, rs, sizeof(float) * (nq / 128))) {
            for (int i = 0; i < nq; i++)
                if (q[i] != rq[i]) fprintf(stderr, "%s fp8_quant n %d kind %d: q[%d] = %#x, ref %#x\n", k->name, n, kind, i, q[i], rq[i]);
            fail();
        }
        for (int i = n; i < nq; i++) assert_true(q[i] == 0);
        for (int i = 0; i < n; i++) r[i] = x[i];
        dsi_fp8_round_ref(r, n);
        for (int i = 0; i < n; i++)
            if (!isnan(r[i])) assert_true(dsi_bf16_to_f32(q[i]) * s[i / 128] == r[i]);
    }
}

static void test_fp8_quant(void **state) { for_each_simd(check_fp8_quant); }

static void test_avx2(void **state) {
    const dsi_kernels *k = dsi_kernels_by_name("avx2");
    if (!k) { printf("  avx2 not supported on this CPU: skipped\n"); skip(); }
    check_impl(k);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_e4m3_codes),
        cmocka_unit_test(test_e4m3_round),
        cmocka_unit_test(test_avx512),
        cmocka_unit_test(test_block_sizes),
        cmocka_unit_test(test_q8),
        cmocka_unit_test(test_avx2),
        cmocka_unit_test(test_rowwise),
        cmocka_unit_test(test_multi_head),
        cmocka_unit_test(test_expsum),
        cmocka_unit_test(test_silu_mul),
        cmocka_unit_test(test_fp8_round),
        cmocka_unit_test(test_fp8_quant),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
