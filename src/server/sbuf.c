/* Growable strings and the small JSON writer used for responses and SSE
 * chunks (snprintf + an escaper beats building cJSON trees per token). */
#include "server/server_impl.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int reserve(dsi_sbuf *b, size_t extra) {
    if (b->oom) return 0;
    if (b->len + extra + 1 <= b->cap) return 1;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra + 1) cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) { b->oom = 1; return 0; }
    b->p = p;
    b->cap = cap;
    return 1;
}

void dsi__sbuf_put(dsi_sbuf *b, const char *s, size_t n) {
    if (!reserve(b, n)) return;
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = 0;
}

void dsi__sbuf_puts(dsi_sbuf *b, const char *s) { dsi__sbuf_put(b, s, strlen(s)); }

void dsi__sbuf_printf(dsi_sbuf *b, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    char small[256];
    int n = vsnprintf(small, sizeof small, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if ((size_t)n < sizeof small) { dsi__sbuf_put(b, small, n); return; }
    if (!reserve(b, n)) return;
    va_start(ap, fmt);
    vsnprintf(b->p + b->len, n + 1, fmt, ap);
    va_end(ap);
    b->len += n;
}

/* Length of the valid UTF-8 sequence at s (1..4), or 0 when invalid. */
static int utf8_len(const unsigned char *s, size_t n) {
    unsigned c = s[0];
    int k;
    unsigned cp;
    if (c < 0x80) return 1;
    if (c >= 0xc2 && c <= 0xdf) { k = 2; cp = c & 0x1f; }
    else if (c >= 0xe0 && c <= 0xef) { k = 3; cp = c & 0x0f; }
    else if (c >= 0xf0 && c <= 0xf4) { k = 4; cp = c & 0x07; }
    else return 0;
    if ((size_t)k > n) return 0;
    for (int i = 1; i < k; i++) {
        if ((s[i] & 0xc0) != 0x80) return 0;
        cp = (cp << 6) | (s[i] & 0x3f);
    }
    if ((k == 3 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) || (k == 4 && (cp < 0x10000 || cp > 0x10ffff)))
        return 0;
    return k;
}

void dsi__sbuf_json_str(dsi_sbuf *b, const char *s, size_t n) {
    const unsigned char *u = (const unsigned char *)s;
    dsi__sbuf_put(b, "\"", 1);
    size_t run = 0; /* bytes copied verbatim in one go */
    for (size_t i = 0; i < n;) {
        unsigned c = u[i];
        const char *esc = NULL;
        char ubuf[8];
        int k = 1;
        if (c == '"') esc = "\\\"";
        else if (c == '\\') esc = "\\\\";
        else if (c == '\n') esc = "\\n";
        else if (c == '\r') esc = "\\r";
        else if (c == '\t') esc = "\\t";
        else if (c < 0x20 || c == 0x7f) { snprintf(ubuf, sizeof ubuf, "\\u%04x", c); esc = ubuf; }
        else if (c >= 0x80 && (k = utf8_len(u + i, n - i)) == 0) { esc = "\\ufffd"; k = 1; }
        if (esc) {
            dsi__sbuf_put(b, s + i - run, run);
            run = 0;
            dsi__sbuf_puts(b, esc);
        } else {
            run += k;
        }
        i += k;
    }
    dsi__sbuf_put(b, s + n - run, run);
    dsi__sbuf_put(b, "\"", 1);
}

void dsi__sbuf_json_num(dsi_sbuf *b, double v) {
    if (!isfinite(v)) v = -9999.0;
    dsi__sbuf_printf(b, "%.6g", v);
}

void dsi__sbuf_reset(dsi_sbuf *b) {
    b->len = 0;
    if (b->p) b->p[0] = 0;
}

void dsi__sbuf_free(dsi_sbuf *b) {
    free(b->p);
    memset(b, 0, sizeof *b);
}
