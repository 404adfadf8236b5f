/* Encode (added tokens -> pre-tokenizer -> BPE -> template), decode, accessors, and the
 * streaming detokenizer. */
#include <stdlib.h>
#include <string.h>

#include "tokenizer/tokenizer_impl.h"

typedef struct enc_ctx {
    const dsi_tokenizer *tok;
    dsi__tls *tls;
    int algo, use_cache;
    dsi__ids *out;
} enc_ctx;

static int enc_word(void *p, const char *w, size_t n) {
    enc_ctx *c = p;
    return dsi__bpe_word(c->tok, c->tls, w, n, c->algo, c->use_cache, c->out);
}

int dsi__encode_ex(const dsi_tokenizer *tok, const char *text, size_t len, unsigned flags, int algo,
                   int use_cache, int32_t **ids, size_t *n) {
    if (ids) *ids = NULL;
    if (n) *n = 0;
    if (!tok || (!text && len) || !ids || !n) return dsi_error(DSI_EINVAL, "dsi_tokenizer_encode: NULL argument");
    size_t bad = dsi__utf8_invalid_at(text, len);
    if (bad < len) return dsi_error(DSI_EINVAL, "tokenizer: input is not valid UTF-8 (byte %zu: 0x%02x)", bad, (unsigned char)text[bad]);
    dsi__tls *tls = dsi__tls_get(tok);
    if (!tls) return dsi_error(DSI_ENOMEM, "tokenizer: out of memory for thread state");
    dsi__ids out = {0};
    enc_ctx c = {tok, tls, algo, use_cache, &out};
    int rc = dsi__ids_push(&out, tok->prefix_ids, (flags & DSI_TOK_ADD_BOS) ? tok->n_prefix : 0);
    size_t pos = 0;
    while (!rc && pos < len) {
        size_t s = len, e = len;
        int k = (flags & DSI_TOK_PLAIN_SPECIAL) ? -1 : dsi__find_added(tok, text, len, pos, &s, &e);
        if (k < 0) s = len;
        rc = dsi__pretokenize(tok, tls, text + pos, s - pos, enc_word, &c);
        if (rc || k < 0) break;
        rc = dsi__ids_push(&out, &tok->added[k].id, 1);
        pos = e;
    }
    if (!rc && (flags & DSI_TOK_ADD_BOS)) rc = dsi__ids_push(&out, tok->suffix_ids, tok->n_suffix);
    if (!rc && !out.v && !(out.v = malloc(sizeof(int32_t)))) rc = dsi_error(DSI_ENOMEM, "tokenizer: out of memory");
    if (rc) {
        free(out.v);
        return rc;
    }
    *ids = out.v;
    *n = out.n;
    return DSI_OK;
}

int dsi_tokenizer_encode(const dsi_tokenizer *tok, const char *text, size_t len, unsigned flags, int32_t **ids,
                         size_t *n) {
    return dsi__encode_ex(tok, text, len, flags, DSI__BPE_HEAP, 1, ids, n);
}

static int id_ok(const dsi_tokenizer *tok, int32_t id) {
    return id >= 0 && id < tok->n_vocab && (tok->id_flags[id] & DSI__ID_PRESENT);
}

static int skip_id(const dsi_tokenizer *tok, int32_t id, unsigned flags) {
    return (flags & DSI_TOK_SKIP_SPECIAL) && (tok->id_flags[id] & DSI__ID_SPECIAL);
}

int dsi_tokenizer_decode(const dsi_tokenizer *tok, const int32_t *ids, size_t n, unsigned flags, char **text,
                         size_t *len) {
    if (text) *text = NULL;
    if (len) *len = 0;
    if (!tok || (!ids && n) || !text) return dsi_error(DSI_EINVAL, "dsi_tokenizer_decode: NULL argument");
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
        if (!id_ok(tok, ids[i])) return dsi_error(DSI_ERANGE, "tokenizer: id %d (position %zu) is not in the vocabulary", ids[i], i);
        if (!skip_id(tok, ids[i], flags)) total += tok->dec_off[ids[i] + 1] - tok->dec_off[ids[i]];
    }
    char *raw = malloc(total + 1), *out = malloc(3 * total + 1);
    if (!raw || !out) {
        free(raw);
        free(out);
        return dsi_error(DSI_ENOMEM, "tokenizer: out of memory decoding %zu ids", n);
    }
    size_t o = 0, used;
    for (size_t i = 0; i < n; i++) {
        if (skip_id(tok, ids[i], flags)) continue;
        size_t l = tok->dec_off[ids[i] + 1] - tok->dec_off[ids[i]];
        memcpy(raw + o, tok->dec_blob + tok->dec_off[ids[i]], l);
        o += l;
    }
    size_t w = dsi__utf8_sanitize(raw, o, 1, out, &used);
    free(raw);
    out[w] = '\0';
    *text = out;
    if (len) *len = w;
    return DSI_OK;
}

