/* Small helpers shared by the benchmarks: a median, memory backed as the
 * engine's resident weights are, and the streaming read the bounds use. */
#ifndef DSI_BENCH_STATS_H
#define DSI_BENCH_STATS_H

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>

static inline int bench_cmp_dbl(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* The median of v[0..n) (sorts v in place). */
static inline double bench_median(double *v, int n) {
    qsort(v, n, sizeof *v, bench_cmp_dbl);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* `bytes` at a 2 MiB boundary with transparent huge pages requested, as
 * dsi_st_make_resident maps the weights (a streaming read of 4 KB pages ran
 * slower than the decode over huge pages). Kept until exit. */
static inline void *bench_huge_alloc(size_t bytes) {
    size_t huge = (size_t)2 << 20, span = bytes + huge;
    uint8_t *raw = mmap(NULL, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) return NULL;
    uint8_t *mem = (uint8_t *)(((uintptr_t)raw + huge - 1) & ~(uintptr_t)(huge - 1));
    madvise(mem, bytes, MADV_HUGEPAGE);
    return mem;
}

/* A streaming read of n floats (a multiple of 32, 32-byte aligned) with
 * 256-bit loads: the bus, not the load ports, limits it on every x86 this
 * runs on, and AVX2 is the common ISA. `pf`: also a software prefetch 8 KB
 * ahead into L2, as the GEMVs issue. Returns a sum to keep the loads. */
__attribute__((target("avx2"))) static inline float bench_read(const float *f, size_t n, int pf) {
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (size_t i = 0; i < n; i += 32) {
        if (pf && i + 2048 < n) _mm_prefetch((const char *)(f + i + 2048), _MM_HINT_T1);
        s0 = _mm256_add_ps(s0, _mm256_load_ps(f + i));
        s1 = _mm256_add_ps(s1, _mm256_load_ps(f + i + 8));
        s2 = _mm256_add_ps(s2, _mm256_load_ps(f + i + 16));
        s3 = _mm256_add_ps(s3, _mm256_load_ps(f + i + 24));
    }
    float o[8];
    _mm256_storeu_ps(o, _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    return o[0] + o[7];
}

#endif
