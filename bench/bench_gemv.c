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
 * --ports (AVX-512 CPUs): why no cheaper exact decode is known here. For
 * each instruction a decode could be built from, 8 independent chains of it
 * are timed alone, 8 FMA chains alone, and both interleaved: "overlap" is
 * how much of the shorter one hides behind the other (100%: its own issue
 * port; 0%: the FMA's). Then an exact decode in 6 instructions instead of
 * the kernel's 9 (two vgf2p8affineqb bit-permute every byte into the
 * float's top two bytes, four masked vpermi2b place them; checked equal to
 * the shift decode on all 256 codes) against the 13-instruction loop, both
 * over 512 KB of rows in L2.
 *
 *   build/bench_gemv [--kernels avx512|avx2|ref] [--pairs N] [--ports]
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench_stats.h"
#include "dsinfer/common.h"
#include "dsinfer/safetensors.h"
#include "kernels/dtype.h"
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
        /* codes of uniform weights in +-448, as make-model's quantised
         * blocks: ~1e-4 subnormal, as real checkpoints. Uniform bytes are
         * a sixteenth subnormal, which Intel cores multiply ~60x slower (a
         * Xeon ran this GEMV at 0.4 GB/s on them) */
        for (size_t i = 0; i < n; i++) {
            uint32_t h = (uint32_t)((i + seed) * 2654435761u);
            d[i] = dsi_f32_to_e4m3(((float)(h >> 8) * (1.0f / 8388608.0f) - 1.0f) * 448.0f);
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

/* ---- --ports: issue-port sharing with the FMA, and a 6-instruction decode ---- */
#define PORT_TARGET __attribute__((target("avx512f,avx512bw,avx512vbmi,gfni,avx512bf16")))
/* 8 chains of OP (one per register) and/or 8 FMA chains, n rounds; seconds */
#define PORT_LOOP(NAME, OP)                                                                                   \
    PORT_TARGET static double NAME(long n, int with_x, int with_f) {                                         \
        __m512i x0 = _mm512_set1_epi32(1), x1 = _mm512_set1_epi32(2), x2 = _mm512_set1_epi32(3),               \
                x3 = _mm512_set1_epi32(4), x4 = _mm512_set1_epi32(5), x5 = _mm512_set1_epi32(6),               \
                x6 = _mm512_set1_epi32(7), x7 = _mm512_set1_epi32(8);                                          \
        const __m512i k1 = _mm512_set1_epi32(0x01020304), k2 = _mm512_set1_epi32(0x05060708);                 \
        __m512 f0 = _mm512_set1_ps(1), f1 = f0, f2 = f0, f3 = f0, f4 = f0, f5 = f0, f6 = f0, f7 = f0;          \
        const __m512 c = _mm512_set1_ps(0.999f);                                                               \
        (void)k1, (void)k2;                                                                                    \
        double t0 = dsi_now();                                                                                 \
        for (long i = 0; i < n; i++) {                                                                         \
            if (with_x) {                                                                                      \
                x0 = OP(x0); x1 = OP(x1); x2 = OP(x2); x3 = OP(x3);                                            \
                x4 = OP(x4); x5 = OP(x5); x6 = OP(x6); x7 = OP(x7);                                            \
            }                                                                                                  \
            if (with_f) {                                                                                      \
                f0 = _mm512_fmadd_ps(f0, c, c); f1 = _mm512_fmadd_ps(f1, c, c);                                \
                f2 = _mm512_fmadd_ps(f2, c, c); f3 = _mm512_fmadd_ps(f3, c, c);                                \
                f4 = _mm512_fmadd_ps(f4, c, c); f5 = _mm512_fmadd_ps(f5, c, c);                                \
                f6 = _mm512_fmadd_ps(f6, c, c); f7 = _mm512_fmadd_ps(f7, c, c);                                \
            }                                                                                                  \
            __asm__ volatile("" : "+v"(x0), "+v"(x1), "+v"(x2), "+v"(x3), "+v"(x4), "+v"(x5), "+v"(x6),        \
                             "+v"(x7));                                                                        \
            __asm__ volatile("" : "+v"(f0), "+v"(f1), "+v"(f2), "+v"(f3), "+v"(f4), "+v"(f5), "+v"(f6),        \
                             "+v"(f7));                                                                        \
        }                                                                                                      \
        return dsi_now() - t0;                                                                                 \
    }
#define OP_SRA(v) _mm512_srai_epi16(v, 4)
#define OP_AND(v) _mm512_and_si512(v, k1)
#define OP_TERN(v) _mm512_ternarylogic_epi32(v, k1, k2, 0xF8)
#define OP_SHUFB(v) _mm512_shuffle_epi8(v, k1)
#define OP_PERMI2B(v) _mm512_permutex2var_epi8(v, k1, k2)
#define OP_GF(v) _mm512_gf2p8affine_epi64_epi8(v, k1, 0)
#define OP_MSHIFT(v) _mm512_multishift_epi64_epi8(k1, v)
#define OP_DPBF(v) _mm512_castps_si512(_mm512_dpbf16_ps(_mm512_castsi512_ps(v), (__m512bh)k1, (__m512bh)k2))
PORT_LOOP(port_sra, OP_SRA)
PORT_LOOP(port_and, OP_AND)
PORT_LOOP(port_tern, OP_TERN)
PORT_LOOP(port_shufb, OP_SHUFB)
PORT_LOOP(port_permi2b, OP_PERMI2B)
PORT_LOOP(port_gf, OP_GF)
PORT_LOOP(port_mshift, OP_MSHIFT)
PORT_LOOP(port_dpbf, OP_DPBF)

/* gf2p8affineqb matrix: output bit i of each byte takes the input bits set
 * in the matrix's byte 7 - i */
#define GF_MAT(b0, b1, b2, b3, b4, b5, b6, b7)                                                                 \
    ((uint64_t)(b0) | (uint64_t)(b1) << 8 | (uint64_t)(b2) << 16 | (uint64_t)(b3) << 24 | (uint64_t)(b4) << 32 | \
     (uint64_t)(b5) << 40 | (uint64_t)(b6) << 48 | (uint64_t)(b7) << 56)
/* e4m3 byte [s e3 e2 e1 e0 m2 m1 m0] -> the float's top byte [s 0 0 0 0 e3 e2 e1]
 * and next byte [e0 m2 m1 m0 0 0 0 0]: the kernel's float, e4m3 x 2^-120 */
static const uint64_t GF_TOP = GF_MAT(1 << 7, 0, 0, 0, 0, 1 << 6, 1 << 5, 1 << 4);
static const uint64_t GF_NEXT = GF_MAT(1 << 3, 1 << 2, 1 << 1, 1 << 0, 0, 0, 0, 0);

typedef struct { __m512i af, ag, idx[4]; } gf_consts;

PORT_TARGET static gf_consts gf_make(void) {
    gf_consts g;
    g.af = _mm512_set1_epi64((long long)GF_TOP);
    g.ag = _mm512_set1_epi64((long long)GF_NEXT);
    for (int i = 0; i < 4; i++) { /* sub-vector i, lane l: byte 4l + i, as the kernel's decode orders them */
        uint8_t b[64];
        for (int l = 0; l < 16; l++) b[4 * l] = b[4 * l + 1] = 0, b[4 * l + 2] = (uint8_t)(64 + 4 * l + i), b[4 * l + 3] = (uint8_t)(4 * l + i);
        g.idx[i] = _mm512_loadu_si512(b);
    }
    return g;
}

/* sub-vector i of a line from its two bit-permuted copies F and G */
PORT_TARGET static inline __m512 gf_decode(const gf_consts *g, int i, __m512i F, __m512i G) {
    return _mm512_castsi512_ps(_mm512_maskz_permutex2var_epi8(0xCCCCCCCCCCCCCCCCull, F, g->idx[i], G));
}

/* The 13-instruction loop and the 6-instruction decode's over `rows` rows
 * of K bytes (L2-resident), `reps` times; GB/s of each into out[0], out[1].
 * Returns 0 when both give the same sums (they decode the same floats). */
PORT_TARGET static int gf_vs_shift(const uint8_t *w, int rows, int K, const float *xs, int reps, double out[2]) {
    gf_consts g = gf_make();
    const __m512i mask = _mm512_set1_epi32((int)0x87f00000);
    __m512 s_shift = _mm512_setzero_ps(), s_gf = s_shift;
    for (int form = 0; form < 2; form++) {
        double t0 = dsi_now();
        for (int rep = 0; rep < reps; rep++)
            for (int r = 0; r < rows; r++) {
                const uint8_t *row = w + (size_t)r * K;
                __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                for (int k = 0; k < K; k += 64) {
                    __m512i d = _mm512_loadu_si512(row + k);
                    __asm__("" : "+v"(d));
                    __m512 v0, v1, v2, v3;
                    if (form == 0) {
                        __m512i u = _mm512_srai_epi16(d, 4), t = _mm512_srai_epi16(_mm512_slli_epi16(d, 8), 4);
                        v0 = _mm512_castsi512_ps(_mm512_and_si512(_mm512_slli_epi32(t, 16), mask));
                        v1 = _mm512_castsi512_ps(_mm512_and_si512(_mm512_slli_epi32(u, 16), mask));
                        v2 = _mm512_castsi512_ps(_mm512_and_si512(t, mask));
                        v3 = _mm512_castsi512_ps(_mm512_and_si512(u, mask));
                    } else {
                        __m512i F = _mm512_gf2p8affine_epi64_epi8(d, g.af, 0), G = _mm512_gf2p8affine_epi64_epi8(d, g.ag, 0);
                        v0 = gf_decode(&g, 0, F, G);
                        v1 = gf_decode(&g, 1, F, G);
                        v2 = gf_decode(&g, 2, F, G);
                        v3 = gf_decode(&g, 3, F, G);
                    }
                    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(xs + k), v0, a0);
                    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(xs + k + 16), v1, a1);
                    a2 = _mm512_fmadd_ps(_mm512_loadu_ps(xs + k + 32), v2, a2);
                    a3 = _mm512_fmadd_ps(_mm512_loadu_ps(xs + k + 48), v3, a3);
                }
                __m512 sum = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
                if (form == 0) s_shift = _mm512_add_ps(s_shift, sum);
                else s_gf = _mm512_add_ps(s_gf, sum);
            }
        out[form] = (double)reps * rows * K / (dsi_now() - t0) / 1e9;
    }
    return memcmp(&s_shift, &s_gf, sizeof s_shift) != 0;
}

