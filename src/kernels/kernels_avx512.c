/* AVX-512 kernels. Weights are converted to float32 in registers:
 *   FP8 e4m3: sign-extend byte to int32, shift left 20, clear bits 27-30 ->
 *             a float32 equal to the e4m3 value times 2^-120 (subnormals
 *             included, exactly); the 2^120 is folded into the block scale,
 *             which is applied to the activations (one scaled copy of an
 *             M-tile per 128-row block of W, resident in L1).
 *   BF16: zero-extend to int32, shift left 16.  F16: vcvtph2ps.  F32: load.
 * NaN e4m3 codes (0x7f/0xff) decode as 480; checkpoints hold none. */
#include "kernels/dtype.h"
#include "kernels/kernels.h"

#include <immintrin.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

/* The micro-tiles guard every read and write of their register arrays with the
 * same (j < nr, m < mr) conditions; GCC cannot see that and warns. */
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#define MR 4 /* activation rows per micro-tile */
#ifndef NR
#define NR 4 /* weight rows per micro-tile */
#endif
#define NB 64 /* weight rows per cache block (divides the 128-row scale block) */
/* Every tile prefetches the same columns of a later tile's rows: with
 * several interleaved row streams the hardware prefetcher alone reaches about
 * half of the memory bandwidth on this machine, with this 70-100%. The
 * distance is whole tiles, at least PF_MIN_BYTES ahead: one tile of short rows
 * (K = 768: 3 KB) is too close to cover the memory latency (21 vs 30 GB/s).
 * Into L2 (T1), as the GEMVs prefetch: into L1 (T0, the form before) the
 * tiles streamed expert-shaped FP8 matrices (768x2048, 96 cycled from
 * memory, one core) at M = 2 11 GB/s, against 19 with T1: 44 -> 75 GFLOP/s;
 * M = 3 64 -> 90, M = 4 74 -> 91, M = 8 80 -> 94. BF16 weights: M = 2 28 ->
 * 43, M = 8 62-72 -> 76-80. Batched decode of `small`, B sequences x 1
 * token per step: +15-20% at B = 8 and 32, one and two threads. */
#define PF_MIN_BYTES 8192
static inline size_t pf_elems(size_t ldw, size_t elem) {
    size_t tile = (size_t)NR * ldw * elem;
    return (size_t)NR * ldw * ((PF_MIN_BYTES + tile - 1) / tile);
}

/* One 64-byte weight load kept in a register. Left alone, GCC folds the
 * load into each of the four shifts that decode it (four loads of the line);
 * from memory the waiting duplicates fill the load queue and fewer lines are
 * in flight: the same GEMV streamed 37 vs 39 GB/s on one core (71.9 vs 76.1
 * on two) against a plain read's 41.7 (80.6). */
static inline __m512i load_line(const void *p) {
    __m512i d = _mm512_loadu_si512(p);
    __asm__("" : "+v"(d));
    return d;
}

static const float TWO_POW_120 = 1.329227995784916e+36f;

static inline __m512 cvt_e4m3(const uint8_t *p) {
    __m512i d = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p));
    d = _mm512_slli_epi32(d, 20);
    d = _mm512_and_si512(d, _mm512_set1_epi32((int)0x87ffffff));
    return _mm512_castsi512_ps(d);
}
static inline __m512 cvt_e4m3_mask(const uint8_t *p, __mmask16 k) {
    __m512i d = _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(k, p));
    d = _mm512_slli_epi32(d, 20);
    d = _mm512_and_si512(d, _mm512_set1_epi32((int)0x87ffffff));
    return _mm512_castsi512_ps(d);
}
static inline __m512 cvt_bf16(const uint16_t *p) {
    __m512i d = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(d, 16));
}
static inline __m512 cvt_bf16_mask(const uint16_t *p, __mmask16 k) {
    __m512i d = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(d, 16));
}
static inline __m512 cvt_f16(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
static inline __m512 cvt_f16_mask(const uint16_t *p, __mmask16 k) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p));
}

/* One micro-tile: rows [n, n+nr) of W against `mr` activation rows xs
 * (stride ldx). Result (nr x mr dot products) stored to out[j][m]. The dtype
 * is a compile-time constant after inlining. */
#define MICRO(NAME, T, CVT, CVTM)                                                                            \
    static inline __attribute__((always_inline)) void NAME(const T *w, size_t ldw, int nr, const float *xs, \
                                                           int ldx, int mr, int K, float out[NR][MR]) {     \
        __m512 acc[NR][MR];                                                                                   \
        _Pragma("GCC unroll 8") for (int j = 0; j < NR; j++)                                                                          \
            _Pragma("GCC unroll 8") for (int m = 0; m < MR; m++) acc[j][m] = _mm512_setzero_ps();                                     \
        int k = 0;                                                                                            \
        for (; k + 64 <= K; k += 64) {                                                                        \
            _Pragma("GCC unroll 8") for (int j = 0; j < NR; j++) if (j < nr)                                  \
                _Pragma("GCC unroll 4") for (size_t b = 0; b < 64 * sizeof(T); b += 64) _mm_prefetch((const char *)(w + j * ldw + pf_elems(ldw, sizeof(T)) + k) + b, _MM_HINT_T1);                        \
            _Pragma("GCC unroll 4") for (int kk = k; kk < k + 64; kk += 16) {                                 \
                __m512 xv[MR];                                                                                \
                _Pragma("GCC unroll 8") for (int m = 0; m < MR; m++)                                          \
                    if (m < mr) xv[m] = _mm512_loadu_ps(xs + (size_t)m * ldx + kk);                           \
                _Pragma("GCC unroll 8") for (int j = 0; j < NR; j++) {                                        \
                    if (j >= nr) break;                                                                       \
                    __m512 wv = CVT(w + j * ldw + kk);                                                        \
                    _Pragma("GCC unroll 8") for (int m = 0; m < MR; m++)                                      \
                        if (m < mr) acc[j][m] = _mm512_fmadd_ps(xv[m], wv, acc[j][m]);                        \
                }                                                                                             \
            }                                                                                                 \
        }                                                                                                     \
        for (; k + 16 <= K; k += 16) {                                                                        \
            __m512 xv[MR];                                                                                    \
            _Pragma("GCC unroll 8") for (int m = 0; m < MR; m++)                                                                      \
                if (m < mr) xv[m] = _mm512_loadu_ps(xs + (size_t)m * ldx + k);                                \
            _Pragma("GCC unroll 8") for (int j = 0; j < NR; j++) {                                                                    \
                if (j >= nr) break;                                                                           \
                __m512 wv = CVT(w + j * ldw + k);                                                             \
                _Pragma("GCC unroll 8") for (int m = 0; m < MR; m++)                                                                  \
                    if (m < mr) acc[j][m] = _mm512_fmadd_ps(xv[m], wv, acc[j][m]);                            \
            }                                                                                                 \
        }                                                                                                     \
        if (k < K) {                                                                                          \
            __mmask16 km = (__mmask16)((1u << (K - k)) - 1);                                                  \
            __m512 xv[MR];                                                                                    \
            _Pragma("GCC unroll 8") for (int m = 0; m < MR; m++)                                                                      \
                if (m < mr) xv[m] = _mm512_maskz_loadu_ps(km, xs + (size_t)m * ldx + k);                      \
            _Pragma("GCC unroll 8") for (int j = 0; j < NR; j++) {                                                                    \
                if (j >= nr) break;                                                                           \
                __m512 wv = CVTM(w + j * ldw + k, km);                                                        \
                _Pragma("GCC unroll 8") for (int m = 0; m < MR; m++)                                                                  \
                    if (m < mr) acc[j][m] = _mm512_fmadd_ps(xv[m], wv, acc[j][m]);                            \
            }                                                                                                 \
        }                                                                                                     \
        _Pragma("GCC unroll 8") for (int j = 0; j < NR; j++)                                                                          \
            _Pragma("GCC unroll 8") for (int m = 0; m < MR; m++)                                                                      \
                if (j < nr && m < mr) out[j][m] = _mm512_reduce_add_ps(acc[j][m]);                            \
    }

static inline __m512 cvt_f32(const float *p) { return _mm512_loadu_ps(p); }
static inline __m512 cvt_f32_mask(const float *p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }

MICRO(micro_bf16, uint16_t, cvt_bf16, cvt_bf16_mask)
MICRO(micro_f16, uint16_t, cvt_f16, cvt_f16_mask)
MICRO(micro_f32, float, cvt_f32, cvt_f32_mask)

/* Matrix-vector FP8 tile (one activation row): the memory-bound decode case.
 * Each of the four decoded sub-vectors of a 64-byte load gets its own
 * accumulator, so no FMA waits on another and loads stay in flight. */
static inline __attribute__((always_inline)) void gemv_e4m3(const uint8_t *w, size_t ldw, int nr, const float *xs,
                                                            int K, float out[NR][MR]) {
    __m512 acc[NR][4];
    _Pragma("GCC unroll 8") for (int j = 0; j < NR; j++)
        _Pragma("GCC unroll 4") for (int i = 0; i < 4; i++) acc[j][i] = _mm512_setzero_ps();
    const __m512i mask = _mm512_set1_epi32((int)0x87f00000);
    int K64 = K & ~63, k = 0;
    for (; k < K64; k += 64) {
        __m512 xv[4];
        _Pragma("GCC unroll 4") for (int i = 0; i < 4; i++) xv[i] = _mm512_loadu_ps(xs + k + 16 * i);
        _Pragma("GCC unroll 8") for (int j = 0; j < NR; j++) {
            if (j >= nr) break;
            _mm_prefetch((const char *)(w + j * ldw + pf_elems(ldw, 1) + k), _MM_HINT_T0);
            __m512i d = load_line(w + j * ldw + k);
            _Pragma("GCC unroll 4") for (int i = 0; i < 4; i++) {
                __m512i t = i == 3 ? d : _mm512_slli_epi32(d, 24 - 8 * i);
                __m512 wv = _mm512_castsi512_ps(_mm512_and_si512(_mm512_srai_epi32(t, 4), mask));
                acc[j][i] = _mm512_fmadd_ps(xv[i], wv, acc[j][i]);
            }
        }
    }
    for (; k < K; k += 16) {
        __mmask16 km = K - k >= 16 ? 0xffff : (__mmask16)((1u << (K - k)) - 1);
        __m512 xv = _mm512_maskz_loadu_ps(km, xs + k);
        _Pragma("GCC unroll 8") for (int j = 0; j < NR; j++)
            if (j < nr) acc[j][0] = _mm512_fmadd_ps(xv, cvt_e4m3_mask(w + j * ldw + k, km), acc[j][0]);
    }
    _Pragma("GCC unroll 8") for (int j = 0; j < NR; j++)
        if (j < nr)
            out[j][0] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[j][0], acc[j][1]),
                                                           _mm512_add_ps(acc[j][2], acc[j][3])));
}

