/* UTF-8 validation and lossy repair (Unicode "maximal subpart" substitution, the rule
 * Rust's String::from_utf8_lossy and hence the `tokenizers` decoder follow). */
#include <string.h>

#include "tokenizer/tokenizer_impl.h"

enum { SEQ_VALID, SEQ_INVALID, SEQ_TRUNCATED };

/* Classifies the sequence at s[0..n), n >= 1. *len: its length when valid, the length
 * of the maximal invalid subpart (>= 1) when invalid, n when truncated. */
static int seq_check(const unsigned char *s, size_t n, size_t *len) {
    unsigned c = s[0];
    if (c < 0x80) {
        *len = 1;
        return SEQ_VALID;
    }
    size_t need;
    unsigned lo = 0x80, hi = 0xBF; /* allowed range of the second byte */
    if (c >= 0xC2 && c <= 0xDF) need = 2;
    else if (c >= 0xE0 && c <= 0xEF) {
        need = 3;
        if (c == 0xE0) lo = 0xA0;
        if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        need = 4;
        if (c == 0xF0) lo = 0x90;
        if (c == 0xF4) hi = 0x8F;
    } else {
        *len = 1;
        return SEQ_INVALID;
    }
    for (size_t i = 1; i < need; i++) {
        if (i >= n) {
            *len = n;
            return SEQ_TRUNCATED;
        }
        unsigned b = s[i];
        unsigned l = i == 1 ? lo : 0x80, h = i == 1 ? hi : 0xBF;
        if (b < l || b > h) {
            *len = i;
            return SEQ_INVALID;
        }
    }
    *len = need;
    return SEQ_VALID;
}

size_t dsi__utf8_invalid_at(const char *str, size_t n) {
    const unsigned char *s = (const unsigned char *)str;
    size_t i = 0;
    while (i < n) {
        /* ASCII fast path, 8 bytes at a time */
        while (i + 8 <= n) {
            uint64_t w;
            memcpy(&w, s + i, 8);
            if (w & 0x8080808080808080ull) break;
            i += 8;
        }
        if (i >= n) break;
        size_t len;
        if (seq_check(s + i, n - i, &len) != SEQ_VALID) return i;
        i += len;
    }
    return n;
}

size_t dsi__utf8_len(const char *s, size_t n) {
    size_t len;
    if (n == 0) return 0;
    if (seq_check((const unsigned char *)s, n, &len) != SEQ_VALID) return 1;
    return len;
}

size_t dsi__utf8_sanitize(const char *str, size_t n, int final, char *out, size_t *consumed) {
    const unsigned char *s = (const unsigned char *)str;
    size_t i = 0, o = 0;
    while (i < n) {
        size_t len;
        int k = seq_check(s + i, n - i, &len);
        if (k == SEQ_VALID) {
            memcpy(out + o, s + i, len);
            o += len;
        } else if (k == SEQ_TRUNCATED && !final) {
            break;
        } else {
            memcpy(out + o, "\xEF\xBF\xBD", 3);
            o += 3;
        }
        i += len;
    }
    *consumed = i;
    return o;
}
