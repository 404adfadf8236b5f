/* Small statistics shared by the benchmarks. */
#ifndef DSI_BENCH_STATS_H
#define DSI_BENCH_STATS_H

#include <stdlib.h>

static inline int bench_cmp_dbl(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* The median of v[0..n) (sorts v in place). */
static inline double bench_median(double *v, int n) {
    qsort(v, n, sizeof *v, bench_cmp_dbl);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

#endif
