/* The decode GEMV (one activation row) on one core, for the shapes that make
 * up a decoded token of `small`, each next to two bounds measured in the
 * same run:
 *   memory   the GEMV over weights streamed from memory (copies cycled
 *            through, together several times the last-level cache), against
 *            a plain streaming read of the same buffers, timed alternately
 *            with it (this host's bandwidth drifts; the ratio is the median
 *            of the per-pair ratios)
 *   cache    the same GEMV over 512 KB of rows that stay in L2: the
 *            rate its arithmetic allows (for FP8: five shifts, four ands and
 *            four FMAs per 64 weight bytes)
 *   issue    (FP8, AVX-512) the cache rate against those 13 instructions
 *            run on registers alone, no loads, in the kernel's dependency
 *            pattern: the rate the core issues them at. Zen 4 starts at
 *            most two 512-bit vector instructions a cycle (at most one FMA
 *            and one shift among them): 6.5 cycles per 64 bytes, ~33 GB/s
 *            at 3.3 GHz, near one core's streaming read (30-37 GB/s here).
 * A decode GEMV can stream no faster than the lower of the two. Weights are
 * in 2 MiB-aligned memory with transparent huge pages, as the engine's
 * resident copy (--no-mmap).
 *
 *   build/bench_gemv [--kernels avx512|avx2|ref] [--pairs N]
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench_stats.h"
#include "dsinfer/common.h"
#include "dsinfer/safetensors.h"
#include "kernels/kernels.h"
#include "model/model_impl.h"

#define STREAM_BYTES ((size_t)512 << 20) /* all copies of one shape together */
#define CACHE_BYTES ((size_t)512 << 10)
#define WARMUP 3

typedef struct {
    const char *what;
    dsi_dtype dt;
    int rows, cols;
} shape;

static void fill(uint8_t *d, size_t n, dsi_dtype dt, uint32_t seed) {
    if (dt == DSI_BF16) { /* values in [1, 2): no denormals, no NaN */
        uint16_t *h = (uint16_t *)d;
        for (size_t i = 0; i < n / 2; i++) h[i] = (uint16_t)(0x3f80 | (((i + seed) * 2654435761u) >> 25));
    } else {
        for (size_t i = 0; i < n; i++) {
            uint8_t b = (uint8_t)(((i + seed) * 2654435761u) >> 13);
            d[i] = (b & 0x7f) == 0x7f ? b ^ 1 : b; /* no NaN code */
        }
    }
}

/* The FP8 decode's instructions for two 64-byte lines (per line: two
 * 16-bit arithmetic shifts and one 16-bit left shift, two 32-bit shifts,
 * four ands, four FMAs into four accumulators; as gemv1_e4m3_body), on
 * constant registers, n times in one asm loop: GB/s of weight bytes the
 * core could decode and multiply if loads were free. */
__attribute__((target("avx512f,avx512bw"))) static double fp8_issue_gbs(long n) {
#define LINE(D, U, V, T, P, Q, A0, A1, A2, A3)                                                                \
    "vpsraw $4, %%zmm" D ", %%zmm" U "\n\t"                                                                  \
    "vpsllw $8, %%zmm" D ", %%zmm" V "\n\t"                                                                  \
    "vpsraw $4, %%zmm" V ", %%zmm" T "\n\t"                                                                  \
    "vpslld $16, %%zmm" T ", %%zmm" P "\n\t"                                                                 \
    "vpslld $16, %%zmm" U ", %%zmm" Q "\n\t"                                                                 \
    "vpandd %%zmm12, %%zmm" P ", %%zmm" P "\n\t"                                                             \
    "vpandd %%zmm12, %%zmm" Q ", %%zmm" Q "\n\t"                                                             \
    "vpandd %%zmm12, %%zmm" T ", %%zmm" T "\n\t"                                                             \
    "vpandd %%zmm12, %%zmm" U ", %%zmm" U "\n\t"                                                             \
    "vfmadd231ps %%zmm15, %%zmm" P ", %%zmm" A0 "\n\t"                                                       \
    "vfmadd231ps %%zmm15, %%zmm" Q ", %%zmm" A1 "\n\t"                                                       \
    "vfmadd231ps %%zmm15, %%zmm" T ", %%zmm" A2 "\n\t"                                                       \
    "vfmadd231ps %%zmm15, %%zmm" U ", %%zmm" A3 "\n\t"
    long it = n;
    double t0 = dsi_now();
    __asm__ volatile("mov $0x87f00000, %%eax\n\t"
                     "vpbroadcastd %%eax, %%zmm12\n\t"
                     "mov $0x3cb4c3a5, %%eax\n\t"
                     "vpbroadcastd %%eax, %%zmm13\n\t"
                     "vpxord %%zmm14, %%zmm14, %%zmm14\n\t"
                     "vpxord %%zmm15, %%zmm15, %%zmm15\n\t" /* x = 0: no denormal results */
                     "vpxord %%zmm0, %%zmm0, %%zmm0\n\t"
                     "vmovaps %%zmm0, %%zmm1\n\tvmovaps %%zmm0, %%zmm2\n\tvmovaps %%zmm0, %%zmm3\n\t"
                     "vmovaps %%zmm0, %%zmm4\n\tvmovaps %%zmm0, %%zmm5\n\tvmovaps %%zmm0, %%zmm6\n\t"
                     "vmovaps %%zmm0, %%zmm7\n\t"
                     "1:\n\t" LINE("13", "16", "17", "18", "19", "20", "0", "1", "2", "3")
                         LINE("14", "21", "22", "23", "24", "25", "4", "5", "6", "7") "dec %0\n\t"
                                                                                    "jnz 1b\n\t"
                     : "+r"(it)
                     :
                     : "rax", "cc", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm12",
                       "xmm13", "xmm14", "xmm15", "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22",
                       "xmm23", "xmm24", "xmm25");
#undef LINE
    return 128.0 * (double)n / (dsi_now() - t0) / 1e9;
}