/* The decode GEMV: one FP8 weight row against the scaled, permuted
 * activations, K a multiple of 64. A chunk of rows is one contiguous
 * stream, read a row at a time with a prefetch ROW_PF_BYTES ahead (clamped
 * to the chunk's last line, `pf_last`, so no thread fetches its neighbour's
 * rows). Four rows interleaved (the tile form) are four short streams that
 * restart every tile, and the hardware prefetcher follows them badly: 37 vs
 * 40.7 GB/s on one core against a plain read's 42 (bench-like synthetic,
 * 768x2048 matrices). Four accumulators, one per decoded sub-vector of a
 * 64-byte line: a line's decode takes longer than an FMA's latency, so four
 * chains keep the FMAs busy. Eight (even and odd lines apart, the form
 * before) cost three more adds per row: with the weights in L2, rows of
 * 768 bytes ran 27.7 -> 29.0 GB/s and 2048 bytes 29.4 -> 30.0 with four
 * (bench_gemv's shapes, Zen 4). Used only where nothing else is live (the
 * row loops of gemv_rows16 and gemv_rows_seg): inlined into bigger code,
 * GCC spilled to the stack.
 * On one Zen 4 core the loop is issue-bound: a line is 13 vector
 * instructions, and the core starts at most two 512-bit ones a cycle (one
 * FMA and one shift at most among them; measured with independent
 * instructions: FMA + shift or FMA + and pair up, all three together run
 * at two a cycle). The same 13 on registers, no loads, run at ~34 GB/s of
 * weights; this loop from L2 at 88-92% of that (bench_gemv, "of issue"),
 * which is below one core's streaming read (30-37 GB/s here). But from
 * memory the arithmetic is not what binds it: an FP8 x FP8 form for FP8
 * activations (bf16 decode by the same 16-bit shifts, two vdpbf16ps per
 * line: 7 instructions instead of 13) ran 42-46 GB/s from L2 against this
 * loop's 31, yet in the engine, one thread, windows alternating in one
 * process, its GEMVs took as long as these (perf: 24.8k vs 24.6k samples)
 * and decode ran 9% slower for its serial activation quantiser; from memory
 * both streamed 73-88% of a plain read in bench_gemv. Not kept. Tried and
 * slower or no better (L2, same process): a 16-bit multiply for the 8-bit
 * shift (it shares the FMA pipes), a byte shift (vpslldq) for the 32-bit
 * ones, FP8 x bf16 products with vdpbf16ps on an exact three-way bf16 split
 * of x (6 dot products per line; LUT decode with vpermi2b, which also
 * contends with the FMA pipes): 20-27 GB/s.
 *
 * The prefetch goes to L2 (T1), not L1: on Zen 4 a T0 prefetch stream ran this
 * GEMV at 10-15 GB/s against a plain read's 23-26, T1 at 20-25 (synthetic
 * K = 2048 rows from memory); in the engine, 1-thread decode of `small` went
 * from 20.0 to 24.6 tok/s. The decode takes two bytes per 16-bit arithmetic
 * shift (u, t below): 5 shifts and 4 ands per line instead of 7 and 4, the
 * same floats (25.4 vs 24.6 tok/s; 33 vs 27 GB/s with the weights in L2).
 * Every line is prefetched: one prefetch per 128 bytes (relying on the
 * adjacent-line fetch) halved one- and two-thread decode (32.5 -> 16.2 and
 * 47 -> 29 tok/s, same process), and none at all did the same on huge pages
 * (28.6 -> 13.8 and 40.2 -> 25.0). The hardware prefetchers add little to
 * this loop: as one 8 MB stream without software prefetch it read 9 GB/s,
 * where the 7-instruction FP8 x FP8 form above read 25 and a loop of bare
 * loads 30 (plain read 32): the lines in flight come from the prefetches
 * and from the misses the out-of-order window holds, fewer the more
 * instructions a line takes. The prefetches in flight are capped: the same
 * stream with the lead at 2, 4, 8, 16 and 32 KB read 12, 19, 23-24, 22-24
 * and 23-24 GB/s (plain read 27-31): flat from 8 KB, which by Little's law
 * is ~75 lines at the ~200 ns the short leads imply. A second prefetch per
 * line 4 KB nearer: +4% in that synthetic, -0.5 to +3% in the engine
 * (noise); not kept. There is no second, near prefetch into
 * L1. One 1 KB ahead had measured +1.4% (one thread) and +1.8% (two) when
 * the decode had 8 accumulators and one reduction per row; with today's loop, decode without it ran +0.5 to
 * +3.4% on one thread (five same-process A/Bs, forms alternating per 16
 * tokens; mean +1.8%) and -1.9 to +0.6% on two (six; mean -0.5%), and its
 * 16-row groups from L2 0-2% faster. It went for the one-thread gain: one
 * thread is where decode falls furthest below its bound. Why it costs is
 * not settled: the load ports are not the limit (two rows at once, sharing
 * each activation load, 3 loads per line instead of 5: 1-2% faster from L2,
 * -3 to 0% in the engine; not kept).
 * `pfw` is the far prefetch's address for the first line: w + ROW_PF_BYTES
 * for a whole row (gemv_rows16); for a segment of a long row
 * (gemv_rows_seg) a point of the forward stream that runs
 * dsi__gemv_seg_ahead bytes ahead of the row group.
 * Why a cheaper loop still does not stream faster (synthetic 16-64 MB
 * streams cycling through 1.5 GB, one core, means over 6-40 runs; plain read
 * 32-36 GB/s): a prefetch that finds the core's miss queue full is dropped
 * (a loop of bare T1 prefetches "reads" 100-200 GB/s), so the faster a loop
 * issues them, the more lines it then misses on. A 7-instruction dpbf16 line
 * loop without scales read 31 GB/s with no software prefetch and 24 with this
 * one. Without prefetch, the stream needs few loads per line: 3 loads gave 27
 * GB/s, the same loop with one and two more loads hitting L1 gave 19 and 9.5
 * (this loop has 5: alone it reads 11). A full FP8 x FP8 decode GEMV, with
 * the per-128-column scales, read 29-30.5 GB/s (shift decode, which loses
 * e4m3 subnormals to vdpbf16ps's DAZ; 40-42 from L2) or 28-30 (byte-table
 * decode, exact; 31-32 from L2), with or without prefetch: no better than
 * this loop's ~28 here. So on this core the exact loop's issue rate (31-34
 * GB/s from L2) and the miss queue both hold a decode GEMV to ~85% of a
 * plain read.
 * It is the activation lines, not the loads, that starve the hardware
 * prefetcher without this loop's software prefetch: four loads per weight
 * line from the same four activation lines streamed as fast as a plain read
 * (1.00), from one new activation line per weight line 0.99, from two 0.77,
 * from four (this loop) 0.36-0.54; scattering the activation chunks over the
 * buffer did not help (0.46). A layout that needs one activation line per
 * weight line, four rows interleaved in 16-column lines (byte q of lane l:
 * row q, column l; as llama.cpp repacks its CPU weights), read 0.95 without
 * and 0.97 with the 8 KB prefetch against 0.91 for this loop (synthetic,
 * rows of 2048). In the engine it gained 1.3% (one thread) and 0.8% (two)
 * in a same-process A/B over 16 alternating windows (bench-style decode of
 * `small`, two resident copies): within this host's noise, and not worth a
 * second weight layout for every FP8 kernel. Not kept. */
#define ROW_PF_BYTES 8192
static inline __attribute__((always_inline)) __m512 gemv1_e4m3_body(const uint8_t *w, size_t K, const float *xs,
                                                                    const uint8_t *pfw, const uint8_t *pf_last) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const __m512i mask = _mm512_set1_epi32((int)0x87f00000);
    size_t k = 0;
/* byte i of each 32-bit lane at bits 20-27 with its sign at 31: u holds bytes
 * 1 and 3 shifted within their 16-bit halves, t bytes 0 and 2 */
#define DEC(v) _mm512_castsi512_ps(_mm512_and_si512((v), mask))
#define LINE(off)                                                                                      \
    {                                                                                                  \
        const uint8_t *pf = pfw + k + (off);                                                           \
        _mm_prefetch((const char *)(pf < pf_last ? pf : pf_last), _MM_HINT_T1);                        \
        __m512i d = load_line(w + k + (off));                                                          \
        __m512i u = _mm512_srai_epi16(d, 4), t = _mm512_srai_epi16(_mm512_slli_epi16(d, 8), 4);        \
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(xs + k + (off)), DEC(_mm512_slli_epi32(t, 16)), a0);      \
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(xs + k + (off) + 16), DEC(_mm512_slli_epi32(u, 16)), a1); \
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(xs + k + (off) + 32), DEC(t), a2);                        \
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(xs + k + (off) + 48), DEC(u), a3);                        \
    }
    for (; k + 128 <= K; k += 128) {
        LINE(0)
        LINE(64)
    }
    if (k < K) LINE(0)
#undef LINE
#undef DEC
    return _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
}

/* Lane i of the result: the sum of v[i]'s 16 lanes, for 16 vectors at once
 * (45 shuffles and adds, against 8 per vector one at a time). */
static inline __m512 reduce16(const __m512 v[16]) {
    __m512 u[4];
    for (int q = 0; q < 4; q++) {
        const __m512 *p = v + 4 * q;
        __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(p[0], p[1]), _mm512_unpackhi_ps(p[0], p[1]));
        __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(p[2], p[3]), _mm512_unpackhi_ps(p[2], p[3]));
        /* per 128-bit block: partial sums of rows 4q .. 4q+3 */
        u[q] = _mm512_add_ps(_mm512_shuffle_ps(s01, s23, 0x44), _mm512_shuffle_ps(s01, s23, 0xee));
    }
    __m512 y01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x44), _mm512_shuffle_f32x4(u[0], u[1], 0xee));
    __m512 y23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x44), _mm512_shuffle_f32x4(u[2], u[3], 0xee));
    return _mm512_add_ps(_mm512_shuffle_f32x4(y01, y23, 0x88), _mm512_shuffle_f32x4(y01, y23, 0xdd));
}

/* The sums of four vectors' lanes, each by reduce16's tree (the same bits
 * as reduce16's lanes for them). */
static inline __m128 reduce4(__m512 v0, __m512 v1, __m512 v2, __m512 v3) {
    __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(v0, v1), _mm512_unpackhi_ps(v0, v1));
    __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(v2, v3), _mm512_unpackhi_ps(v2, v3));
    __m512 u = _mm512_add_ps(_mm512_shuffle_ps(s01, s23, 0x44), _mm512_shuffle_ps(s01, s23, 0xee));
    __m512 y = _mm512_add_ps(u, _mm512_shuffle_f32x4(u, u, 0xee)); /* blocks 0 + 2, 1 + 3 */
    return _mm_add_ps(_mm512_castps512_ps128(y), _mm512_extractf32x4_ps(y, 1));
}

/* Lanes 4x .. 4x+3 of v to o + x * ldo (x = 0..3), added to what is there
 * when `accumulate`. */
static inline void float4_store(float *o, size_t ldo, __m512 v, int accumulate) {
    __m128 p[4] = {_mm512_extractf32x4_ps(v, 0), _mm512_extractf32x4_ps(v, 1), _mm512_extractf32x4_ps(v, 2),
                   _mm512_extractf32x4_ps(v, 3)};
    for (int x = 0; x < 4; x++) {
        float *d = o + (size_t)x * ldo;
        _mm_storeu_ps(d, accumulate ? _mm_add_ps(_mm_loadu_ps(d), p[x]) : p[x]);
    }
}

/* v[r] = row r's four accumulators added, for n <= 16 whole rows (zero for
 * r >= n): the rows' loop inside one call instead of a call per row (with
 * the weights in L2, 0-5% faster per shape; from memory 0-5%). */
static __attribute__((noinline)) void gemv_rows16(const uint8_t *w, int K, int n, const float *xs, const uint8_t *last,
                                                  __m512 *v) {
    for (int r = 0; r < n; r++)
        v[r] = gemv1_e4m3_body(w + (size_t)r * K, (size_t)K, xs, w + (size_t)r * K + ROW_PF_BYTES, last);
    for (int r = n; r < 16; r++) v[r] = _mm512_setzero_ps();
}

/* Long rows (seg < K) in segments, as dsi__gemv_rows orders and prefetches
 * them, each row's segments summed as vectors and the g <= DSI_SEG_ROWS rows
 * reduced sixteen at a time instead of a call, a reduction and a scalar sum
 * per segment (with the weights in L2, K = 8192 28.4 -> 28.9 GB/s and
 * K = 7168 28.3 -> 28.6, one process alternating; dropping the loop's
 * division per segment before that: 26.4 -> 27.7, separate runs). */
static __attribute__((noinline)) void gemv_rows_seg(const uint8_t *w, int K, int seg, int g, const float *xs,
                                                    const uint8_t *last, float *out) {
    __m512 v[DSI_SEG_ROWS];
    for (int r = 0; r < g; r++) v[r] = _mm512_setzero_ps();
    const uint8_t *ahead = w + dsi__gemv_seg_ahead(K, seg, g);
    size_t i = 0; /* segment * g + row: the far prefetch's step count */
    for (int k0 = 0; k0 < K; k0 += seg) {
        size_t n = (size_t)DSI_MIN(seg, K - k0);
        for (int r = 0; r < g; r++, i++)
            v[r] = _mm512_add_ps(v[r], gemv1_e4m3_body(w + (size_t)r * K + k0, n, xs + k0, ahead + i * seg, last));
    }
    for (int r0 = 0; r0 < g; r0 += 16) {
        int n = DSI_MIN(16, g - r0);
        for (int r = n; r < 16; r++) v[r0 + r] = _mm512_setzero_ps();
        _mm512_mask_storeu_ps(out + r0, (__mmask16)((1u << n) - 1), reduce16(v + r0));
    }
}

