/* Small helpers shared by the benchmarks: a median, and memory backed as
 * the engine's resident weights are. */
#ifndef DSI_BENCH_STATS_H
#define DSI_BENCH_STATS_H

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

#endif
