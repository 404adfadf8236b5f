/* Scalar reference kernels: straightforward, used as the specification. */
#include "kernels/dtype.h"
#include "kernels/kernels.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

float dsi_mat_get(const dsi_mat *W, int r, int c) {
    size_t i = (size_t)r * W->cols + c;
    switch (W->dtype) {
    case DSI_F32: { float f; memcpy(&f, (const uint8_t *)W->data + 4 * i, 4); return f; }
    case DSI_BF16: { uint16_t h; memcpy(&h, (const uint8_t *)W->data + 2 * i, 2); return dsi_bf16_to_f32(h); }
    case DSI_F16: { uint16_t h; memcpy(&h, (const uint8_t *)W->data + 2 * i, 2); return dsi_f16_to_f32(h); }
    case DSI_F8_E4M3: {
        float s = W->scale_inv[(r / W->block_rows) * W->scale_cols + c / W->block_cols];
        return dsi_e4m3_to_f32(((const uint8_t *)W->data)[i]) * s;
    }
    default: return 0.0f;
    }
}

void dsi_mat_row_f32(const dsi_mat *W, int r, int c0, int c1, float *out) {
    for (int c = c0; c < c1; c++) out[c - c0] = dsi_mat_get(W, r, c);
}

static void ref_matmul(const dsi_mat *W, const float *x, int M, int ldx, float *y, int ldy, int y_col0, int n0,
                       int n1, int accumulate) {
    int K = W->cols;
    float *row = malloc(sizeof(float) * K);
    if (!row) return; /* reference kernels are only used in tests and tiny runs */
    for (int n = n0; n < n1; n++) {
        dsi_mat_row_f32(W, n, 0, K, row);
        for (int m = 0; m < M; m++) {
            const float *xm = x + (size_t)m * ldx;
            double acc = 0; /* double: the reference must not be the error source */
            for (int k = 0; k < K; k++) acc += (double)xm[k] * row[k];
            float *dst = &y[(size_t)m * ldy + (n - y_col0)];
            *dst = accumulate ? *dst + (float)acc : (float)acc;
        }
    }
    free(row);
}

static void ref_matmul_t(const dsi_mat *W, int r0, int r1, const float *x, int M, int ldx, float *y, int ldy, int c0,
                         int c1) {
    for (int m = 0; m < M; m++)
        for (int c = c0; c < c1; c++) {
            double acc = 0;
            for (int r = r0; r < r1; r++) acc += (double)x[(size_t)m * ldx + (r - r0)] * dsi_mat_get(W, r, c);
            y[(size_t)m * ldy + (c - c0)] = (float)acc;
        }
}

static float ref_dot(const float *a, const float *b, int n) {
    double s = 0;
    for (int i = 0; i < n; i++) s += (double)a[i] * b[i];
    return (float)s;
}

static void ref_axpy(float a, const float *x, float *y, int n) {
    for (int i = 0; i < n; i++) y[i] += a * x[i];
}

static void ref_dots(const float *q, const float *k, int n, size_t ldk, int d, float *out, int accumulate) {
    for (int j = 0; j < n; j++) {
        float v = ref_dot(q, k + j * ldk, d);
        out[j] = accumulate ? out[j] + v : v;
    }
}

static void ref_wsum(const float *p, const float *v, int n, size_t ldv, int d, float *out) {
    for (int j = 0; j < n; j++) ref_axpy(p[j], v + j * ldv, out, d);
}

void dsi_matmul_q8_ref(const dsi_mat *W, const uint16_t *xq, int ldq, const float *xs, int lds, int M, float *y,
                       int ldy, int y_col0, int n0, int n1, int accumulate) {
    int K = W->cols, nt = DSI_CEIL_DIV(K, 128);
    const uint8_t *w = W->data;
    for (int m = 0; m < M; m++)
        for (int n = n0; n < n1; n++) {
            double total = 0;
            for (int t = 0; t < nt; t++) {
                float tile = 0; /* exact products, float32 sums: what the fast path does */
                for (int k = t * 128; k < DSI_MIN(K, t * 128 + 128); k++)
                    tile += dsi_bf16_to_f32(xq[(size_t)m * ldq + k]) * dsi_e4m3_to_f32(w[(size_t)n * K + k]);
                float ws = W->scale_inv[(size_t)(n / W->block_rows) * W->scale_cols + t];
                total += (double)tile * xs[(size_t)m * lds + t] * ws;
            }
            float *d = &y[(size_t)m * ldy + (n - y_col0)];
            *d = accumulate ? *d + (float)total : (float)total;
        }
}

static void ref_silu_mul(float *g, const float *u, size_t n) {
    for (size_t i = 0; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

float dsi_fp8_scale(const float *x, int n) {
    float amax = 0;
    for (int k = 0; k < n; k++) amax = fmaxf(amax, fabsf(x[k]));
    return amax > 0 ? amax / 448.0f : 1.0f;
}

void dsi_fp8_round_ref(float *x, int n) {
    for (int k0 = 0; k0 < n; k0 += 128) {
        int k1 = DSI_MIN(n, k0 + 128);
        float s = dsi_fp8_scale(x + k0, k1 - k0);
        for (int k = k0; k < k1; k++) x[k] = dsi_e4m3_round(x[k] / s) * s;
    }
}

void dsi_fp8_quant_ref(const float *x, int n, uint16_t *q, float *s) {
    for (int k0 = 0, t = 0; k0 < n; k0 += 128, t++) {
        int k1 = DSI_MIN(n, k0 + 128);
        s[t] = dsi_fp8_scale(x + k0, k1 - k0);
        for (int k = k0; k < k1; k++) q[k] = dsi_f32_to_bf16(dsi_e4m3_round(x[k] / s[t]));
        for (int k = k1; k < k0 + 128; k++) q[k] = 0;
    }
}

const dsi_kernels dsi_kernels_ref = {"ref", ref_matmul, ref_matmul_t, ref_dot, ref_axpy, ref_dots, ref_wsum,
                                     dsi_matmul_q8_ref, ref_matmul, NULL, NULL, NULL, ref_silu_mul,
                                     dsi_fp8_round_ref, dsi_fp8_quant_ref};

const dsi_kernels *dsi_kernels_by_name(const char *name) {
    if (!strcmp(name, "ref")) return &dsi_kernels_ref;
    __builtin_cpu_init();
    if (!strcmp(name, "avx512") && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        return __builtin_cpu_supports("avx512bf16") ? &dsi_kernels_avx512 : &dsi_kernels_avx512_nobf16;
    if (!strcmp(name, "avx2") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return &dsi_kernels_avx2;
    return NULL;
}

const dsi_kernels *dsi_kernels_select(void) {
    const char *env = getenv("DSI_KERNELS");
    if (env && *env) {
        const dsi_kernels *k = dsi_kernels_by_name(env);
        if (k) return k;
    }
    const dsi_kernels *k = dsi_kernels_by_name("avx512");
    if (!k) k = dsi_kernels_by_name("avx2");
    return k ? k : &dsi_kernels_ref;
}