/* out[r] = row r . xs for g rows of K bytes: whole rows (K up to
 * dsi__gemv_seg_bytes) sixteen at a time, each row's four accumulators
 * added into one vector and the sixteen reduced together; longer rows
 * through gemv_rows_seg. One reduction per row was 8 of the
 * ~110-170 vector instructions of a 512-768 byte row: with the weights in
 * L2, rows of 768 bytes ran 29.3 -> 30.6 GB/s and 2048 bytes 30.9 -> 32.2
 * (bench_gemv's shapes, Zen 4, one process alternating). */
static void gemv_rows(const uint8_t *w, int K, int g, const float *xs, const uint8_t *last, float *out) {
    int seg = dsi__gemv_seg_bytes(K);
    if (seg < K) {
        gemv_rows_seg(w, K, seg, g, xs, last, out);
        return;
    }
    for (int r0 = 0; r0 < g; r0 += 16) {
        int n = DSI_MIN(16, g - r0);
        __m512 v[16];
        gemv_rows16(w + (size_t)r0 * K, K, n, xs, last, v);
        _mm512_mask_storeu_ps(out + r0, (__mmask16)((1u << n) - 1), reduce16(v));
    }
}
/* The first ROW_PF_BYTES of a row range, into L2 at once: the FP8 GEMVs'
 * prefetch runs that far ahead of their loads, so without this each call
 * (one matrix, or one thread's chunk of it) starts on demand misses. (The
 * BF16 GEMV, which has no prefetch of its own, streamed the LM head at the
 * same rate with and without it.) */
static inline void prefetch_start(const void *p, size_t bytes) {
    const char *c = p;
    for (size_t off = 0; off < bytes && off < ROW_PF_BYTES; off += 64) _mm_prefetch(c + off, _MM_HINT_T1);
}

/* Per-thread scratch for the scaled activation tile (grown, never shrunk). */
static float *xs_buffer(size_t n) { return dsi__tls_buffer(DSI_TLS_XS, n * sizeof(float)); }

static inline void store_tile(float out[NR][MR], int nr, int mr, float *y, int ldy, int ycol, int acc) {
    for (int m = 0; m < mr; m++)
        for (int j = 0; j < nr; j++) {
            float *d = &y[(size_t)m * ldy + ycol + j];
            *d = acc ? *d + out[j][m] : out[j][m];
        }
}

/* Lanes 4l+i of the 64 floats at x, in lane order l: sub-vector i of the
 * in-dword FP8 decode order. */
static inline __m512 lanes_4l_plus(const float *x, int i) {
    const __m512i pi = _mm512_add_epi32(_mm512_set_epi32(60, 56, 52, 48, 44, 40, 36, 32, 28, 24, 20, 16, 12, 8, 4, 0),
                                        _mm512_set1_epi32(i));
    __m512 lo = _mm512_permutex2var_ps(_mm512_loadu_ps(x), pi, _mm512_loadu_ps(x + 16));      /* indices < 32 */
    __m512 hi = _mm512_permutex2var_ps(_mm512_loadu_ps(x + 32), pi, _mm512_loadu_ps(x + 48)); /* same, into the rest */
    return _mm512_mask_blend_ps(0xff00, lo, hi);                                               /* lanes 8-15 from there */
}

/* Scales MR rows of x by the FP8 block scales of row-block `rb` (x 2^120)
 * and permutes each full 64-column group so that sub-vector i, lane l holds
 * column 4l + i: the order in which micro_e4m3 decodes a 64-byte weight load
 * (byte i of each dword). Columns past the last full group keep their order. */
static void scale_rows(const dsi_mat *W, int rb, const float *x, int ldx, int mr, float *xs) {
    int K = W->cols, bc = W->block_cols, K64 = K & ~63;
    const float *s = W->scale_inv + (size_t)rb * W->scale_cols;
    for (int m = 0; m < mr; m++) {
        const float *xm = x + (size_t)m * ldx;
        float *o = xs + (size_t)m * K;
        int k = 0;
        if (bc % 64 == 0) {
            for (int cb = 0, kend = bc; k < K64; k += 64) {
                if (k == kend) cb++, kend += bc; /* the block index without a division */
                __m512 sv = _mm512_set1_ps(s[cb] * TWO_POW_120);
                for (int i = 0; i < 4; i++) _mm512_storeu_ps(o + k + 16 * i, _mm512_mul_ps(lanes_4l_plus(xm + k, i), sv));
            }
        } else {
            for (; k < K64; k += 64)
                for (int i = 0; i < 4; i++)
                    for (int l = 0; l < 16; l++) o[k + 16 * i + l] = xm[k + 4 * l + i] * (s[(k + 4 * l + i) / bc] * TWO_POW_120);
        }
        for (; k < K; k++) o[k] = xm[k] * (s[k / bc] * TWO_POW_120);
    }
}

/* FP8 micro-tile. A 64-byte load of a weight row holds 16 dwords; byte i of
 * every dword is decoded with shifts inside the dword (no cross-lane
 * shuffles): t = d << (24 - 8i) puts the byte on top, an arithmetic shift by
 * 4 and a mask leave sign | exponent | mantissa where float32 wants them
 * (value x 2^-120). The activations were permuted to match (scale_rows). */
static inline __attribute__((always_inline)) void micro_e4m3(const uint8_t *w, size_t ldw, int nr, const float *xs,
                                                             int ldx, int mr, int K, float out[NR][MR]) {
    __m512 acc[NR][MR];
    _Pragma("GCC unroll 8") for (int j = 0; j < NR; j++)
        _Pragma("GCC unroll 8") for (int m = 0; m < MR; m++) acc[j][m] = _mm512_setzero_ps();
    const __m512i mask = _mm512_set1_epi32((int)0x87f00000);
    int K64 = K & ~63, k = 0;
    for (; k < K64; k += 64) {
        __m512i d[NR];
        _Pragma("GCC unroll 8") for (int j = 0; j < NR; j++) if (j < nr) {
            _mm_prefetch((const char *)(w + j * ldw + pf_elems(ldw, 1) + k), _MM_HINT_T1);
            d[j] = load_line(w + j * ldw + k);
        }
        _Pragma("GCC unroll 4") for (int i = 0; i < 4; i++) {
            __m512 xv[MR];
            _Pragma("GCC unroll 8") for (int m = 0; m < MR; m++)
                if (m < mr) xv[m] = _mm512_loadu_ps(xs + (size_t)m * ldx + k + 16 * i);
            _Pragma("GCC unroll 8") for (int j = 0; j < NR; j++) {
                if (j >= nr) break;
                __m512i t = i == 3 ? d[j] : _mm512_slli_epi32(d[j], 24 - 8 * i);
                __m512 wv = _mm512_castsi512_ps(_mm512_and_si512(_mm512_srai_epi32(t, 4), mask));
                _Pragma("GCC unroll 8") for (int m = 0; m < MR; m++)
                    if (m < mr) acc[j][m] = _mm512_fmadd_ps(xv[m], wv, acc[j][m]);
            }
        }
    }
    for (; k < K; k += 16) {
        __mmask16 km = K - k >= 16 ? 0xffff : (__mmask16)((1u << (K - k)) - 1);
        __m512 xv[MR];
        _Pragma("GCC unroll 8") for (int m = 0; m < MR; m++)
            if (m < mr) xv[m] = _mm512_maskz_loadu_ps(km, xs + (size_t)m * ldx + k);
        _Pragma("GCC unroll 8") for (int j = 0; j < NR; j++) {
            if (j >= nr) break;
            __m512 wv = cvt_e4m3_mask(w + j * ldw + k, km);
            _Pragma("GCC unroll 8") for (int m = 0; m < MR; m++)
                if (m < mr) acc[j][m] = _mm512_fmadd_ps(xv[m], wv, acc[j][m]);
        }
    }
    _Pragma("GCC unroll 8") for (int j = 0; j < NR; j++)
        _Pragma("GCC unroll 8") for (int m = 0; m < MR; m++)
            if (j < nr && m < mr) out[j][m] = _mm512_reduce_add_ps(acc[j][m]);
}

/* ---- many activation rows (prefill): a packed-panel GEMM ----
 * A panel of PN = 32 weight rows x KC columns is converted once into a
 * float32 block P[k][32] (16 KB, L1-resident; FP8 scales applied while
 * packing), then every group of PM activation rows runs an outer-product
 * micro-kernel over it: two weight vectors per k, one broadcast per row,
 * 2 x PM accumulators in registers. The conversion cost is paid once per
 * panel and spread over all M rows. */
#define PN 32
/* DSI_PANEL_MIN_ROWS (kernels.h): from this many activation rows on,
 * packing pays. Below it the 4x4 tiles (tiles_matmul) ran faster on Zen 4,
 * one core, GFLOP/s tiles vs panel, 2048x2048 in L3: FP8 M = 8 93 vs 65,
 * 16 97 vs 79, 32 94-96 vs 92-93, 48 96 vs 99, 96 96 vs 106; BF16 M = 8 101
 * vs 55, 16 103 vs 74, 32 93-101 vs 83-87. FP8 768x2048 (an expert) M = 8
 * 86 vs 62, 16 87-91 vs 74-83; from memory (64 MB) M = 8 82 vs 60, 16 85 vs
 * 75. At M = 32 the attention and shared-expert shapes ran level (92-98
 * either way), at 40 the panel led by 1-10%. The threshold was 8: batched
 * decode (each token's attention projections and shared experts at M =
 * batch, the routed experts at a few rows each) ran on the panel at its
 * worst. */
#define PM 12
#define KC 128


/* In-register 16x16 transpose: r[i] lane j  ->  r[j] lane i. */
static inline void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
        r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
        r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
        r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
    }
    /* r[4q + c] now holds, in each 128-bit lane L, rows 4L'..: finish with lane shuffles */
    for (int i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
        t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
        r[i + 4] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0x88);
        r[i + 12] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0xdd);
    }
}

/* 16 weight rows x 16 columns starting at (r, k) as float32 vectors (one per
 * row), FP8 scales applied; NULL-safe only for full blocks. */
/* s[i]: the block scale of row r + i at column block kb, times 2^120; one
 * division for all 16 rows unless they straddle a row block (an integer
 * division per row was a measurable part of packing). */
static inline void row_scales16(const dsi_mat *W, int r, int kb, float s[16]) {
    int br = W->block_rows, rb0 = r / br;
    const float *sc = W->scale_inv + kb;
    if ((r + 15) / br == rb0) {
        float v = sc[(size_t)rb0 * W->scale_cols] * TWO_POW_120;
        for (int i = 0; i < 16; i++) s[i] = v;
    } else {
        for (int i = 0; i < 16; i++) s[i] = sc[(size_t)((r + i) / br) * W->scale_cols] * TWO_POW_120;
    }
}

static inline void load_block16(const dsi_mat *W, int r, int k, __m512 v[16]) {
    size_t K = W->cols;
    switch (W->dtype) {
    case DSI_F8_E4M3: {
        float s[16];
        row_scales16(W, r, k / W->block_cols, s);
        for (int i = 0; i < 16; i++)
            v[i] = _mm512_mul_ps(cvt_e4m3((const uint8_t *)W->data + (r + i) * K + k), _mm512_set1_ps(s[i]));
        break;
    }
    case DSI_BF16:
        for (int i = 0; i < 16; i++) v[i] = cvt_bf16((const uint16_t *)W->data + (r + i) * K + k);
        break;
    case DSI_F16:
        for (int i = 0; i < 16; i++) v[i] = cvt_f16((const uint16_t *)W->data + (r + i) * K + k);
        break;
    default:
        for (int i = 0; i < 16; i++) v[i] = _mm512_loadu_ps((const float *)W->data + (r + i) * K + k);
    }
}

/* FP8, 16 rows (r, r + 1, ...) x 64 columns from k into P (the panel at
 * column k, row offset jb applied by the caller): the 16 rows' 64-byte lines
 * are transposed as a 16x16 matrix of dwords, so dword column c holds
 * columns 4c..4c+3 of every row, which the GEMV's 16-bit decode splits into
 * four vectors over the 16 rows: four panel rows. `sv`: each row's block
 * scale times 2^120, the same products as load_block16's (bit-identical
 * panels). Against 16x16 float blocks (a sign-extending load, two ops and a
 * transpose per 16 columns, and three integer divisions per block for the
 * scale, here three per 64 columns): 352 instead of ~576 vector
 * instructions per 1024 weights. */