/* one arena for every shape: the same physical memory under each figure (on
 * this VM, fresh allocations streamed at anything from 10 to 35 GB/s) */
static int run_shape(const dsi_kernels *k, const shape *s, int pairs, uint8_t *mem, double issue) {
    size_t es = dsi_dtype_size(s->dt), bytes = (size_t)s->rows * s->cols * es;
    int copies = (int)(STREAM_BYTES / bytes);
    size_t stride = (bytes + 4095) & ~(size_t)4095;
    if (copies < 3 || stride * copies > STREAM_BYTES) {
        fprintf(stderr, "bench_gemv: %s does not fit the arena three times\n", s->what);
        return 1;
    }
    int sr = DSI_CEIL_DIV(s->rows, 128), sc = DSI_CEIL_DIV(s->cols, 128);
    float *scales = malloc(sizeof(float) * sr * sc), *x = malloc(sizeof(float) * s->cols), *y = malloc(sizeof(float) * s->rows);
    double *t_gemv = malloc(sizeof(double) * pairs), *t_read = malloc(sizeof(double) * pairs);
    double *ratio = malloc(sizeof(double) * pairs), *t_cache = malloc(sizeof(double) * pairs);
    if (!scales || !x || !y || !t_gemv || !t_read || !ratio || !t_cache) {
        fprintf(stderr, "bench_gemv: out of memory for %s\n", s->what);
        return 1;
    }
    for (int c = 0; c < copies; c++) fill(mem + stride * c, bytes, s->dt, (uint32_t)c * 7919u);
    for (int i = 0; i < sr * sc; i++) scales[i] = 1e-3f * (1 + i % 7);
    for (int i = 0; i < s->cols; i++) x[i] = (float)((i * 37) % 17 - 8) / 8;
    dsi_mat W = {s->dt, s->rows, s->cols, NULL, s->dt == DSI_F8_E4M3 ? scales : NULL, 128, 128, sc};
    volatile float sink = 0;
    int c = 0;
    /* memory: GEMV and plain read alternate, each on the next copy; the
     * first WARMUP pairs are not counted (the first shape's first pairs ran
     * at half speed, read included) */
    for (int p = -WARMUP; p < pairs; p++) {
        W.data = mem + stride * (c++ % copies);
        double t0 = dsi_now();
        k->matmul(&W, x, 1, s->cols, y, s->rows, 0, 0, s->rows, 0);
        double tg = dsi_now() - t0;
        const void *r = mem + stride * (c++ % copies);
        t0 = dsi_now();
        sink += bench_read(r, (bytes & ~(size_t)127) / 4, 0);
        if (p < 0) continue;
        t_gemv[p] = tg;
        t_read[p] = dsi_now() - t0;
        ratio[p] = t_read[p] / t_gemv[p];
    }
    /* cache: the first rows of one copy, repeated (the first call warms them) */
    int rows_c = (int)(CACHE_BYTES / ((size_t)s->cols * es));
    rows_c = rows_c < 1 ? 1 : rows_c > s->rows ? s->rows : rows_c;
    size_t bytes_c = (size_t)rows_c * s->cols * es;
    int inner = (int)(((size_t)64 << 20) / bytes_c) + 1;
    W.data = mem;
    k->matmul(&W, x, 1, s->cols, y, rows_c, 0, 0, rows_c, 0);
    for (int p = 0; p < pairs; p++) {
        double t0 = dsi_now();
        for (int i = 0; i < inner; i++) k->matmul(&W, x, 1, s->cols, y, rows_c, 0, 0, rows_c, 0);
        t_cache[p] = (dsi_now() - t0) / inner;
    }
    double g = bytes / bench_median(t_gemv, pairs) / 1e9, rd = bytes / bench_median(t_read, pairs) / 1e9;
    double q = bench_median(ratio, pairs), cache = bytes_c / bench_median(t_cache, pairs) / 1e9;
    printf("%-26s %-5s %5d x %-5d %8.1f %8.1f %7.0f%% %9.1f %7.0f%%", s->what, s->dt == DSI_BF16 ? "bf16" : "fp8",
           s->rows, s->cols, g, rd, 100 * q, cache, 100 * g / (cache < rd ? cache : rd));
    if (issue > 0 && s->dt == DSI_F8_E4M3) printf(" %7.0f%%", 100 * cache / issue);
    printf("\n");
    (void)sink;
    free(scales), free(x), free(y), free(t_gemv), free(t_read), free(ratio), free(t_cache);
    return 0;
}

