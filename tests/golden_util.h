/* Helpers for tests that compare against the float64 oracle in tests/data/golden. */
#ifndef DSI_TEST_GOLDEN_UTIL_H
#define DSI_TEST_GOLDEN_UTIL_H

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "dsinfer/safetensors.h"

/* max|a-b| / max|b| over n values */
static inline double rel_err(const float *a, const float *b, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (d > num || isnan(d)) num = isnan(d) ? INFINITY : d;
        if (fabs(b[i]) > den) den = fabs(b[i]);
    }
    return den > 0 ? num / den : num;
}

static inline const dsi_tensor *golden_tensor(const dsi_st_set *g, const char *name) {
    const dsi_tensor *t = dsi_st_find(g, name);
    if (!t) fprintf(stderr, "golden tensor %s missing\n", name);
    return t;
}

#endif