static inline void pack_fp8_16x64(const uint8_t *w, size_t K, __m512 sv, float *P) {
    __m512 v[16];
    for (int i = 0; i < 16; i++) v[i] = _mm512_castsi512_ps(_mm512_loadu_si512(w + (size_t)i * K));
    transpose16(v);
    const __m512i mask = _mm512_set1_epi32((int)0x87f00000);
#define DEC(x) _mm512_mul_ps(_mm512_castsi512_ps(_mm512_and_si512((x), mask)), sv)
    for (int c = 0; c < 16; c++) {
        __m512i d = _mm512_castps_si512(v[c]);
        __m512i u = _mm512_srai_epi16(d, 4), t = _mm512_srai_epi16(_mm512_slli_epi16(d, 8), 4);
        float *p = P + (size_t)(4 * c) * PN;
        _mm512_store_ps(p, DEC(_mm512_slli_epi32(t, 16)));
        _mm512_store_ps(p + PN, DEC(_mm512_slli_epi32(u, 16)));
        _mm512_store_ps(p + 2 * PN, DEC(t));
        _mm512_store_ps(p + 3 * PN, DEC(u));
    }
#undef DEC
}

/* P[k][j] = W[n+j][k0+k] (scaled), zero for j >= nr. Full 16-row groups go
 * through in-register transposes (FP8 64 columns at a time where the
 * scale blocks allow, else 16x16 float blocks); edges element by element. */
static void pack_panel(const dsi_mat *W, int n, int nr, int k0, int kc, float *P) {
    int fp8_64 = W->dtype == DSI_F8_E4M3 && W->block_cols % 64 == 0 && k0 % 64 == 0;
    for (int jb = 0; jb < PN; jb += 16) {
        int k = 0;
        if (fp8_64 && jb + 16 <= nr) {
            const uint8_t *w = (const uint8_t *)W->data + (size_t)(n + jb) * W->cols;
            for (; k + 64 <= kc; k += 64) {
                float sc[16];
                row_scales16(W, n + jb, (k0 + k) / W->block_cols, sc);
                pack_fp8_16x64(w + k0 + k, (size_t)W->cols, _mm512_loadu_ps(sc), P + (size_t)k * PN + jb);
            }
        }
        /* an FP8 16-column group must not straddle a scale block */
        int aligned = W->dtype != DSI_F8_E4M3 || W->block_cols % 16 == 0;
        if (jb + 16 <= nr && aligned && (k0 + k) % 16 == 0) {
            for (; k + 16 <= kc; k += 16) {
                __m512 v[16];
                load_block16(W, n + jb, k0 + k, v);
                transpose16(v);
                for (int i = 0; i < 16; i++) _mm512_store_ps(P + (size_t)(k + i) * PN + jb, v[i]);
            }
        }
        for (int j = jb; j < jb + 16; j++)
            for (int kk = k; kk < kc; kk++) P[(size_t)kk * PN + j] = j < nr ? dsi_mat_get(W, n + j, k0 + kk) : 0.0f;
    }
}

static inline __attribute__((always_inline)) void panel_kernel(const float *P, int kc, const float *x, int ldx, int mr,
                                                               float *y, int ldy, __mmask16 m0, __mmask16 m1,
                                                               int load_y) {
    __m512 acc[PM][2];
    _Pragma("GCC unroll 12") for (int i = 0; i < PM; i++) {
        if (i < mr && load_y) {
            acc[i][0] = _mm512_maskz_loadu_ps(m0, y + (size_t)i * ldy);
            acc[i][1] = _mm512_maskz_loadu_ps(m1, y + (size_t)i * ldy + 16);
        } else {
            acc[i][0] = acc[i][1] = _mm512_setzero_ps();
        }
    }
    for (int k = 0; k < kc; k++) {
        __m512 p0 = _mm512_load_ps(P + k * PN), p1 = _mm512_load_ps(P + k * PN + 16);
        _Pragma("GCC unroll 12") for (int i = 0; i < PM; i++) {
            if (i >= mr) break;
            __m512 xb = _mm512_set1_ps(x[(size_t)i * ldx + k]);
            acc[i][0] = _mm512_fmadd_ps(xb, p0, acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(xb, p1, acc[i][1]);
        }
    }
    _Pragma("GCC unroll 12") for (int i = 0; i < PM; i++) {
        if (i >= mr) break;
        _mm512_mask_storeu_ps(y + (size_t)i * ldy, m0, acc[i][0]);
        _mm512_mask_storeu_ps(y + (size_t)i * ldy + 16, m1, acc[i][1]);
    }
}

/* Weight rows in groups of DSI_PANEL_GROUP; per group, k-block by k-block,
 * the activation block (dsi__panel_x) serves every panel of the group, and
 * the group's sums (M x 128 floats) stay in L2 across k-blocks, in a
 * per-thread buffer with rows 144 floats apart; y gets them once per group.
 * (Summing in y itself, whose rows are mostly a multiple of 2 KB apart,
 * put every micro-kernel's 12 rows in the same L1 sets and made its loads
 * wait on 4K-aliased stores of the rows before: 13% of the samples of an
 * M = 512, 2048 x 2048 product sat on those loads and stores. With the
 * buffer it ran 83-91 -> 99-103 GFLOP/s; 2048 x 768 at M = 24-512 +6-8%,
 * 768 x 2048 at M = 48 +3-5%; 512-token prefill +2-4% on one and two
 * threads, alternating builds.)
 * Against panel by panel over all k-blocks reading x in place (Zen 4, one
 * core, interleaved): M = 48, N = 768, K = 2048 (a routed expert's gate in
 * a 512-token prefill of `small`) 68 -> 78 GFLOP/s mean, 70 -> 85 best;
 * M = 96 55 -> 85 best; K = 768 and M = 512 unchanged. 512-token prefill:
 * +3-6% on one thread, +5-14% on two. The AVX2 kernels (PM = 6) measured
 * mixed on this Zen 4 (K = 8192 +15%, M = 512 at K = 2048 -8%) and keep
 * the old order. */
#define SLD (DSI_PANEL_GROUP + 16) /* floats per row of a group's sums: not a multiple of 1 KB */
static void panel_matmul(const dsi_mat *W, const float *x, int M, int ldx, float *y, int ldy, int y_col0, int n0,
                         int n1, int accumulate) {
    int K = W->cols;
    float *P = dsi__tls_buffer(DSI_TLS_PANEL, sizeof(float) * KC * PN);
    float *S = dsi__tls_buffer(DSI_TLS_SUMS, sizeof(float) * SLD * (size_t)M);
    if (!P || !S) return;
    for (int g0 = n0; g0 < n1; g0 += DSI_PANEL_GROUP) {
        int g1 = DSI_MIN(n1, g0 + DSI_PANEL_GROUP);
        for (int k0 = 0; k0 < K; k0 += KC) {
            int kc = DSI_MIN(KC, K - k0), ldb, load_y = k0 > 0;
            const float *xb = dsi__panel_x(x, M, ldx, k0, kc, &ldb);
            if (!xb) return;
            for (int n = g0; n < g1; n += PN) {
                int nr = DSI_MIN(PN, g1 - n);
                __mmask16 m0 = nr >= 16 ? 0xffff : (__mmask16)((1u << nr) - 1);
                __mmask16 m1 = nr >= 32 ? 0xffff : nr <= 16 ? 0 : (__mmask16)((1u << (nr - 16)) - 1);
                pack_panel(W, n, nr, k0, kc, P);
                /* the next pack: the group's next panel, else its first one at the next k-block */
                if (n + PN < g1) dsi__prefetch_panel(W, n + PN, n1, k0, PN, KC);
                else dsi__prefetch_panel(W, k0 + KC < K ? g0 : g1, n1, k0 + KC < K ? k0 + KC : 0, PN, KC);
                /* rows in equal runs of at most PM: a short last run
                 * (M = 50: 12, 12, 12, 12, 2) keeps too few accumulators
                 * and loads a panel line per two FMAs; 5 x 10 ran
                 * 99.9 -> 101.7 GFLOP/s (768 x 2048, one core, same
                 * process; M = 13: 76.1 -> 80.7, M = 30-55: +0.6-1.8%) */
                int step = DSI_CEIL_DIV(M, DSI_CEIL_DIV(M, PM));
                for (int m = 0; m < M; m += step) {
                    int mr = DSI_MIN(step, M - m);
                    const float *xm = xb + (size_t)m * ldb;
                    float *sm = S + (size_t)m * SLD + (n - g0);
                    if (mr == PM) panel_kernel(P, kc, xm, ldb, PM, sm, SLD, m0, m1, load_y);
                    else panel_kernel(P, kc, xm, ldb, mr, sm, SLD, m0, m1, load_y);
                }
            }
        }
        for (int m = 0; m < M; m++) {
            const float *sm = S + (size_t)m * SLD;
            float *ym = y + (size_t)m * ldy + (g0 - y_col0);
            for (int c = 0; c < g1 - g0; c += 16) {
                __mmask16 km = g1 - g0 - c >= 16 ? 0xffff : (__mmask16)((1u << (g1 - g0 - c)) - 1);
                __m512 v = _mm512_maskz_loadu_ps(km, sm + c);
                if (accumulate) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(km, ym + c));
                _mm512_mask_storeu_ps(ym + c, km, v);
            }
        }
    }
}

/* e4m3 -> bf16 by table: two 128-entry byte tables (vpermi2b over two
 * vectors each) give the low and high byte of the exact bf16 value of an
 * e4m3 code's 7 low bits; the sign bit is merged into the high byte. Used by
 * the FP8 x FP8 panels. */
static __m512i g_tab_lo0, g_tab_lo1, g_tab_hi0, g_tab_hi1;
static pthread_once_t g_tab_once = PTHREAD_ONCE_INIT;

static void make_tables(void) {
    uint8_t lo[128], hi[128];
    for (int em = 0; em < 128; em++) {
        uint16_t b = dsi_f32_to_bf16(dsi_e4m3_to_f32((uint8_t)em)); /* exact; NaN code unused */
        lo[em] = (uint8_t)(b & 0xff);
        hi[em] = (uint8_t)((b >> 8) & 0x7f);
    }
    g_tab_lo0 = _mm512_loadu_si512(lo);
    g_tab_lo1 = _mm512_loadu_si512(lo + 64);
    g_tab_hi0 = _mm512_loadu_si512(hi);
    g_tab_hi1 = _mm512_loadu_si512(hi + 64);
}

/* ---- FP8 x FP8 (quantised activations) with AVX512_BF16 ----
 * e4m3 values are exact in bf16 and a bf16 x bf16 product is exact in
 * float32, so vdpbf16ps computes the 128-column tile sums of an FP8 GEMM
 * exactly up to float32 summation, 32 multiply-adds per instruction (twice
 * the float32 FMA rate). Panels: 32 weight rows x 64 column pairs of bf16,
 * packed through a 16x16 transpose of 32-bit pairs; the micro-kernel
 * broadcasts one activation pair per row. Scales are applied per tile. */
#define Q8_PM 12


static void pack_q8_panel(const dsi_mat *W, int n, int nr, int k0, uint32_t *P) {
    size_t K = W->cols;
    int kc = DSI_MIN(128, (int)K - k0);
    for (int jb = 0; jb < 32; jb += 16) {
        for (int pb = 0; pb < 64; pb += 16) { /* 16 rows x 16 pairs (32 columns) */
            __m512 v[16];
            for (int i = 0; i < 16; i++) {
                int r = n + jb + i, c = k0 + 2 * pb;
                if (jb + i >= nr || c >= k0 + kc) { v[i] = _mm512_setzero_ps(); continue; }
                int left = k0 + kc - c; /* columns of this row still in the tile */
                const uint8_t *src = (const uint8_t *)W->data + r * K + c;
                __mmask16 m0 = left >= 16 ? 0xffff : (__mmask16)((1u << left) - 1);
                __mmask16 m1 = left >= 32 ? 0xffff : left <= 16 ? 0 : (__mmask16)((1u << (left - 16)) - 1);
                __m512 lo = _mm512_mul_ps(cvt_e4m3_mask(src, m0), _mm512_set1_ps(TWO_POW_120));
                __m512 hi = _mm512_mul_ps(cvt_e4m3_mask(src + 16, m1), _mm512_set1_ps(TWO_POW_120));
                v[i] = _mm512_castsi512_ps((__m512i)_mm512_cvtne2ps_pbh(hi, lo));
            }
            transpose16(v);
            for (int p = 0; p < 16; p++) _mm512_store_ps((float *)(P + (size_t)(pb + p) * 32 + jb), v[p]);
        }
    }
}