int32_t dsi_tokenizer_vocab_size(const dsi_tokenizer *tok) { return tok ? tok->n_vocab : 0; }
int32_t dsi_tokenizer_bos_id(const dsi_tokenizer *tok) { return tok ? tok->bos_id : -1; }
int32_t dsi_tokenizer_eos_id(const dsi_tokenizer *tok) { return tok ? tok->eos_id : -1; }
int dsi_tokenizer_add_bos_default(const dsi_tokenizer *tok) { return tok ? tok->add_bos_default : 0; }

int32_t dsi_tokenizer_token_id(const dsi_tokenizer *tok, const char *token_text) {
    if (!tok || !token_text) return dsi_error(DSI_EINVAL, "dsi_tokenizer_token_id: NULL argument");
    int32_t id = dsi__vocab_find(tok, token_text, strlen(token_text));
    if (id < 0) return dsi_error(DSI_ENOTFOUND, "tokenizer: no token \"%.80s\"", token_text);
    return id;
}

const char *dsi_tokenizer_token_bytes(const dsi_tokenizer *tok, int32_t id, size_t *len) {
    if (!tok || !id_ok(tok, id)) return NULL;
    if (len) *len = tok->dec_off[id + 1] - tok->dec_off[id];
    return tok->dec_blob + tok->dec_off[id];
}

int dsi_tokenizer_is_special(const dsi_tokenizer *tok, int32_t id) {
    return tok && id_ok(tok, id) && (tok->id_flags[id] & DSI__ID_SPECIAL) != 0;
}

/* ---- streaming detokenizer ------------------------------------------------------------ */

struct dsi_detok {
    const dsi_tokenizer *tok;
    unsigned flags;
    char held[4]; /* a truncated UTF-8 prefix (at most 3 bytes) */
    size_t n_held;
    char *in, *out; /* scratch: held + token bytes, and the sanitized output */
    size_t cap;
};

int dsi_detok_create(const dsi_tokenizer *tok, unsigned flags, dsi_detok **out) {
    if (!tok || !out) return dsi_error(DSI_EINVAL, "dsi_detok_create: NULL argument");
    dsi_detok *d = calloc(1, sizeof *d);
    if (!d) return dsi_error(DSI_ENOMEM, "detok: out of memory");
    d->tok = tok;
    d->flags = flags;
    *out = d;
    return DSI_OK;
}

static int detok_emit(dsi_detok *d, const char *bytes, size_t n, int final, const char **text, size_t *len) {
    size_t need = d->n_held + n;
    if (need * 3 + 4 > d->cap) {
        size_t cap = DSI_MAX(64, 2 * (need * 3 + 4));
        char *a = realloc(d->in, cap), *b = a ? realloc(d->out, cap) : NULL;
        if (a) d->in = a;
        if (!b) return dsi_error(DSI_ENOMEM, "detok: out of memory");
        d->out = b;
        d->cap = cap;
    }
    memcpy(d->in, d->held, d->n_held);
    memcpy(d->in + d->n_held, bytes, n);
    size_t used, w = dsi__utf8_sanitize(d->in, need, final, d->out, &used);
    d->n_held = need - used; /* < 4: only a truncated valid prefix is left unread */
    memcpy(d->held, d->in + used, d->n_held);
    d->out[w] = '\0';
    *text = d->out;
    *len = w;
    return DSI_OK;
}

int dsi_detok_push(dsi_detok *d, int32_t id, const char **text, size_t *len) {
    if (!d || !text || !len) return dsi_error(DSI_EINVAL, "dsi_detok_push: NULL argument");
    *text = "";
    *len = 0;
    if (!id_ok(d->tok, id)) return dsi_error(DSI_ERANGE, "detok: id %d is not in the vocabulary", id);
    if (skip_id(d->tok, id, d->flags)) return DSI_OK;
    size_t n;
    const char *b = dsi_tokenizer_token_bytes(d->tok, id, &n);
    return detok_emit(d, b, n, 0, text, len);
}

int dsi_detok_flush(dsi_detok *d, const char **text, size_t *len) {
    if (!d || !text || !len) return dsi_error(DSI_EINVAL, "dsi_detok_flush: NULL argument");
    return detok_emit(d, "", 0, 1, text, len);
}

void dsi_detok_reset(dsi_detok *d) {
    if (d) d->n_held = 0;
}

void dsi_detok_destroy(dsi_detok *d) {
    if (!d) return;
    free(d->in);
    free(d->out);
    free(d);
}
