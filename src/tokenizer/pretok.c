/* Pre-tokenization (the Split steps of tokenizer.json, run with PCRE2 in UTF+UCP mode)
 * and added-token matching.
 *
 * Pieces are byte ranges of the caller's text: there is no normalizer, and the
 * ByteLevel step only changes the alphabet, which BPE applies byte by byte. Each Split
 * step runs its regex on one piece of the previous step at a time (the piece is the
 * whole subject, so a lookahead like \s+(?!\S) never sees past the piece, as in
 * `tokenizers`), depth first, so memory does not grow with the text. */
#include <string.h>

#include "tokenizer/tokenizer_impl.h"

typedef struct walk {
    const dsi_tokenizer *tok;
    dsi__tls *tls;
    const char *text;
    dsi__word_fn emit;
    void *ctx;
} walk;

static int walk_step(walk *w, size_t s, size_t e, int step);

/* Combines the match / non-match ranges of one Split step into pieces, with the rules
 * of `tokenizers` (flags are the original ones, after `invert`):
 *  MergedWithPrevious: a match joins the piece before it if that one is a non-match;
 *  MergedWithNext: a match joins the piece after it if that one is a non-match;
 *  Contiguous: adjacent pieces with the same flag form one piece. */
typedef struct combiner {
    walk *w;
    int step, behavior;
    int has_pending, pending_match, last_match;
    size_t ps, pe;
} combiner;

static int comb_flush(combiner *c) {
    if (!c->has_pending) return DSI_OK;
    c->has_pending = 0;
    return walk_step(c->w, c->ps, c->pe, c->step + 1);
}

static int comb_hold(combiner *c, size_t s, size_t e, int is_match) {
    int rc = comb_flush(c);
    c->has_pending = 1;
    c->pending_match = is_match;
    c->ps = s;
    c->pe = e;
    return rc;
}

static int comb_add(combiner *c, size_t s, size_t e, int is_match) {
    if (s >= e) return DSI_OK;
    int rc = DSI_OK, last = c->last_match;
    c->last_match = is_match;
    switch (c->behavior) {
    case DSI__SPLIT_REMOVED:
        return is_match ? DSI_OK : walk_step(c->w, s, e, c->step + 1);
    case DSI__SPLIT_ISOLATED:
        return walk_step(c->w, s, e, c->step + 1);
    case DSI__SPLIT_MERGED_PREV:
        if (is_match && c->has_pending && !last) {
            c->pe = e;
            return DSI_OK;
        }
        return comb_hold(c, s, e, is_match);
    case DSI__SPLIT_MERGED_NEXT: /* only a match waits for the piece after it */
        if (c->has_pending && !is_match) {
            c->pe = e;
            return comb_flush(c);
        }
        if ((rc = comb_flush(c))) return rc;
        if (is_match) return comb_hold(c, s, e, 1);
        return walk_step(c->w, s, e, c->step + 1);
    default: /* CONTIGUOUS */
        if (c->has_pending && c->pending_match == is_match) {
            c->pe = e;
            return DSI_OK;
        }
        return comb_hold(c, s, e, is_match);
    }
}