/* A full tile, 32 rows x 128 columns from w (row stride K), through the
 * e4m3 -> bf16 tables: per 16 rows and 64 columns, 16 line loads, the table
 * lookups and byte unpacks, and two 16x16 transposes of 32-bit pairs; the
 * unpacks leave pairs permuted within 128-bit lanes, undone by where each
 * transposed vector is stored. The same bits as pack_q8_panel (which
 * converts through float32 and rounds to bf16, exactly) in about half the
 * instructions. */
static void pack_q8_full(const uint8_t *w, size_t K, uint32_t *P) {
    const __m512i sign = _mm512_set1_epi32((int)0x80808080);
    const __m512i tl0 = g_tab_lo0, tl1 = g_tab_lo1, th0 = g_tab_hi0, th1 = g_tab_hi1;
    for (int jb = 0; jb < 32; jb += 16)
        for (int c = 0; c < 128; c += 64) {
            __m512 a[16], b[16];
            for (int i = 0; i < 16; i++) {
                __m512i d = _mm512_loadu_si512(w + (size_t)(jb + i) * K + c);
                __m512i lo = _mm512_permutex2var_epi8(tl0, d, tl1);
                __m512i hi = _mm512_ternarylogic_epi32(_mm512_permutex2var_epi8(th0, d, th1), d, sign, 0xF8);
                a[i] = _mm512_castsi512_ps(_mm512_unpacklo_epi8(lo, hi)); /* columns 16L + 0..7 of lane L */
                b[i] = _mm512_castsi512_ps(_mm512_unpackhi_epi8(lo, hi)); /* columns 16L + 8..15 */
            }
            transpose16(a);
            transpose16(b);
            /* a[i]: every row's 32-bit word i, the pair 8 (i / 4) + i % 4 of
             * these 64 columns; b[i]: that pair + 4 */
            uint32_t *Pc = P + (size_t)(c / 2) * 32 + jb;
            for (int i = 0; i < 16; i++) {
                _mm512_store_ps((float *)(Pc + (size_t)(8 * (i / 4) + i % 4) * 32), a[i]);
                _mm512_store_ps((float *)(Pc + (size_t)(8 * (i / 4) + 4 + i % 4) * 32), b[i]);
            }
        }
}

/* mr (<= Q8_PM) activation rows against one packed tile; the tile's sums,
 * scaled by each row's activation scale times the weight rows' block
 * scales (ws0, ws1), are stored to S (first tile) or added to it; S: rows of
 * 32 floats. */
static inline __attribute__((always_inline)) void q8_kernel(const uint32_t *P, const uint16_t *xt, int ldq, int mr,
                                                            const float *xs, int lds, __m512 ws0, __m512 ws1,
                                                            float *S, int first) {
    __m512 acc[Q8_PM][2];
    _Pragma("GCC unroll 12") for (int i = 0; i < Q8_PM; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (int p = 0; p < 64; p++) {
        __m512bh w0 = (__m512bh)_mm512_load_si512((const void *)(P + p * 32));
        __m512bh w1 = (__m512bh)_mm512_load_si512((const void *)(P + p * 32 + 16));
        _Pragma("GCC unroll 12") for (int i = 0; i < Q8_PM; i++) {
            if (i >= mr) break;
            uint32_t pair;
            memcpy(&pair, xt + (size_t)i * ldq + 2 * p, 4);
            __m512bh xb = (__m512bh)_mm512_set1_epi32((int)pair);
            acc[i][0] = _mm512_dpbf16_ps(acc[i][0], xb, w0);
            acc[i][1] = _mm512_dpbf16_ps(acc[i][1], xb, w1);
        }
    }
    _Pragma("GCC unroll 12") for (int i = 0; i < Q8_PM; i++) {
        if (i >= mr) break;
        __m512 sx = _mm512_set1_ps(xs[(size_t)i * lds]);
        __m512 o0 = _mm512_mul_ps(acc[i][0], _mm512_mul_ps(sx, ws0));
        __m512 o1 = _mm512_mul_ps(acc[i][1], _mm512_mul_ps(sx, ws1));
        if (!first) {
            o0 = _mm512_add_ps(o0, _mm512_load_ps(S + i * 32));
            o1 = _mm512_add_ps(o1, _mm512_load_ps(S + i * 32 + 16));
        }
        _mm512_store_ps(S + i * 32, o0);
        _mm512_store_ps(S + i * 32 + 16, o1);
    }
}

/* Per 32 weight rows, tile by tile: pack the tile (full tiles by table,
 * edges through float32), prefetch the next tile's weights into L2, run
 * every activation row against it, summing the tiles in a per-thread buffer
 * of M x 32 floats (contiguous: the sums went to y rows ldy apart, at a
 * 2 KB multiple the same few L1 sets for every row, ~12% of the kernel);
 * y is written once per 32 rows. The activation rows xq are best not a
 * multiple of 2 KB apart (the engine pads ldq). */
static void avx512_matmul_q8(const dsi_mat *W, const uint16_t *xq, int ldq, const float *xs, int lds, int M, float *y,
                             int ldy, int y_col0, int n0, int n1, int accumulate) {
    int K = W->cols, nt = DSI_CEIL_DIV(K, 128);
    uint32_t *P = dsi__tls_buffer(DSI_TLS_Q8PANEL, sizeof(uint32_t) * 64 * 32); /* [64 pairs][32 rows] */
    float *S = dsi__tls_buffer(DSI_TLS_SUMS, sizeof(float) * 32 * (size_t)M);
    if (!P || !S) return;
    pthread_once(&g_tab_once, make_tables);
    const uint8_t *wd = W->data;
    for (int n = n0; n < n1; n += 32) {
        int nr = DSI_MIN(32, n1 - n);
        __mmask16 m0 = nr >= 16 ? 0xffff : (__mmask16)((1u << nr) - 1);
        __mmask16 m1 = nr >= 32 ? 0xffff : nr <= 16 ? 0 : (__mmask16)((1u << (nr - 16)) - 1);
        for (int t = 0; t < nt; t++) {
            if (nr == 32 && t * 128 + 128 <= K) pack_q8_full(wd + (size_t)n * K + t * 128, (size_t)K, P);
            else pack_q8_panel(W, n, nr, t * 128, P);
            dsi__prefetch_panel(W, n, n1, t * 128 + 128, 32, 128); /* the next tile, or the next rows' first */
            float wsc[32];
            for (int j = 0; j < 32; j++)
                wsc[j] = j < nr ? W->scale_inv[(size_t)((n + j) / W->block_rows) * W->scale_cols + t] : 0.0f;
            __m512 ws0 = _mm512_loadu_ps(wsc), ws1 = _mm512_loadu_ps(wsc + 16);
            for (int m = 0; m < M; m += Q8_PM) {
                int mr = DSI_MIN(Q8_PM, M - m);
                const uint16_t *xt = xq + (size_t)m * ldq + t * 128;
                const float *xst = xs + (size_t)m * lds + t;
                if (mr == Q8_PM) q8_kernel(P, xt, ldq, Q8_PM, xst, lds, ws0, ws1, S + (size_t)m * 32, t == 0);
                else q8_kernel(P, xt, ldq, mr, xst, lds, ws0, ws1, S + (size_t)m * 32, t == 0);
            }
        }
        for (int m = 0; m < M; m++) {
            float *yr = y + (size_t)m * ldy + (n - y_col0);
            __m512 o0 = _mm512_load_ps(S + (size_t)m * 32), o1 = _mm512_load_ps(S + (size_t)m * 32 + 16);
            if (accumulate) {
                o0 = _mm512_add_ps(o0, _mm512_maskz_loadu_ps(m0, yr));
                o1 = _mm512_add_ps(o1, _mm512_maskz_loadu_ps(m1, yr + 16));
            }
            _mm512_mask_storeu_ps(yr, m0, o0);
            _mm512_mask_storeu_ps(yr + 16, m1, o1);
        }
    }
}

/* BF16 weights, one activation row, float32 products. A 64-byte load holds
 * 32 bf16: the even ones become float32 by a 16-bit left shift, the odd ones
 * by masking the low half, against a copy of x split into even and odd
 * columns per 32. One row at a time like gemv1_e4m3_body, K a multiple of
 * 64 (this is the LM head: 18% of a small model's bytes per token).
 * Each BF16_TOUCH bytes of the row are first touched by a one-load loop (the
 * loaded lines are dropped), then decoded by loads that find them in L1. No
 * software prefetch: the hardware's, fed by the touch loop's run of
 * misses, keeps ahead. On Zen 4, a 32000 x 2048 matrix from memory against
 * a plain read of the same size alternating with it (test harness, 1 and 2
 * threads each streaming half, 8 pairs per run): touching 512 bytes without
 * prefetch streamed 0.89-0.96 of the read; the form before (256 bytes, and a
 * far prefetch per line) 0.64-0.91, lower in every run; 128-byte touches
 * 0.89, 1-4 KB 0.76-0.92; loading each line where it is used, 0.67 with a
 * far prefetch per line and 0.61-0.81 without. In the engine (one process
 * alternating the two forms per 16 tokens) the LM head went 26.0 -> 28.6
 * GB/s on one thread and 40.8 -> 44.7 on two. (For FP8 weights the software
 * prefetch is what keeps the stream going: without it, 0.3-0.55 of the read;
 * their decode does three times the work per byte.) */
#define BF16_TOUCH 512
static __attribute__((noinline)) float gemv1_bf16(const uint16_t *w, size_t K, const float *xp) {
    const __m512i hi = _mm512_set1_epi32((int)0xffff0000);
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
    for (size_t k = 0; k < K; k += BF16_TOUCH / 2) {
        size_t n = DSI_MIN((size_t)BF16_TOUCH / 2, K - k); /* a multiple of 64 */
        _Pragma("GCC unroll 1") for (size_t l = 0; l < n; l += 32) {
            __m512i t = load_line(w + k + l);
            __asm__ volatile("" ::"v"(t)); /* kept: the load is the point */
        }
        for (size_t l = 0; l < n; l += 64) {
            __m512i d0 = _mm512_loadu_si512(w + k + l), d1 = _mm512_loadu_si512(w + k + l + 32);
            const float *xk = xp + k + l;
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(xk), _mm512_castsi512_ps(_mm512_slli_epi32(d0, 16)), a0);
            a1 = _mm512_fmadd_ps(_mm512_loadu_ps(xk + 16), _mm512_castsi512_ps(_mm512_and_si512(d0, hi)), a1);
            b0 = _mm512_fmadd_ps(_mm512_loadu_ps(xk + 32), _mm512_castsi512_ps(_mm512_slli_epi32(d1, 16)), b0);
            b1 = _mm512_fmadd_ps(_mm512_loadu_ps(xk + 48), _mm512_castsi512_ps(_mm512_and_si512(d1, hi)), b1);
        }
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(b0, b1)));
}

/* M = 1, BF16 weights, K a multiple of 64: row by row through gemv1_bf16. */
static void gemv_bf16f32_path(const dsi_mat *W, const float *x, float *y, int y_col0, int n0, int n1, int accumulate) {
    int K = W->cols;
    prefetch_start((const uint16_t *)W->data + (size_t)n0 * K, (size_t)(n1 - n0) * K * 2);
    float *xp = dsi__tls_buffer(DSI_TLS_XS, sizeof(float) * (size_t)K);
    if (!xp) return;
    /* per 32 columns: the 16 even ones, then the 16 odd ones */
    const __m512i ev = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i od = _mm512_add_epi32(ev, _mm512_set1_epi32(1));
    for (int k = 0; k < K; k += 32) {
        __m512 a = _mm512_loadu_ps(x + k), b = _mm512_loadu_ps(x + k + 16);
        _mm512_storeu_ps(xp + k, _mm512_permutex2var_ps(a, ev, b));
        _mm512_storeu_ps(xp + k + 16, _mm512_permutex2var_ps(a, od, b));
    }
    const uint16_t *base = W->data;
    for (int n = n0; n < n1; n++) {
        float v = gemv1_bf16(base + (size_t)n * K, (size_t)K, xp), *d = &y[n - y_col0];
        *d = accumulate ? *d + v : v;
    }
}

/* Micro-tiles over any M. `rowwise`: a lone last row takes the 1-row
 * micro-tile (the same sums as in a 4-row tile) instead of the GEMV. */