int main(int argc, char **argv) {
    const char *kname = NULL;
    int pairs = 30;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--kernels") && i + 1 < argc) kname = argv[++i];
        else if (!strcmp(argv[i], "--pairs") && i + 1 < argc) pairs = atoi(argv[++i]);
        else {
            fprintf(stderr, "usage: bench_gemv [--kernels avx512|avx2|ref] [--pairs N]\n");
            return strcmp(argv[i], "--help") ? 2 : 0;
        }
    }
    if (pairs < 3) pairs = 3;
    const dsi_kernels *k = kname ? dsi_kernels_by_name(kname) : dsi_kernels_select();
    if (!k) {
        fprintf(stderr, "bench_gemv: kernels '%s' not usable on this CPU\n", kname);
        return 1;
    }
    const shape shapes[] = {
        {"expert gate/up (small)", DSI_F8_E4M3, 768, 2048},
        {"expert down (small)", DSI_F8_E4M3, 2048, 768},
        {"q_b (small)", DSI_F8_E4M3, 3072, 768},
        {"dense down (small)", DSI_F8_E4M3, 2048, 8192},
        {"expert gate/up (V3)", DSI_F8_E4M3, 2048, 7168},
        {"o_proj (V3)", DSI_F8_E4M3, 7168, 16384},
        {"lm_head (small)", DSI_BF16, 32000, 2048},
    };
    /* the issue rate of the FP8 decode's instructions (the AVX-512 kernel's), median of 9 */
    double issue = 0;
    if (!strcmp(k->name, "avx512")) {
        double r[9];
        fp8_issue_gbs(1 << 20);
        for (int i = 0; i < 9; i++) r[i] = fp8_issue_gbs(4 << 20);
        issue = bench_median(r, 9);
    }
    printf("decode GEMV, one activation row, one thread, %s kernels; %d alternating pairs per shape\n", k->name, pairs);
    printf("memory: weights streamed from memory; read: a plain read of the same bytes, alternating with it;\n"
           "cache: the same GEMV on rows that stay in L2 (its arithmetic's rate); of bound: memory / min(read, cache)\n");
    if (issue > 0)
        printf("of issue: cache against the FP8 decode's 13 vector instructions per 64 bytes run on registers\n"
               "alone (no loads): %.1f GB/s on this core\n", issue);
    printf("\n%-26s %-5s %13s %8s %8s %8s %9s %8s%s\n", "matrix", "dtype", "rows x cols", "memory", "read", "ratio",
           "cache", "of bound", issue > 0 ? " of issue" : "");
    printf("%-26s %-5s %13s %8s %8s %8s %9s %8s\n", "", "", "", "GB/s", "GB/s", "", "GB/s", "");
    uint8_t *mem = bench_huge_alloc(STREAM_BYTES);
    if (!mem) {
        fprintf(stderr, "bench_gemv: cannot map %zu MB\n", STREAM_BYTES >> 20);
        return 1;
    }
    for (size_t i = 0; i < sizeof shapes / sizeof *shapes; i++)
        if (run_shape(k, &shapes[i], pairs, mem, issue)) return 1;
    return 0;
}
