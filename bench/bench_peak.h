/* Peak arithmetic rates of the CPU the benchmarks run on, measured with
 * every thread of a pool: the compute bounds bench_engine and
 * bench_batch_decode print their figures against. */
#ifndef DSI_BENCH_PEAK_H
#define DSI_BENCH_PEAK_H

#include <immintrin.h>
#include <stdint.h>

#include "core/threadpool.h"
#include "dsinfer/common.h"

/* ---- peak FMA rate: independent FMA chains in registers, at the widest
 * vector width this CPU has (lanes: 16 or 8) */
#define FMA_CHAINS 12
__attribute__((target("avx512f"), unused)) static void fma_task512(void *ctx, int64_t b, int64_t e, int t) {
    __m512 a[FMA_CHAINS];
    for (int i = 0; i < FMA_CHAINS; i++) a[i] = _mm512_set1_ps(1.0f + i * 1e-3f);
    __m512 m = _mm512_set1_ps(0.999999f), c = _mm512_set1_ps(1e-7f);
    for (int64_t it = b; it < e; it++)
        for (int r = 0; r < 1000; r++) {
            _Pragma("GCC unroll 12") for (int i = 0; i < FMA_CHAINS; i++) a[i] = _mm512_fmadd_ps(a[i], m, c);
        }
    __m512 s = a[0];
    for (int i = 1; i < FMA_CHAINS; i++) s = _mm512_add_ps(s, a[i]);
    volatile float sink = _mm512_reduce_add_ps(s);
    (void)sink;
}
__attribute__((target("avx2,fma"), unused)) static void fma_task256(void *ctx, int64_t b, int64_t e, int t) {
    __m256 a[FMA_CHAINS];
    for (int i = 0; i < FMA_CHAINS; i++) a[i] = _mm256_set1_ps(1.0f + i * 1e-3f);
    __m256 m = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-7f);
    for (int64_t it = b; it < e; it++)
        for (int r = 0; r < 1000; r++) {
            _Pragma("GCC unroll 12") for (int i = 0; i < FMA_CHAINS; i++) a[i] = _mm256_fmadd_ps(a[i], m, c);
        }
    __m256 s = a[0];
    for (int i = 1; i < FMA_CHAINS; i++) s = _mm256_add_ps(s, a[i]);
    float f[8];
    _mm256_storeu_ps(f, s);
    volatile float sink = f[0];
    (void)sink;
}

/* ---- peak BF16 dot-product rate (vdpbf16ps: 32 multiply-adds per
 * instruction), the FP8 x FP8 matmuls' instruction; 0 without AVX512_BF16
 * (those matmuls then run in float32 FMAs) */
__attribute__((target("avx512f,avx512bf16"), unused)) static void dp_task(void *ctx, int64_t b, int64_t e, int t) {
    __m512 a[FMA_CHAINS];
    for (int i = 0; i < FMA_CHAINS; i++) a[i] = _mm512_set1_ps(1.0f + i * 1e-3f);
    __m512bh x = (__m512bh)_mm512_set1_epi32(0x3f803f80), w = (__m512bh)_mm512_set1_epi32(0x33d633d6); /* 1, 1e-7 */
    for (int64_t it = b; it < e; it++)
        for (int r = 0; r < 1000; r++) {
            _Pragma("GCC unroll 12") for (int i = 0; i < FMA_CHAINS; i++) a[i] = _mm512_dpbf16_ps(a[i], x, w);
        }
    __m512 s = a[0];
    for (int i = 1; i < FMA_CHAINS; i++) s = _mm512_add_ps(s, a[i]);
    volatile float sink = _mm512_reduce_add_ps(s);
    (void)sink;
}

__attribute__((unused)) static double measure_peak_bf16(dsi_pool *pool) {
    if (!__builtin_cpu_supports("avx512bf16")) return 0;
    int64_t iters = 2000 * dsi_pool_size(pool);
    double best = 0;
    for (int rep = 0; rep < 3; rep++) {
        double t0 = dsi_now();
        dsi_pool_for(pool, iters, 1, dp_task, NULL);
        double f = iters * 1000.0 * FMA_CHAINS * 32 * 2 / (dsi_now() - t0);
        if (f > best) best = f;
    }
    return best;
}

__attribute__((unused)) static double measure_peak_flops(dsi_pool *pool) {
    int64_t iters = 2000 * dsi_pool_size(pool);
    int wide = __builtin_cpu_supports("avx512f");
    double best = 0;
    for (int rep = 0; rep < 3; rep++) {
        double t0 = dsi_now();
        dsi_pool_for(pool, iters, 1, wide ? fma_task512 : fma_task256, NULL);
        double f = iters * 1000.0 * FMA_CHAINS * (wide ? 16 : 8) * 2 / (dsi_now() - t0);
        if (f > best) best = f;
    }
    return best;
}

#endif