static void tiles_matmul(const dsi_mat *W, const float *x, int M, int ldx, float *y, int ldy, int y_col0, int n0,
                         int n1, int accumulate, int rowwise) {
    int K = W->cols;
    float out[NR][MR] = {{0}};
    if (W->dtype == DSI_F8_E4M3) {
        float *xs = xs_buffer((size_t)MR * K);
        if (!xs) return;
        for (int nb = n0; nb < n1; nb += NB) {
            int nb_end = DSI_MIN(n1, nb + NB);
            for (int m = 0; m < M; m += MR) {
                int mr = DSI_MIN(MR, M - m);
                int cur_rb = -1;
                for (int n = nb; n < nb_end; n += NR) {
                    int nr = DSI_MIN(NR, nb_end - n);
                    /* a tile must not straddle a scale row-block */
                    int rb = n / W->block_rows, rb_end = (n + nr - 1) / W->block_rows;
                    if (rb_end != rb) nr = (rb + 1) * W->block_rows - n;
                    if (rb != cur_rb) { scale_rows(W, rb, x + (size_t)m * ldx, ldx, mr, xs); cur_rb = rb; }
                    const uint8_t *w = (const uint8_t *)W->data + (size_t)n * K;
                    switch (mr) {
                    case 4: micro_e4m3(w, K, nr, xs, K, 4, K, out); break;
                    case 3: micro_e4m3(w, K, nr, xs, K, 3, K, out); break;
                    case 2: micro_e4m3(w, K, nr, xs, K, 2, K, out); break;
                    default:
                        if (rowwise) micro_e4m3(w, K, nr, xs, K, 1, K, out);
                        else if (K % 64 == 0) { /* the same sums as an M = 1 GEMV */
                            const uint8_t *last = (const uint8_t *)W->data + (size_t)n1 * K - 64;
                            float o1[NR];
                            gemv_rows(w, K, nr, xs, last, o1);
                            for (int j = 0; j < nr; j++) out[j][0] = o1[j];
                        } else gemv_e4m3(w, K, nr, xs, K, out);
                        break;
                    }
                    store_tile(out, nr, mr, y + (size_t)m * ldy, ldy, n - y_col0, accumulate);
                    if (nr < NR && n + nr < nb_end) n -= NR - nr; /* resume right after a straddle split */
                }
            }
        }
        return;
    }
    for (int nb = n0; nb < n1; nb += NB) {
        int nb_end = DSI_MIN(n1, nb + NB);
        for (int m = 0; m < M; m += MR) {
            int mr = DSI_MIN(MR, M - m);
            const float *xm = x + (size_t)m * ldx;
            for (int n = nb; n < nb_end; n += NR) {
                int nr = DSI_MIN(NR, nb_end - n);
#define DISPATCH(FN, T)                                                                        \
    {                                                                                          \
        const T *w = (const T *)W->data + (size_t)n * K;                                       \
        switch (mr) {                                                                          \
        case 4: FN(w, K, nr, xm, ldx, 4, K, out); break;                                       \
        case 3: FN(w, K, nr, xm, ldx, 3, K, out); break;                                       \
        case 2: FN(w, K, nr, xm, ldx, 2, K, out); break;                                       \
        default: FN(w, K, nr, xm, ldx, 1, K, out); break;                                      \
        }                                                                                      \
    }
                if (W->dtype == DSI_BF16) DISPATCH(micro_bf16, uint16_t)
                else if (W->dtype == DSI_F16) DISPATCH(micro_f16, uint16_t)
                else DISPATCH(micro_f32, float)
#undef DISPATCH
                store_tile(out, nr, mr, y + (size_t)m * ldy, ldy, n - y_col0, accumulate);
            }
        }
    }
}

/* M = 1, FP8, K a multiple of 64: the activation row permuted once, scaled
 * once per scale row-block (one multiply per element, the same product as
 * scale_rows), then the block's rows one by one through gemv1_e4m3_body. The
 * general tile loop re-permuted the row every 64 rows and went through the
 * tile bookkeeping per tile: ~8% of decode GEMV time. */
static void gemv_e4m3_path(const dsi_mat *W, const float *x, float *y, int y_col0, int n0, int n1, int accumulate) {
    int K = W->cols, br = W->block_rows, bc = W->block_cols;
    float *xs = xs_buffer((size_t)MR * K);
    if (!xs) return;
    dsi__prefetch_scales(W, n0, n1);
    prefetch_start((const uint8_t *)W->data + (size_t)n0 * K, (size_t)(n1 - n0) * K);
    float *xp = xs + K; /* x permuted once; each row-block only rescales it */
    int fast = bc % 64 == 0;
    if (fast)
        for (int k = 0; k < K; k += 64)
            for (int i = 0; i < 4; i++) _mm512_storeu_ps(xp + k + 16 * i, lanes_4l_plus(x + k, i));
    const uint8_t *base = W->data, *last = base + (size_t)n1 * K - 64;
    for (int n = n0; n < n1;) {
        int rb = n / br, end = DSI_MIN(n1, (rb + 1) * br);
        if (fast) { /* the same product as scale_rows: x times (scale x 2^120) */
            /* by column block: no division per 64 columns */
            const float *sr = W->scale_inv + (size_t)rb * W->scale_cols;
            for (int k0 = 0, cb = 0; k0 < K; k0 += bc, cb++) {
                __m512 sv = _mm512_set1_ps(sr[cb] * TWO_POW_120);
                for (int k = k0; k < DSI_MIN(K, k0 + bc); k += 16)
                    _mm512_storeu_ps(xs + k, _mm512_mul_ps(_mm512_loadu_ps(xp + k), sv));
            }
        } else {
            scale_rows(W, rb, x, K, 1, xs);
        }
        while (n < end) {
            float out[DSI_SEG_ROWS];
            int g = DSI_MIN(DSI_SEG_ROWS, end - n);
            gemv_rows(base + (size_t)n * K, K, g, xs, last, out);
            for (int r = 0; r < g; r++, n++) {
                float *d = &y[n - y_col0];
                *d = accumulate ? *d + out[r] : out[r];
            }
        }
    }
}

static void avx512_matmul(const dsi_mat *W, const float *x, int M, int ldx, float *y, int ldy, int y_col0, int n0,
                          int n1, int accumulate) {
    if (M >= DSI_PANEL_MIN_ROWS) {
        panel_matmul(W, x, M, ldx, y, ldy, y_col0, n0, n1, accumulate);
        return;
    }
    int K = W->cols;
    if (W->dtype == DSI_BF16 && M == 1 && K % 64 == 0) {
        gemv_bf16f32_path(W, x, y, y_col0, n0, n1, accumulate);
        return;
    }
    if (W->dtype == DSI_F8_E4M3 && M == 1 && K % 64 == 0) {
        gemv_e4m3_path(W, x, y, y_col0, n0, n1, accumulate);
        return;
    }
    tiles_matmul(W, x, M, ldx, y, ldy, y_col0, n0, n1, accumulate, 0);
}

static void avx512_matmul_rowwise(const dsi_mat *W, const float *x, int M, int ldx, float *y, int ldy, int y_col0,
                                  int n0, int n1, int accumulate) {
    tiles_matmul(W, x, M, ldx, y, ldy, y_col0, n0, n1, accumulate, 1);
}

/* y[m][c] = sum_r x[m][r-r0] W[r][c]: row-by-row axpy into up to 8 vector
 * accumulators per column chunk. Chunks end on scale-block boundaries so the
 * FP8 scale is one scalar per row per chunk; dtype and scale lookups are
 * hoisted out of the vector loop. */
#define MT_ROWS(LOADW, SCALE_EXPR)                                                            \
    for (int r = r0; r < r1; r++) {                                                           \
        __m512 av = _mm512_set1_ps(xm[r - r0] * (SCALE_EXPR));                                \
        _Pragma("GCC unroll 8") for (int v = 0; v < 8; v++) {                                 \
            if (v >= nv) break;                                                               \
            __mmask16 km = v == nv - 1 ? last : 0xffff;                                       \
            acc[v] = _mm512_fmadd_ps(av, LOADW, acc[v]);                                      \
        }                                                                                     \
    }

/* FP8 transposed product for 64-aligned column ranges: per row, 64-byte
 * loads decoded by in-dword shifts (sub-vector i, lane l = column 4l+i), 256
 * columns (16 accumulators) per pass, columns put back in order at the end. */
static void matmul_t_e4m3_64(const dsi_mat *W, int r0, int r1, const float *xm, float *ym, int c0, int c1) {
    size_t K = W->cols;
    const __m512i mask = _mm512_set1_epi32((int)0x87f00000);
    for (int cc = c0; cc < c1; cc += 256) {
        int ng = DSI_MIN(4, (c1 - cc) / 64); /* 64-column groups in this pass */
        __m512 acc[4][4];
        _Pragma("GCC unroll 4") for (int g = 0; g < 4; g++)
            _Pragma("GCC unroll 4") for (int i = 0; i < 4; i++) acc[g][i] = _mm512_setzero_ps();
        /* the groups' scale columns and the row's scale row, without a
         * division per row (two idivs per 64 bytes: 30 -> 44 GB/s in cache) */
        int sc[4];
        for (int g = 0; g < 4; g++) sc[g] = (cc + 64 * g) / W->block_cols;
        int rb = r0 / W->block_rows, rb_end = (rb + 1) * W->block_rows;
        const float *srow = W->scale_inv + (size_t)rb * W->scale_cols;
        for (int r = r0; r < r1; r++) {
            const uint8_t *row = (const uint8_t *)W->data + r * K + cc;
            /* the first pass fetches the whole column range of a row 32 rows
             * ahead (later passes find it in L2): a strided row walk left to
             * the hardware prefetcher streamed ~10 GB/s. Into L2, as the
             * GEMV's far prefetch: with this and gemv1_e4m3_body's decode below,
             * W_UK's absorption (16 heads x 128 rows x 512 columns of one
             * layer) took 74 instead of 120 us from memory, 40 instead of
             * 52 from cache (Zen 4). */
            if (cc == c0 && r + 32 < r1)
                for (int c = c0; c < c1; c += 64) _mm_prefetch((const char *)W->data + (size_t)(r + 32) * K + c, _MM_HINT_T1);
            if (r == rb_end) srow += W->scale_cols, rb_end += W->block_rows;
            float a = xm[r - r0] * TWO_POW_120;
            _Pragma("GCC unroll 4") for (int g = 0; g < 4; g++) {
                if (g >= ng) break;
                __m512 av = _mm512_set1_ps(a * srow[sc[g]]);
                __m512i d = load_line(row + 64 * g);
                /* gemv1_e4m3_body's decode: sub-vector i holds byte i of each dword */
                __m512i u = _mm512_srai_epi16(d, 4), t = _mm512_srai_epi16(_mm512_slli_epi16(d, 8), 4);
#define DEC(v) _mm512_castsi512_ps(_mm512_and_si512((v), mask))
                acc[g][0] = _mm512_fmadd_ps(av, DEC(_mm512_slli_epi32(t, 16)), acc[g][0]);
                acc[g][1] = _mm512_fmadd_ps(av, DEC(_mm512_slli_epi32(u, 16)), acc[g][1]);
                acc[g][2] = _mm512_fmadd_ps(av, DEC(t), acc[g][2]);
                acc[g][3] = _mm512_fmadd_ps(av, DEC(u), acc[g][3]);
#undef DEC
            }
        }
        for (int g = 0; g < ng; g++) {
            float tmp[64];
            for (int i = 0; i < 4; i++) _mm512_storeu_ps(tmp + 16 * i, acc[g][i]);
            float *o = ym + (cc - c0) + 64 * g;
            for (int l = 0; l < 16; l++)
                for (int i = 0; i < 4; i++) o[4 * l + i] = tmp[16 * i + l];
        }
    }
}

/* The same product over at most 512 columns (W_UK's kv_lora_rank) in one
 * pass over whole rows: the first 256 columns in 16 register accumulators,
 * the rest in accumulators kept in L1 (load, FMA, store per 64 bytes of
 * weights; a row's decode leaves time for the round trip). The rows stream
 * in address order with a far prefetch 8 KB ahead, so memory is busy for
 * the whole call; in matmul_t_e4m3_64's two passes the second read the
 * rows' other halves from L2 with memory idle. The sums are added in the
 * same order as there, so the results are identical. W_UK of one layer
 * (16 heads x 128 rows x 512 columns, synthetic, from memory): 76-78 ->
 * 50 us; from cache 37-38 us either way (a prefetch 4 or 16 KB ahead: 53
 * and 55 us; Zen 4, one core). */
