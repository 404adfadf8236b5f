/* Incremental split of R1 output into reasoning and content.
 *
 * Text that could be the beginning of a tag ("<thi" at the end of a push) is held back
 * until the next push decides it, so deltas never contain half a tag and the
 * concatenated deltas equal a one-shot split of the whole text. */
#define _GNU_SOURCE /* memmem */
#include <stdlib.h>
#include <string.h>

#include "tokenizer/tokenizer_impl.h"

static const char OPEN[] = "<think>", CLOSE[] = "</think>";
enum { ST_START, ST_REASONING, ST_CONTENT };

typedef struct rbuf {
    char *p;
    size_t n, cap;
} rbuf;

struct dsi_reasoning {
    int starts_in_reasoning, state;
    rbuf pend, reasoning, content;
};

static int rb_add(rbuf *b, const char *s, size_t n) {
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 128;
        while (cap < b->n + n + 1) cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) return dsi_error(DSI_ENOMEM, "reasoning: out of memory");
        b->p = p;
        b->cap = cap;
    }
    if (n) memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = '\0';
    return DSI_OK;
}

static void rb_drop_front(rbuf *b, size_t k) {
    memmove(b->p, b->p + k, b->n - k);
    b->n -= k;
    b->p[b->n] = '\0';
}

int dsi_reasoning_create(int starts_in_reasoning, dsi_reasoning **out) {
    if (!out) return dsi_error(DSI_EINVAL, "dsi_reasoning_create: out is NULL");
    dsi_reasoning *r = calloc(1, sizeof *r);
    if (!r) return dsi_error(DSI_ENOMEM, "reasoning: out of memory");
    r->starts_in_reasoning = starts_in_reasoning != 0;
    r->state = ST_START;
    if (rb_add(&r->pend, "", 0)) {
        free(r);
        return DSI_ENOMEM;
    }
    *out = r;
    return DSI_OK;
}

/* Length of the longest suffix of s[0..n) that is a proper prefix of tag. */
static size_t partial_tag_suffix(const char *s, size_t n, const char *tag) {
    size_t tl = strlen(tag);
    for (size_t k = DSI_MIN(n, tl - 1); k > 0; k--)
        if (memcmp(s + n - k, tag, k) == 0) return k;
    return 0;
}

static int step(dsi_reasoning *r, int final) {
    rbuf *p = &r->pend;
    int rc = DSI_OK;
    for (;;) {
        if (r->state == ST_START) {
            size_t ol = sizeof OPEN - 1;
            if (p->n >= ol && memcmp(p->p, OPEN, ol) == 0) {
                rb_drop_front(p, ol);
                r->state = ST_REASONING;
            } else if (!final && p->n < ol && memcmp(p->p, OPEN, p->n) == 0) {
                return DSI_OK; /* undecided until more text arrives */
            } else {
                r->state = r->starts_in_reasoning ? ST_REASONING : ST_CONTENT;
            }
        } else if (r->state == ST_REASONING) {
            char *end = p->n ? memmem(p->p, p->n, CLOSE, sizeof CLOSE - 1) : NULL;
            if (end) {
                size_t k = (size_t)(end - p->p);
                if ((rc = rb_add(&r->reasoning, p->p, k))) return rc;
                rb_drop_front(p, k + sizeof CLOSE - 1);
                r->state = ST_CONTENT;
                continue;
            }
            size_t keep = final ? 0 : partial_tag_suffix(p->p, p->n, CLOSE);
            if ((rc = rb_add(&r->reasoning, p->p, p->n - keep))) return rc;
            rb_drop_front(p, p->n - keep);
            return DSI_OK;
        } else {
            if ((rc = rb_add(&r->content, p->p, p->n))) return rc;
            p->n = 0;
            return DSI_OK;
        }
    }
}

static int deliver(dsi_reasoning *r, int final, dsi_reasoning_delta *d) {
    r->reasoning.n = r->content.n = 0;
    int rc = rb_add(&r->reasoning, "", 0);
    if (!rc) rc = rb_add(&r->content, "", 0);
    if (!rc) rc = step(r, final);
    if (rc) return rc;
    d->reasoning = r->reasoning.p;
    d->reasoning_len = r->reasoning.n;
    d->content = r->content.p;
    d->content_len = r->content.n;
    return DSI_OK;
}

int dsi_reasoning_push(dsi_reasoning *r, const char *text, size_t len, dsi_reasoning_delta *delta) {
    if (!r || (!text && len) || !delta) return dsi_error(DSI_EINVAL, "dsi_reasoning_push: NULL argument");
    int rc = rb_add(&r->pend, text, len);
    if (rc) return rc;
    return deliver(r, 0, delta);
}

int dsi_reasoning_finish(dsi_reasoning *r, dsi_reasoning_delta *delta) {
    if (!r || !delta) return dsi_error(DSI_EINVAL, "dsi_reasoning_finish: NULL argument");
    return deliver(r, 1, delta);
}

int dsi_reasoning_in_content(const dsi_reasoning *r) { return r && r->state == ST_CONTENT; }

void dsi_reasoning_destroy(dsi_reasoning *r) {
    if (!r) return;
    free(r->pend.p);
    free(r->reasoning.p);
    free(r->content.p);
    free(r);
}