static int walk_step(walk *w, size_t s, size_t e, int step) {
    if (s >= e) return DSI_OK;
    const dsi_tokenizer *tok = w->tok;
    if (step >= tok->n_splits) return w->emit(w->ctx, w->text + s, e - s);
#ifdef DSI_HAVE_PCRE2
    const dsi__split *sp = &tok->splits[step];
    pcre2_match_data *md = dsi__tls_match_data(w->tls, step);
    pcre2_match_context *mc = dsi__tls_match_context(w->tls);
    const PCRE2_SPTR subject = (PCRE2_SPTR)(w->text + s);
    const size_t n = e - s;
    combiner c = {.w = w, .step = step, .behavior = sp->behavior};
    size_t at = 0, prev = 0;
    int rc;
    while (at <= n) {
        int m = sp->jit ? pcre2_jit_match(sp->re, subject, n, at, 0, md, mc)
                        : pcre2_match(sp->re, subject, n, at, PCRE2_NO_UTF_CHECK, md, mc);
        if (m == PCRE2_ERROR_NOMATCH) break;
        if (m < 0) {
            PCRE2_UCHAR msg[160];
            pcre2_get_error_message(m, msg, sizeof msg);
            return dsi_error(DSI_EINVAL, "tokenizer: pre-tokenizer regex failed on a %zu-byte piece: %s", n,
                             (const char *)msg);
        }
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
        size_t ms = ov[0], me = ov[1];
        if (me <= ms) { /* empty match: contributes no piece; step over one character */
            if (ms >= n) break;
            at = ms + dsi__utf8_len((const char *)subject + ms, n - ms);
            continue;
        }
        if ((rc = comb_add(&c, s + prev, s + ms, sp->invert))) return rc;
        if ((rc = comb_add(&c, s + ms, s + me, !sp->invert))) return rc;
        prev = at = me;
    }
    if ((rc = comb_add(&c, s + prev, e, sp->invert))) return rc;
    return comb_flush(&c);
#else
    return dsi_error(DSI_EUNSUPPORTED, "tokenizer: built without PCRE2, cannot run Split pre-tokenizers");
#endif
}

int dsi__pretokenize(const dsi_tokenizer *tok, dsi__tls *tls, const char *text, size_t n, dsi__word_fn emit,
                     void *ctx) {
    walk w = {tok, tls, text, emit, ctx};
    return walk_step(&w, 0, n, 0);
}

/* ---- added tokens ------------------------------------------------------------------ */

/* Unicode White_Space, for lstrip/rstrip. Returns the length of the whitespace
 * character at s (0 if none). */
static size_t ws_len(const unsigned char *s, size_t n) {
    if (n == 0) return 0;
    if (s[0] == ' ' || (s[0] >= 0x09 && s[0] <= 0x0D)) return 1;
    if (n >= 2 && s[0] == 0xC2 && (s[1] == 0x85 || s[1] == 0xA0)) return 2;
    if (n >= 3 && s[0] == 0xE1 && s[1] == 0x9A && s[2] == 0x80) return 3;
    if (n >= 3 && s[0] == 0xE2 && s[1] == 0x80 && ((s[2] >= 0x80 && s[2] <= 0x8A) || s[2] == 0xA8 || s[2] == 0xA9 || s[2] == 0xAF))
        return 3;
    if (n >= 3 && s[0] == 0xE2 && s[1] == 0x81 && s[2] == 0x9F) return 3;
    if (n >= 3 && s[0] == 0xE3 && s[1] == 0x80 && s[2] == 0x80) return 3;
    return 0;
}

/* Length of whitespace ending exactly at text[end) scanning backwards to `floor`. */
static size_t ws_before(const char *text, size_t floor, size_t end) {
    size_t p = end;
    while (p > floor) {
        size_t q = p - 1; /* back up to the start of the previous character */
        while (q > floor && ((unsigned char)text[q] & 0xC0) == 0x80) q--;
        if (ws_len((const unsigned char *)text + q, p - q) != p - q) break;
        p = q;
    }
    return end - p;
}

int dsi__find_added(const dsi_tokenizer *tok, const char *text, size_t n, size_t from, size_t *start,
                    size_t *end) {
    if (tok->n_trie == 0) return -1;
    const dsi__trie_node *t = tok->trie;
    for (size_t i = from; i < n; i++) {
        int best = -1;
        size_t best_end = 0;
        int32_t node = 0;
        for (size_t j = i; j < n; j++) {
            int32_t c = t[node].child;
            while (c >= 0 && t[c].byte != (unsigned char)text[j]) c = t[c].sibling;
            if (c < 0) break;
            node = c;
            if (t[node].added >= 0) {
                best = t[node].added;
                best_end = j + 1;
            }
        }
        if (best >= 0) {
            const dsi__added *a = &tok->added[best];
            size_t s = i, e = best_end;
            if (a->lstrip) s -= ws_before(text, from, s);
            if (a->rstrip) {
                size_t l;
                while ((l = ws_len((const unsigned char *)text + e, n - e)) > 0) e += l;
            }
            *start = s;
            *end = e;
            return best;
        }
    }
    return -1;
}