#define MT_ROW_GROUPS 8
static void matmul_t_e4m3_row(const dsi_mat *W, int r0, int r1, const float *xm, float *ym, int c0, int c1) {
    size_t K = W->cols;
    const __m512i mask = _mm512_set1_epi32((int)0x87f00000);
    int ng = (c1 - c0) / 64; /* 64-column groups: 0-3 in registers, 4-7 in L1 */
    __m512 acc[4][4];
    __attribute__((aligned(64))) float macc[MT_ROW_GROUPS - 4][4][16];
    memset(macc, 0, sizeof macc);
    _Pragma("GCC unroll 4") for (int g = 0; g < 4; g++)
        _Pragma("GCC unroll 4") for (int i = 0; i < 4; i++) acc[g][i] = _mm512_setzero_ps();
    int sc[MT_ROW_GROUPS];
    for (int g = 0; g < ng; g++) sc[g] = (c0 + 64 * g) / W->block_cols;
    int rb = r0 / W->block_rows, rb_end = (rb + 1) * W->block_rows;
    const float *srow = W->scale_inv + (size_t)rb * W->scale_cols;
    const char *pf_last = (const char *)W->data + (size_t)(r1 - 1) * K + c1 - 64;
    for (int r = r0; r < r1; r++) {
        const uint8_t *row = (const uint8_t *)W->data + r * K + c0;
        if (r == rb_end) srow += W->scale_cols, rb_end += W->block_rows;
        float a = xm[r - r0] * TWO_POW_120;
#define DEC(v) _mm512_castsi512_ps(_mm512_and_si512((v), mask))
        _Pragma("GCC unroll 8") for (int g = 0; g < MT_ROW_GROUPS; g++) {
            if (g >= ng) break;
            const char *pf = (const char *)row + 64 * g + 8192;
            _mm_prefetch(pf < pf_last ? pf : pf_last, _MM_HINT_T1);
            __m512 av = _mm512_set1_ps(a * srow[sc[g]]);
            __m512i d = load_line(row + 64 * g);
            /* gemv1_e4m3_body's decode: sub-vector i holds byte i of each dword */
            __m512i u = _mm512_srai_epi16(d, 4), t = _mm512_srai_epi16(_mm512_slli_epi16(d, 8), 4);
            if (g < 4) {
                acc[g][0] = _mm512_fmadd_ps(av, DEC(_mm512_slli_epi32(t, 16)), acc[g][0]);
                acc[g][1] = _mm512_fmadd_ps(av, DEC(_mm512_slli_epi32(u, 16)), acc[g][1]);
                acc[g][2] = _mm512_fmadd_ps(av, DEC(t), acc[g][2]);
                acc[g][3] = _mm512_fmadd_ps(av, DEC(u), acc[g][3]);
            } else {
                float (*m)[16] = macc[g - 4];
                _mm512_store_ps(m[0], _mm512_fmadd_ps(av, DEC(_mm512_slli_epi32(t, 16)), _mm512_load_ps(m[0])));
                _mm512_store_ps(m[1], _mm512_fmadd_ps(av, DEC(_mm512_slli_epi32(u, 16)), _mm512_load_ps(m[1])));
                _mm512_store_ps(m[2], _mm512_fmadd_ps(av, DEC(t), _mm512_load_ps(m[2])));
                _mm512_store_ps(m[3], _mm512_fmadd_ps(av, DEC(u), _mm512_load_ps(m[3])));
            }
        }
#undef DEC
    }
    for (int g = 0; g < ng; g++) { /* columns back in order */
        float tmp[64];
        for (int i = 0; i < 4; i++) {
            if (g < 4) _mm512_storeu_ps(tmp + 16 * i, acc[g][i]);
            else memcpy(tmp + 16 * i, macc[g - 4][i], sizeof(float) * 16);
        }
        float *o = ym + 64 * g;
        for (int l = 0; l < 16; l++)
            for (int i = 0; i < 4; i++) o[4 * l + i] = tmp[16 * i + l];
    }
}

static void avx512_matmul_t(const dsi_mat *W, int r0, int r1, const float *x, int M, int ldx, float *y, int ldy,
                            int c0, int c1) {
    if (W->dtype == DSI_F8_E4M3 && c0 % 64 == 0 && (c1 - c0) % 64 == 0 && W->block_cols % 64 == 0) {
        for (int m = 0; m < M; m++)
            if (c1 - c0 <= 64 * MT_ROW_GROUPS) matmul_t_e4m3_row(W, r0, r1, x + (size_t)m * ldx, y + (size_t)m * ldy, c0, c1);
            else matmul_t_e4m3_64(W, r0, r1, x + (size_t)m * ldx, y + (size_t)m * ldy, c0, c1);
        return;
    }
    size_t K = W->cols;
    int cb = W->dtype == DSI_F8_E4M3 ? W->block_cols : 128;
    for (int m = 0; m < M; m++) {
        const float *xm = x + (size_t)m * ldx;
        float *ym = y + (size_t)m * ldy;
        for (int cc = c0, ce; cc < c1; cc = ce) {
            ce = DSI_MIN(DSI_MIN(c1, cc + 128), (cc / cb + 1) * cb);
            int nv = (ce - cc + 15) / 16, rem = (ce - cc) - 16 * (nv - 1);
            __mmask16 last = rem >= 16 ? 0xffff : (__mmask16)((1u << rem) - 1);
            __m512 acc[8];
            for (int v = 0; v < 8; v++) acc[v] = _mm512_setzero_ps();
            switch (W->dtype) {
            case DSI_F8_E4M3: {
                const uint8_t *base = (const uint8_t *)W->data + cc;
                const float *sc = W->scale_inv + cc / W->block_cols;
                int br = W->block_rows, scols = W->scale_cols;
                MT_ROWS(cvt_e4m3_mask(base + r * K + 16 * v, km), sc[(size_t)(r / br) * scols] * TWO_POW_120)
                break;
            }
            case DSI_BF16: {
                const uint16_t *base = (const uint16_t *)W->data + cc;
                MT_ROWS(cvt_bf16_mask(base + r * K + 16 * v, km), 1.0f)
                break;
            }
            case DSI_F16: {
                const uint16_t *base = (const uint16_t *)W->data + cc;
                MT_ROWS(cvt_f16_mask(base + r * K + 16 * v, km), 1.0f)
                break;
            }
            default: {
                const float *base = (const float *)W->data + cc;
                MT_ROWS(_mm512_maskz_loadu_ps(km, base + r * K + 16 * v), 1.0f)
                break;
            }
            }
            for (int v = 0; v < nv; v++)
                _mm512_mask_storeu_ps(ym + (cc - c0) + 16 * v, v == nv - 1 ? last : 0xffff, acc[v]);
        }
    }
}
#undef MT_ROWS

static float avx512_dot(const float *a, const float *b, int n) {
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    int i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
    }
    for (; i < n; i += 16) {
        __mmask16 k = n - i >= 16 ? 0xffff : (__mmask16)((1u << (n - i)) - 1);
        s0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, a + i), _mm512_maskz_loadu_ps(k, b + i), s0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

static void avx512_axpy(float a, const float *x, float *y, int n) {
    __m512 av = _mm512_set1_ps(a);
    for (int i = 0; i < n; i += 16) {
        __mmask16 k = n - i >= 16 ? 0xffff : (__mmask16)((1u << (n - i)) - 1);
        _mm512_mask_storeu_ps(y + i, k, _mm512_fmadd_ps(av, _mm512_maskz_loadu_ps(k, x + i), _mm512_maskz_loadu_ps(k, y + i)));
    }
}

/* Four keys at a time: q is loaded once per 16 columns and reused. */
static void avx512_dots(const float *q, const float *k, int n, size_t ldk, int d, float *out, int accumulate) {
    int j = 0;
    for (; j + 4 <= n; j += 4) {
        const float *k0 = k + j * ldk, *k1 = k0 + ldk, *k2 = k1 + ldk, *k3 = k2 + ldk;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int c = 0; c < d; c += 16) {
            __mmask16 km = d - c >= 16 ? 0xffff : (__mmask16)((1u << (d - c)) - 1);
            __m512 qv = _mm512_maskz_loadu_ps(km, q + c);
            a0 = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(km, k0 + c), a0);
            a1 = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(km, k1 + c), a1);
            a2 = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(km, k2 + c), a2);
            a3 = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(km, k3 + c), a3);
        }
        __m128 r = reduce4(a0, a1, a2, a3); /* dots_mh's reduction: the same bits per head */
        _mm_storeu_ps(out + j, accumulate ? _mm_add_ps(_mm_loadu_ps(out + j), r) : r);
    }
    for (; j < n; j++) {
        float v = avx512_dot(q, k + j * ldk, d);
        out[j] = accumulate ? out[j] + v : v;
    }
}

/* out += sum_j p_j v_j, the output row held in registers across keys (d <= 512). */
static void avx512_wsum(const float *p, const float *v, int n, size_t ldv, int d, float *out) {
    for (int c0 = 0; c0 < d; c0 += 256) {
        int w = DSI_MIN(256, d - c0), nv = (w + 15) / 16;
        __mmask16 last = (w & 15) ? (__mmask16)((1u << (w & 15)) - 1) : 0xffff;
        __m512 acc[16];
        for (int i = 0; i < nv; i++) acc[i] = _mm512_maskz_loadu_ps(i == nv - 1 ? last : 0xffff, out + c0 + 16 * i);
        for (int j = 0; j < n; j++) {
            __m512 pj = _mm512_set1_ps(p[j]);
            const float *vj = v + j * ldv + c0;
            _Pragma("GCC unroll 16") for (int i = 0; i < 16; i++) {
                if (i >= nv) break;
                acc[i] = _mm512_fmadd_ps(pj, _mm512_maskz_loadu_ps(i == nv - 1 ? last : 0xffff, vj + 16 * i), acc[i]);
            }
        }
        for (int i = 0; i < nv; i++) _mm512_mask_storeu_ps(out + c0 + 16 * i, i == nv - 1 ? last : 0xffff, acc[i]);
    }
}

#ifndef DOTS_PF_ROWS
#define DOTS_PF_ROWS 4 /* one 4-row step ahead (Zen 5, into L1: 8 rows read 30 GB/s, 4 rows 34; Zen 4, into L2: 8 rows 1% slower) */
#endif
/* Four heads x four rows per pass: per 16 columns, 4 row loads and 4 query
 * loads feed 16 FMAs, where dots spends one row load per FMA (L2-bound on
 * the 147 KB KV blocks). Each (head, row) is one accumulator over the
 * columns in order, then reduced: the sums of avx512_dots' 4-row path. */
static void avx512_dots_mh(const float *q, size_t ldq, int nh, const float *k, int n, size_t ldk, int d, float *out,
                           size_t ldo, int accumulate, const float *next) {
    int j = 0;
    for (; j + 4 <= n; j += 4) {
        const float *k0 = k + j * ldk, *k1 = k0 + ldk, *k2 = k1 + ldk, *k3 = k2 + ldk;
        /* the four rows DOTS_PF_ROWS ahead (into `next`, the following
         * block, past this one's end), as one contiguous run of lines spread
         * evenly over the head passes: 4 per 16 columns with one pass, 2
         * with two, 1 with four (a burst of all 144 lines at once stalled on
         * the miss buffers; one line of each of the four rows per step, four
         * short streams, read 17 GB/s from memory with 8 heads, the
         * contiguous run 34; the whole run in the first of two passes, the
         * form before, ran the scores and sums over a 576-row cache from
         * memory at 70-78 GFLOP/s, spread over both 74-88, four alternating
         * runs, +7-12%; with 16 heads 71 -> 79). Into L2: on Zen 4, decode at
         * 512 context ran 2.5-3% faster than with T0. */
        int r = j + DOTS_PF_ROWS;
        const char *pf = r + 4 <= n ? (const char *)(k + (size_t)r * ldk)
                         : next && r >= n ? (const char *)(next + (size_t)(r - n) * ldk)
                                          : NULL;
        int passes = nh / 4, spread = passes >= 4 ? 4 : passes == 2 ? 2 : 1, per = 4 / spread; /* lines per step */
        int h = 0;
        for (; h + 4 <= nh; h += 4) {
            const float *q0 = q + h * ldq, *q1 = q0 + ldq, *q2 = q1 + ldq, *q3 = q2 + ldq;
            __m512 a[4][4];
            _Pragma("GCC unroll 4") for (int x = 0; x < 4; x++)
                _Pragma("GCC unroll 4") for (int y = 0; y < 4; y++) a[x][y] = _mm512_setzero_ps();
            for (int c = 0; c < d; c += 16) {
                __mmask16 km = d - c >= 16 ? 0xffff : (__mmask16)((1u << (d - c)) - 1);
                if (pf && h / 4 < spread)
                    for (int l = 0; l < per; l++, pf += 64) _mm_prefetch(pf, _MM_HINT_T1);
                __m512 kv[4] = {_mm512_maskz_loadu_ps(km, k0 + c), _mm512_maskz_loadu_ps(km, k1 + c),
                                _mm512_maskz_loadu_ps(km, k2 + c), _mm512_maskz_loadu_ps(km, k3 + c)};
                __m512 qv[4] = {_mm512_maskz_loadu_ps(km, q0 + c), _mm512_maskz_loadu_ps(km, q1 + c),
                                _mm512_maskz_loadu_ps(km, q2 + c), _mm512_maskz_loadu_ps(km, q3 + c)};
                _Pragma("GCC unroll 4") for (int x = 0; x < 4; x++)
                    _Pragma("GCC unroll 4") for (int y = 0; y < 4; y++) a[x][y] = _mm512_fmadd_ps(qv[x], kv[y], a[x][y]);
            }
            /* the 16 dot products reduced together: lane 4x + y */
            __m512 v[16];
            for (int x = 0; x < 4; x++)
                for (int y = 0; y < 4; y++) v[4 * x + y] = a[x][y];
            __m512 sum = reduce16(v);
            float4_store(out + (size_t)h * ldo + j, ldo, sum, accumulate);
        }
        for (; h < nh; h++) avx512_dots(q + h * ldq, k0, 4, ldk, d, out + (size_t)h * ldo + j, accumulate);
    }
    if (j < n)
        for (int h = 0; h < nh; h++) avx512_dots(q + h * ldq, k + j * ldk, n - j, ldk, d, out + (size_t)h * ldo + j, accumulate);
}

