/* Scalar dtype conversions: the specification every SIMD path is tested
 * against. e4m3 is OCP FP8 E4M3FN (bias 7, no infinities, 0x7f/0xff NaN,
 * max 448). */
#ifndef DSI_KERNELS_DTYPE_H
#define DSI_KERNELS_DTYPE_H

#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float dsi_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Round to nearest even; NaN stays NaN. */
static inline uint16_t dsi_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

static inline float dsi_f16_to_f32(uint16_t h) {
    uint32_t s = (uint32_t)(h >> 15) << 31, e = (h >> 10) & 0x1f, m = h & 0x3ff, u;
    if (e == 0) {
        if (m == 0) { u = s; }
        else { /* subnormal */
            float f = ldexpf((float)m, -24);
            return s ? -f : f;
        }
    } else if (e == 31) {
        u = s | 0x7f800000u | (m << 13);
    } else {
        u = s | ((e + 112) << 23) | (m << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float dsi_e4m3_to_f32(uint8_t b) {
    int s = b >> 7, e = (b >> 3) & 0xf, m = b & 7;
    float v;
    if (e == 0xf && m == 7) return NAN;
    if (e == 0) v = ldexpf((float)m, -9);          /* subnormal: m/8 * 2^-6 */
    else v = ldexpf((float)(8 + m), e - 10);       /* (1 + m/8) * 2^(e-7) */
    return s ? -v : v;
}

/* Round to nearest even, saturating to +-448 (as DeepSeek's quantiser clamps).
 * The readable reference; dsi_f32_to_e4m3 below is the same function without
 * the library calls. */
static inline uint8_t dsi_f32_to_e4m3_ref(float f) {
    uint8_t s = signbit(f) ? 0x80 : 0;
    float a = fabsf(f);
    if (isnan(f)) return 0x7f;
    if (a >= 448.0f) return s | 0x7e;
    if (a < ldexpf(1.0f, -10)) return s; /* below half the smallest subnormal */
    int e;
    frexpf(a, &e);           /* a = fr * 2^e, fr in [0.5,1) -> unbiased exponent e-1 */
    int ue = e - 1;
    if (ue < -6) ue = -6;    /* subnormal range shares the 2^-6 exponent */
    float q = ldexpf(a, 3 - ue); /* mantissa scaled to [8,16) or subnormal [0,8) */
    float r = nearbyintf(q);     /* round half to even (default rounding mode) */
    int mant = (int)r;
    if (mant >= 16) { mant = 8; ue++; }
    if (ue > 8 || (ue == 8 && mant > 14)) return s | 0x7e;
    if (mant < 8) return s | (uint8_t)mant; /* subnormal */
    return s | (uint8_t)(((ue + 7) << 3) | (mant - 8));
}

/* dsi_f32_to_e4m3_ref bit for bit (all 2^32 inputs compared once; the tests
 * keep checking codes, midpoints, the subnormal seam and a stride of all
 * patterns), from the float's bits: 2.5 against 17 ns per element on Zen 4,
 * and the conversion was most of what make-model spent on a DeepSeek-V3-width
 * layer.
 * Normal codes round the mantissa to 3 bits at bit 20 (a carry moves into the
 * exponent, as e4m3 does); below 2^-6, subnormal codes are |f| * 2^9 rounded
 * by the add-and-subtract of 2^23 (the default rounding mode: even ties). */
static inline uint8_t dsi_f32_to_e4m3(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint8_t s = (uint8_t)((u >> 24) & 0x80);
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return 0x7f;      /* NaN */
    if (a >= 0x43e00000u) return s | 0x7e;  /* >= 448, infinities too */
    if (a < 0x3a800000u) return s;          /* below 2^-10: to zero */
    if (a < 0x3c800000u) {                  /* below 2^-6: subnormal codes 0..8 */
        float q = fabsf(f) * 512.0f, r = (q + 8388608.0f) - 8388608.0f; /* not folded: IEEE, no -ffast-math */
        return s | (uint8_t)(int)r;
    }
    uint32_t r = a + 0x7ffffu + ((a >> 20) & 1u);
    return s | (uint8_t)((((r >> 23) - 120u) << 3) | ((r >> 20) & 7u));
}

/* dsi_e4m3_to_f32(dsi_f32_to_e4m3(f)), the value FP8 keeps of f, without
 * the library calls (frexpf, ldexpf, nearbyintf: 20.6 against 1.2 ns per
 * element on Zen 4, and the FP8 activation quantiser runs it on every
 * element of every quantised row):
 * from 2^-6 up, round-to-nearest-even of the float's mantissa to 3 bits
 * (a carry moves into the exponent, as e4m3 does); below, multiples of 2^-9
 * (e4m3's subnormals) by the add-and-subtract of 2^14, whose ulp is 2^-9;
 * from 448 on, 448. tests/test_kernels.c checks it bit for bit against the
 * scalar pair. */
static inline float dsi_e4m3_round(float f) {
    uint32_t u, a, r;
    memcpy(&u, &f, 4);
    a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return NAN;
    float v;
    if (a >= 0x43e00000u) { /* 448 */
        v = 448.0f;
    } else if (a >= 0x3c800000u) { /* 2^-6 */
        r = (a + 0x7ffffu + ((a >> 20) & 1u)) & 0xfff00000u;
        memcpy(&v, &r, 4);
    } else {
        float m;
        memcpy(&m, &a, 4);
        v = (m + 16384.0f) - 16384.0f;
    }
    memcpy(&r, &v, 4);
    r |= u & 0x80000000u;
    memcpy(&v, &r, 4);
    return v;
}

#endif