/* every e4m3 code through both decodes: 0 when they give the same bits */
PORT_TARGET static int gf_check_codes(void) {
    gf_consts g = gf_make();
    const __m512i mask = _mm512_set1_epi32((int)0x87f00000);
    for (int base = 0; base < 256; base += 64) {
        uint8_t b[64];
        for (int i = 0; i < 64; i++) b[i] = (uint8_t)(base + i);
        __m512i d = _mm512_loadu_si512(b);
        __m512i u = _mm512_srai_epi16(d, 4), t = _mm512_srai_epi16(_mm512_slli_epi16(d, 8), 4);
        __m512i ref[4] = {_mm512_and_si512(_mm512_slli_epi32(t, 16), mask), _mm512_and_si512(_mm512_slli_epi32(u, 16), mask),
                          _mm512_and_si512(t, mask), _mm512_and_si512(u, mask)};
        __m512i F = _mm512_gf2p8affine_epi64_epi8(d, g.af, 0), G = _mm512_gf2p8affine_epi64_epi8(d, g.ag, 0);
        for (int i = 0; i < 4; i++) {
            __m512 v = gf_decode(&g, i, F, G);
            if (memcmp(&v, &ref[i], 64)) return 1;
        }
    }
    return 0;
}

static int run_ports(void) {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512vbmi") || !__builtin_cpu_supports("gfni") ||
        !__builtin_cpu_supports("avx512bf16")) {
        printf("--ports: needs AVX-512 with VBMI, GFNI and BF16\n");
        return 0;
    }
    const struct { const char *name, *what; double (*fn)(long, int, int); } ops[] = {
        {"vpsraw", "shift (the kernel's decode)", port_sra},
        {"vpandd", "and (the kernel's decode)", port_and},
        {"vpternlogd", "and+or in one", port_tern},
        {"vpshufb", "byte shuffle in 128-bit lanes", port_shufb},
        {"vpermi2b", "byte table / two-source shuffle", port_permi2b},
        {"vgf2p8affineqb", "bit permutation within bytes", port_gf},
        {"vpmultishiftqb", "bit-field gather within qwords", port_mshift},
        {"vdpbf16ps", "bf16 pair dot product", port_dpbf},
    };
    long n = 20 << 20;
    port_sra(n / 8, 1, 1); /* warm up: clocks, pages */
    double tf[5];
    for (int r = 0; r < 5; r++) tf[r] = port_sra(n, 0, 1);
    double t_f = bench_median(tf, 5);
    printf("\nissue ports (512-bit), 8 independent chains each; FMA alone: %.2f per ns\n", 8.0 * n / t_f / 1e9);
    printf("%-16s %-34s %9s %9s\n", "instruction", "use in a decode", "per ns", "overlap");
    for (size_t i = 0; i < sizeof ops / sizeof *ops; i++) {
        double tx[5], txf[5];
        for (int r = 0; r < 5; r++) tx[r] = ops[i].fn(n, 1, 0), txf[r] = ops[i].fn(n, 1, 1);
        double a = bench_median(tx, 5), both = bench_median(txf, 5), lo = a < t_f ? a : t_f;
        double ov = (a + t_f - both) / lo;
        printf("%-16s %-34s %9.2f %8.0f%%\n", ops[i].name, ops[i].what, 8.0 * n / a / 1e9, 100 * (ov < 0 ? 0 : ov > 1 ? 1 : ov));
    }
    /* the 6-instruction decode against the kernel's, rows in L2 */
    int K = 2048, rows = (int)(CACHE_BYTES / K);
    uint8_t *w = aligned_alloc(64, (size_t)rows * K);
    float *xs = aligned_alloc(64, sizeof(float) * K);
    if (!w || !xs) return 1;
    fill(w, (size_t)rows * K, DSI_F8_E4M3, 1);
    for (int i = 0; i < K; i++) xs[i] = (float)((i * 37) % 17 - 8) * 0x1p100f; /* products near 1: no denormals */
    int bad = gf_check_codes();
    double r0[7], r1[7], g2[2];
    gf_vs_shift(w, rows, K, xs, 8, g2);
    for (int r = 0; r < 7; r++) {
        bad |= gf_vs_shift(w, rows, K, xs, 64, g2);
        r0[r] = g2[0], r1[r] = g2[1];
    }
    double a = bench_median(r0, 7), b = bench_median(r1, 7);
    printf("\nFP8 decode + FMA over %zu KB of rows in L2 (per 64 bytes: 4 FMAs and a load, plus the decode):\n",
           CACHE_BYTES >> 10);
    printf("  shifts and ands (the kernel's):   9 instructions  %6.1f GB/s\n", a);
    printf("  vgf2p8affineqb x2 + vpermi2b x4:  6 instructions  %6.1f GB/s  %.2fx%s\n", b, b / a,
           bad ? "  (DIFFERENT RESULTS: bug)" : ", the same floats");
    free(w), free(xs);
    return bad;
}

int main(int argc, char **argv) {
    const char *kname = NULL;
    int pairs = 30, ports = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--kernels") && i + 1 < argc) kname = argv[++i];
        else if (!strcmp(argv[i], "--pairs") && i + 1 < argc) pairs = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--ports")) ports = 1;
        else {
            fprintf(stderr, "usage: bench_gemv [--kernels avx512|avx2|ref] [--pairs N] [--ports]\n");
            return strcmp(argv[i], "--help") ? 2 : 0;
        }
    }
    if (ports) return run_ports();
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