/* Four heads x 64 columns in registers over all rows: each row's 64 columns
 * are loaded once for four heads. Per output the rows are added in order,
 * as avx512_wsum does. */
static void avx512_wsum_mh(const float *p, size_t ldp, int nh, const float *v, int n, size_t ldv, int d, float *out,
                           size_t ldo) {
    int h = 0;
    for (; h + 4 <= nh; h += 4) {
        const float *p0 = p + h * ldp, *p1 = p0 + ldp, *p2 = p1 + ldp, *p3 = p2 + ldp;
        float *o[4] = {out + (size_t)h * ldo, out + (size_t)(h + 1) * ldo, out + (size_t)(h + 2) * ldo,
                       out + (size_t)(h + 3) * ldo};
        int c = 0;
        for (; c + 64 <= d; c += 64) {
            __m512 a[4][4];
            _Pragma("GCC unroll 4") for (int x = 0; x < 4; x++)
                _Pragma("GCC unroll 4") for (int y = 0; y < 4; y++) a[x][y] = _mm512_loadu_ps(o[x] + c + 16 * y);
            for (int j = 0; j < n; j++) {
                const float *vj = v + j * ldv + c;
                __m512 vv[4] = {_mm512_loadu_ps(vj), _mm512_loadu_ps(vj + 16), _mm512_loadu_ps(vj + 32),
                                _mm512_loadu_ps(vj + 48)};
                __m512 pb[4] = {_mm512_set1_ps(p0[j]), _mm512_set1_ps(p1[j]), _mm512_set1_ps(p2[j]),
                                _mm512_set1_ps(p3[j])};
                _Pragma("GCC unroll 4") for (int x = 0; x < 4; x++)
                    _Pragma("GCC unroll 4") for (int y = 0; y < 4; y++) a[x][y] = _mm512_fmadd_ps(pb[x], vv[y], a[x][y]);
            }
            _Pragma("GCC unroll 4") for (int x = 0; x < 4; x++)
                _Pragma("GCC unroll 4") for (int y = 0; y < 4; y++) _mm512_storeu_ps(o[x] + c + 16 * y, a[x][y]);
        }
        if (c < d)
            for (int x = 0; x < 4; x++) avx512_wsum(p + (h + x) * ldp, v + c, n, ldv, d - c, o[x] + c);
    }
    for (; h < nh; h++) avx512_wsum(p + h * ldp, v, n, ldv, d, out + (size_t)h * ldo);
}

/* exp by range reduction: x = k ln2 + r, |r| <= ln2/2, exp(r) by the
 * Cephes expf polynomial (~1 ulp), times 2^k by vscalefps (which also
 * flushes very negative inputs to 0). */
static inline __m512 exp16(__m512 v) {
    const __m512 lo = _mm512_set1_ps(-104.0f), hi = _mm512_set1_ps(88.7f);
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f), c1 = _mm512_set1_ps(0.693359375f),
                 c2 = _mm512_set1_ps(-2.12194440e-4f);
    const __m512 p0 = _mm512_set1_ps(1.9875691500E-4f), p1 = _mm512_set1_ps(1.3981999507E-3f),
                 p2 = _mm512_set1_ps(8.3334519073E-3f), p3 = _mm512_set1_ps(4.1665795894E-2f),
                 p4 = _mm512_set1_ps(1.6666665459E-1f), p5 = _mm512_set1_ps(5.0000001201E-1f), one = _mm512_set1_ps(1.0f);
    v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
    __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(v, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(k, c1, v);
    r = _mm512_fnmadd_ps(k, c2, r);
    __m512 pp = _mm512_fmadd_ps(p0, r, p1);
    pp = _mm512_fmadd_ps(pp, r, p2);
    pp = _mm512_fmadd_ps(pp, r, p3);
    pp = _mm512_fmadd_ps(pp, r, p4);
    pp = _mm512_fmadd_ps(pp, r, p5);
    pp = _mm512_fmadd_ps(pp, _mm512_mul_ps(r, r), _mm512_add_ps(r, one));
    return _mm512_scalef_ps(pp, k);
}

/* Softmax weights: 16 per instruction instead of one glibc call each
 * (0.5 ms of a decode token at 600 context). */
static float avx512_expsum(float *x, int n, float sub) {
    const __m512 vsub = _mm512_set1_ps(sub);
    __m512 acc = _mm512_setzero_ps();
    for (int i = 0; i < n; i += 16) {
        __mmask16 km = n - i >= 16 ? 0xffff : (__mmask16)((1u << (n - i)) - 1);
        __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(km, x + i), vsub));
        _mm512_mask_storeu_ps(x + i, km, e);
        acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(km, e));
    }
    return _mm512_reduce_add_ps(acc);
}

/* silu(g) * u, 16 at a time (prefill's SwiGLU on one core: ~3% of a 512-token
 * prefill with glibc's expf per element) */
static void avx512_silu_mul(float *g, const float *u, size_t n) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (size_t i = 0; i < n; i += 16) {
        __mmask16 km = n - i >= 16 ? 0xffff : (__mmask16)((1u << (n - i)) - 1);
        __m512 x = _mm512_maskz_loadu_ps(km, g + i);
        __m512 s = _mm512_div_ps(x, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
        _mm512_mask_storeu_ps(g + i, km, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(km, u + i)));
    }
}

/* dsi_e4m3_round on 16 lanes, its three ranges by compare and blend: the
 * same bits (NaN: the default quiet NaN, as there). */
static inline __m512 e4m3_round16(__m512 f) {
    __m512i u = _mm512_castps_si512(f), a = _mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff));
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(a, 20), _mm512_set1_epi32(1));
    __m512i r = _mm512_and_si512(_mm512_add_epi32(_mm512_add_epi32(a, _mm512_set1_epi32(0x7ffff)), odd),
                                 _mm512_set1_epi32((int)0xfff00000));
    const __m512 big = _mm512_set1_ps(16384.0f);
    __m512 sub = _mm512_sub_ps(_mm512_add_ps(_mm512_castsi512_ps(a), big), big);
    __m512i v = _mm512_mask_blend_epi32(_mm512_cmpge_epu32_mask(a, _mm512_set1_epi32(0x3c800000)),
                                        _mm512_castps_si512(sub), r);
    v = _mm512_mask_mov_epi32(v, _mm512_cmpge_epu32_mask(a, _mm512_set1_epi32(0x43e00000)),
                              _mm512_set1_epi32(0x43e00000)); /* 448 */
    v = _mm512_or_si512(v, _mm512_and_si512(u, _mm512_set1_epi32((int)0x80000000)));
    v = _mm512_mask_mov_epi32(v, _mm512_cmpgt_epu32_mask(a, _mm512_set1_epi32(0x7f800000)),
                              _mm512_set1_epi32(0x7fc00000));
    return _mm512_castsi512_ps(v);
}

/* dsi_fp8_scale of len <= 128 values, 16 lanes at a time: the amax by
 * max(|x|, acc), which like its fmaxf skips a NaN; the same bits. */
static inline float fp8_scale16(const float *x, int len) {
    const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    __m512 acc = _mm512_setzero_ps();
    for (int i = 0; i < len; i += 16) {
        __mmask16 km = len - i >= 16 ? 0xffff : (__mmask16)((1u << (len - i)) - 1);
        acc = _mm512_max_ps(_mm512_and_ps(_mm512_maskz_loadu_ps(km, x + i), absmask), acc);
    }
    float amax = _mm512_reduce_max_ps(acc);
    return amax > 0 ? amax / 448.0f : 1.0f;
}

/* dsi_fp8_round_ref 16 lanes at a time: division and product as there, so
 * the same bits. The scalar form (a library-free rounding, but one element
 * at a time) was 2-7% of a --fp8-act decode token (serial at two threads). */
static void avx512_fp8_round(float *x, int n) {
    for (int k0 = 0; k0 < n; k0 += 128) {
        int len = DSI_MIN(n - k0, 128);
        __m512 sv = _mm512_set1_ps(fp8_scale16(x + k0, len));
        for (int i = 0; i < len; i += 16) {
            __mmask16 km = len - i >= 16 ? 0xffff : (__mmask16)((1u << (len - i)) - 1);
            __m512 v = _mm512_div_ps(_mm512_maskz_loadu_ps(km, x + k0 + i), sv);
            _mm512_mask_storeu_ps(x + k0 + i, km, _mm512_mul_ps(e4m3_round16(v), sv));
        }
    }
}

/* dsi_fp8_quant_ref 16 lanes at a time: avx512_fp8_round's scale and
 * rounding; the rounded values are exact in bf16, so their top 16 bits are
 * the reference's rounding conversion (NaN: 0x7fc0 in both). The scalar
 * loop ran serially before every FP8 x FP8 matmul: ~2 ns per element, about
 * a tenth of a one-thread --fp8-act prefill. */
static void avx512_fp8_quant(const float *x, int n, uint16_t *q, float *s) {
    for (int k0 = 0, t = 0; k0 < n; k0 += 128, t++) {
        int len = DSI_MIN(n - k0, 128);
        s[t] = fp8_scale16(x + k0, len);
        __m512 sv = _mm512_set1_ps(s[t]);
        for (int i = 0; i < 128; i += 16) {
            __mmask16 km = len - i >= 16 ? 0xffff : len <= i ? 0 : (__mmask16)((1u << (len - i)) - 1);
            __m512 v = e4m3_round16(_mm512_div_ps(_mm512_maskz_loadu_ps(km, x + k0 + i), sv));
            __m512i b = _mm512_maskz_srli_epi32(km, _mm512_castps_si512(v), 16);
            _mm256_storeu_si256((__m256i *)(q + k0 + i), _mm512_cvtepi32_epi16(b));
        }
    }
}

const dsi_kernels dsi_kernels_avx512 = {"avx512", avx512_matmul, avx512_matmul_t, avx512_dot, avx512_axpy,
                                        avx512_dots, avx512_wsum, avx512_matmul_q8,
                                        avx512_matmul_rowwise, avx512_dots_mh, avx512_wsum_mh, avx512_expsum,
                                        avx512_silu_mul, avx512_fp8_round, avx512_fp8_quant};
/* The same kernels without the BF16 dot-product form, for CPUs lacking AVX512_BF16. */
const dsi_kernels dsi_kernels_avx512_nobf16 = {"avx512", avx512_matmul, avx512_matmul_t, avx512_dot, avx512_axpy,
                                               avx512_dots, avx512_wsum, NULL, avx512_matmul_rowwise,
                                               avx512_dots_mh, avx512_wsum_mh, avx512_expsum, avx512_silu_mul,
                                               avx512_fp8_round, avx512_fp8_quant};
