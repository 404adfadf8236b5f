/* Loading tokenizer.json / tokenizer_config.json into a dsi_tokenizer.
 *
 * Everything read from the files is checked: a malformed or hostile file produces
 * DSI_EFORMAT (or DSI_EUNSUPPORTED for valid components we do not implement) with a
 * message naming the field, never a crash. */
#include <cjson/cJSON.h>
#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tokenizer/tokenizer_impl.h"

enum { MAX_VOCAB = 1 << 24 };

static atomic_uint_fast64_t g_serial = 1;

static int fmt_err(const char *what) { return dsi_error(DSI_EFORMAT, "tokenizer.json: %s", what); }

static const char *jstr(const cJSON *o, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

static int jtrue(const cJSON *o, const char *key) { return cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(o, key)); }

/* Integer id in [0, MAX_VOCAB), or -1. */
static int32_t jid(const cJSON *v) {
    if (!cJSON_IsNumber(v)) return -1;
    double d = v->valuedouble;
    if (!(d >= 0 && d < MAX_VOCAB) || d != (double)(int32_t)d) return -1;
    return (int32_t)d;
}

static uint32_t pow2_at_least(size_t n) {
    uint32_t p = 16;
    while (p < n) p <<= 1;
    return p;
}

/* ---- vocabulary ------------------------------------------------------------------ */

typedef struct strref {
    const char *s;
    size_t n;
} strref;

static int build_vocab(dsi_tokenizer *tok, const cJSON *vocab, const cJSON *added) {
    int32_t max_id = -1;
    const cJSON *it;
    if (!cJSON_IsObject(vocab)) return fmt_err("model.vocab must be an object");
    cJSON_ArrayForEach(it, vocab) {
        int32_t id = jid(it);
        if (id < 0) return dsi_error(DSI_EFORMAT, "tokenizer.json: model.vocab[\"%.60s\"] is not an id in [0, %d)", it->string, MAX_VOCAB);
        if (id > max_id) max_id = id;
    }
    if (cJSON_IsNull(added)) added = NULL;
    if (added && !cJSON_IsArray(added)) return fmt_err("added_tokens must be an array");
    int n_added = added ? cJSON_GetArraySize(added) : 0;
    cJSON_ArrayForEach(it, added) {
        int32_t id = jid(cJSON_GetObjectItemCaseSensitive(it, "id"));
        if (id < 0 || !jstr(it, "content")) return fmt_err("each added_tokens entry needs an integer id and a string content");
        if (id > max_id) max_id = id;
    }
    if (max_id < 0) return fmt_err("empty vocabulary");
    tok->n_vocab = max_id + 1;
    strref *ref = calloc(tok->n_vocab, sizeof *ref);
    tok->id_flags = calloc(tok->n_vocab, 1);
    tok->str_off = calloc((size_t)tok->n_vocab + 1, sizeof *tok->str_off);
    if (!ref || !tok->id_flags || !tok->str_off) {
        free(ref);
        return dsi_error(DSI_ENOMEM, "tokenizer: out of memory for %d ids", tok->n_vocab);
    }
    int rc = DSI_OK;
    cJSON_ArrayForEach(it, vocab) {
        int32_t id = jid(it);
        if (ref[id].s) {
            rc = dsi_error(DSI_EFORMAT, "tokenizer.json: id %d appears twice in model.vocab", id);
            goto done;
        }
        ref[id].s = it->string ? it->string : "";
        ref[id].n = strlen(ref[id].s);
        tok->id_flags[id] = DSI__ID_PRESENT;
    }
    tok->added = calloc(n_added ? n_added : 1, sizeof *tok->added);
    if (!tok->added) {
        rc = dsi_error(DSI_ENOMEM, "tokenizer: out of memory");
        goto done;
    }
    cJSON_ArrayForEach(it, added) {
        int32_t id = jid(cJSON_GetObjectItemCaseSensitive(it, "id"));
        const char *content = jstr(it, "content");
        if (jtrue(it, "single_word")) {
            rc = dsi_error(DSI_EUNSUPPORTED, "tokenizer.json: added token \"%.60s\" has single_word=true (not supported)", content);
            goto done;
        }
        size_t clen = strlen(content);
        if (dsi__utf8_invalid_at(content, clen) != clen) {
            rc = fmt_err("added token content is not valid UTF-8");
            goto done;
        }
        ref[id].s = content; /* an added token's content wins over the model's spelling */
        ref[id].n = clen;
        tok->id_flags[id] = DSI__ID_PRESENT | DSI__ID_ADDED | (jtrue(it, "special") ? DSI__ID_SPECIAL : 0);
        dsi__added *a = &tok->added[tok->n_added++];
        a->content = strdup(content);
        if (!a->content) {
            rc = dsi_error(DSI_ENOMEM, "tokenizer: out of memory");
            goto done;
        }
        a->len = (uint32_t)clen;
        a->id = id;
        a->special = jtrue(it, "special");
        a->lstrip = jtrue(it, "lstrip");
        a->rstrip = jtrue(it, "rstrip");
    }
    size_t total = 0, n_present = 0;
    for (int32_t i = 0; i < tok->n_vocab; i++) {
        tok->str_off[i] = (uint32_t)total;
        total += ref[i].n;
        n_present += ref[i].s != NULL;
        if (total > UINT32_MAX / 2) {
            rc = fmt_err("vocabulary strings too large");
            goto done;
        }
    }
    tok->str_off[tok->n_vocab] = (uint32_t)total;
    tok->str_blob = malloc(total + 1);
    tok->vmap_mask = pow2_at_least(2 * n_present) - 1;
    tok->vmap = malloc(((size_t)tok->vmap_mask + 1) * sizeof *tok->vmap);
    if (!tok->str_blob || !tok->vmap) {
        rc = dsi_error(DSI_ENOMEM, "tokenizer: out of memory");
        goto done;
    }
    memset(tok->vmap, 0xff, ((size_t)tok->vmap_mask + 1) * sizeof *tok->vmap);
    for (int32_t i = 0; i < tok->n_vocab; i++)
        if (ref[i].n) memcpy(tok->str_blob + tok->str_off[i], ref[i].s, ref[i].n);
    /* vocab entries first, then added tokens, so that an added token shadows a model
     * entry with the same spelling */
    for (int pass = 0; pass < 2; pass++) {
        for (int32_t i = 0; i < tok->n_vocab; i++) {
            if (!ref[i].s || ((tok->id_flags[i] & DSI__ID_ADDED) != 0) != pass) continue;
            uint32_t h = (uint32_t)dsi__hash_bytes(ref[i].s, ref[i].n) & tok->vmap_mask;
            for (;; h = (h + 1) & tok->vmap_mask) {
                int32_t o = tok->vmap[h];
                if (o < 0) {
                    tok->vmap[h] = i;
                    break;
                }
                if ((size_t)(tok->str_off[o + 1] - tok->str_off[o]) == ref[i].n &&
                    memcmp(tok->str_blob + tok->str_off[o], ref[i].s, ref[i].n) == 0) {
                    if (!pass) {
                        rc = dsi_error(DSI_EFORMAT, "tokenizer.json: token \"%.60s\" appears twice in model.vocab", ref[i].s);
                        goto done;
                    }
                    tok->vmap[h] = i;
                    break;
                }
            }
        }
    }
done:
    free(ref);
    return rc;
}

/* ---- merges ---------------------------------------------------------------------------- */

static int add_merge(dsi_tokenizer *tok, const char *a, size_t na, const char *b, size_t nb, int32_t rank,
                     char **buf, size_t *cap) {
    int32_t ia = dsi__vocab_find(tok, a, na), ib = dsi__vocab_find(tok, b, nb);
    if (ia < 0 || ib < 0)
        return dsi_error(DSI_EFORMAT, "tokenizer.json: merge %d uses a token missing from the vocabulary (\"%.*s\" \"%.*s\")",
                         rank, (int)DSI_MIN(na, 60), a, (int)DSI_MIN(nb, 60), b);
    if (na + nb > *cap) {
        size_t c = 2 * (na + nb);
        char *nbuf = realloc(*buf, c);
        if (!nbuf) return dsi_error(DSI_ENOMEM, "tokenizer: out of memory");
        *buf = nbuf;
        *cap = c;
    }
    memcpy(*buf, a, na);
    memcpy(*buf + na, b, nb);
    int32_t merged = dsi__vocab_find(tok, *buf, na + nb);
    if (merged < 0)
        return dsi_error(DSI_EFORMAT, "tokenizer.json: merge %d result \"%.*s\" is not in the vocabulary", rank,
                         (int)DSI_MIN(na + nb, 60), *buf);
    uint64_t key = (uint64_t)(uint32_t)ia << 32 | (uint32_t)ib;
    /* open-addressing insert; a repeated pair keeps its last rank, like a Rust HashMap
     * collected from the list */
    uint64_t x = dsi__mix64(key);
    for (uint32_t i = (uint32_t)x & tok->mmask;; i = (i + 1) & tok->mmask) {
        dsi__merge *e = &tok->merges[i];
        if (e->key == UINT64_MAX || e->key == key) {
            e->key = key;
            e->rank = rank;
            e->merged = merged;
            return DSI_OK;
        }
    }
}

static int build_merges(dsi_tokenizer *tok, const cJSON *merges) {
    if (!merges || cJSON_IsNull(merges)) return DSI_OK;
    if (!cJSON_IsArray(merges)) return fmt_err("model.merges must be an array");
    int n = cJSON_GetArraySize(merges);
    tok->mmask = pow2_at_least((size_t)n + (size_t)n / 2 + 1) - 1; /* load factor <= 2/3 */
    size_t slots = (size_t)tok->mmask + 1;
    tok->merges = malloc(slots * sizeof *tok->merges);
    if (!tok->merges) return dsi_error(DSI_ENOMEM, "tokenizer: out of memory for merges");
    memset(tok->merges, 0xff, slots * sizeof *tok->merges);
    char *buf = NULL;
    size_t cap = 0;
    int32_t rank = 0;
    int rc = DSI_OK;
    const cJSON *m;
    cJSON_ArrayForEach(m, merges) {
        if (cJSON_IsString(m)) {
            const char *s = m->valuestring, *sp = strchr(s, ' ');
            if (!sp || strchr(sp + 1, ' ')) {
                rc = dsi_error(DSI_EFORMAT, "tokenizer.json: merge %d \"%.60s\" is not two tokens separated by one space", rank, s);
                break;
            }
            rc = add_merge(tok, s, (size_t)(sp - s), sp + 1, strlen(sp + 1), rank, &buf, &cap);
        } else if (cJSON_IsArray(m) && cJSON_GetArraySize(m) == 2 && cJSON_IsString(m->child) &&
                   cJSON_IsString(m->child->next)) {
            const char *a = m->child->valuestring, *b = m->child->next->valuestring;
            rc = add_merge(tok, a, strlen(a), b, strlen(b), rank, &buf, &cap);
        } else {
            rc = dsi_error(DSI_EFORMAT, "tokenizer.json: merge %d is neither \"a b\" nor [\"a\", \"b\"]", rank);
        }
        if (rc) break;
        rank++;
    }
    free(buf);
    tok->n_merges = (size_t)rank;
    if (rc) return rc;
    tok->ranks = malloc((tok->n_merges + 1) * sizeof *tok->ranks);
    if (!tok->ranks) return dsi_error(DSI_ENOMEM, "tokenizer: out of memory for merges");
    memset(tok->ranks, 0xff, (tok->n_merges + 1) * sizeof *tok->ranks);
    for (size_t i = 0; i < slots; i++) {
        const dsi__merge *e = &tok->merges[i];
        if (e->key == UINT64_MAX) continue;
        tok->ranks[e->rank] = (dsi__rank){(int32_t)(e->key >> 32), (int32_t)(uint32_t)e->key, e->merged};
    }
    return DSI_OK;
}

/* ---- pre-tokenizer ------------------------------------------------------------------------ */

static const char GPT2_PATTERN[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

static int add_split(dsi_tokenizer *tok, const char *pattern, size_t plen, int literal, int behavior, int invert) {
#ifdef DSI_HAVE_PCRE2
    dsi__split *ns = realloc(tok->splits, (tok->n_splits + 1) * sizeof *ns);
    if (!ns) return dsi_error(DSI_ENOMEM, "tokenizer: out of memory");
    tok->splits = ns;
    if (dsi__utf8_invalid_at(pattern, plen) != plen) return fmt_err("Split pattern is not valid UTF-8");
    int err;
    PCRE2_SIZE off;
    uint32_t opts = PCRE2_UTF | (literal ? PCRE2_LITERAL : PCRE2_UCP); /* LITERAL rejects UCP */
    pcre2_code *re = pcre2_compile((PCRE2_SPTR)pattern, plen, opts, &err, &off, NULL);
    if (!re) {
        PCRE2_UCHAR msg[160];
        pcre2_get_error_message(err, msg, sizeof msg);
        return dsi_error(DSI_EFORMAT, "tokenizer.json: Split regex \"%.80s\" does not compile at offset %zu: %s",
                         pattern, (size_t)off, (const char *)msg);
    }
    dsi__split *sp = &tok->splits[tok->n_splits++];
    sp->re = re;
    sp->jit = pcre2_jit_compile(re, PCRE2_JIT_COMPLETE) == 0;
    sp->behavior = behavior;
    sp->invert = invert;
    return DSI_OK;
#else
    return dsi_error(DSI_EUNSUPPORTED, "tokenizer: built without PCRE2, cannot run Split pre-tokenizers");
#endif
}

static int parse_pretok(dsi_tokenizer *tok, const cJSON *p, int depth) {
    if (!p || cJSON_IsNull(p)) return DSI_OK;
    const char *type = jstr(p, "type");
    if (!type || depth > 8) return fmt_err("pre_tokenizer without a type");
    if (tok->byte_level) return dsi_error(DSI_EUNSUPPORTED, "tokenizer.json: pre-tokenizer step after ByteLevel is not supported");
    if (!strcmp(type, "Sequence")) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(p, "pretokenizers"), *it;
        if (!cJSON_IsArray(list)) return fmt_err("Sequence pre_tokenizer without a pretokenizers array");
        cJSON_ArrayForEach(it, list) {
            int rc = parse_pretok(tok, it, depth + 1);
            if (rc) return rc;
        }
        return DSI_OK;
    }
    if (!strcmp(type, "Split")) {
        const cJSON *pat = cJSON_GetObjectItemCaseSensitive(p, "pattern");
        const char *re = jstr(pat, "Regex"), *lit = jstr(pat, "String"), *beh = jstr(p, "behavior");
        if (!re && !lit) return fmt_err("Split pre_tokenizer needs pattern.Regex or pattern.String");
        static const char *names[] = {"Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous"};
        int b = -1;
        for (int i = 0; beh && i < 5; i++)
            if (!strcmp(beh, names[i])) b = i;
        if (b < 0) return dsi_error(DSI_EFORMAT, "tokenizer.json: Split behavior \"%.40s\" is not one of Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous", beh ? beh : "(missing)");
        const char *pattern = re ? re : lit;
        return add_split(tok, pattern, strlen(pattern), re == NULL, b, jtrue(p, "invert"));
    }
    if (!strcmp(type, "Digits")) { /* numeric characters (Unicode N) alone, or in runs */
        const char *re = jtrue(p, "individual_digits") ? "\\p{N}" : "\\p{N}+";
        return add_split(tok, re, strlen(re), 0, DSI__SPLIT_ISOLATED, 0);
    }
    if (!strcmp(type, "ByteLevel")) {
        if (jtrue(p, "add_prefix_space"))
            return dsi_error(DSI_EUNSUPPORTED, "tokenizer.json: ByteLevel add_prefix_space=true is not supported");
        const cJSON *ur = cJSON_GetObjectItemCaseSensitive(p, "use_regex");
        if (!ur || cJSON_IsTrue(ur)) {
            int rc = add_split(tok, GPT2_PATTERN, sizeof GPT2_PATTERN - 1, 0, DSI__SPLIT_ISOLATED, 0);
            if (rc) return rc;
        }
        tok->byte_level = 1;
        return DSI_OK;
    }
    return dsi_error(DSI_EUNSUPPORTED, "tokenizer.json: pre_tokenizer type \"%.40s\" is not supported", type);
}

/* ---- post-processor ------------------------------------------------------------------------ */

static int parse_template(dsi_tokenizer *tok, const cJSON *p) {
    const cJSON *single = cJSON_GetObjectItemCaseSensitive(p, "single"), *it;
    const cJSON *specials = cJSON_GetObjectItemCaseSensitive(p, "special_tokens");
    if (!cJSON_IsArray(single)) return fmt_err("TemplateProcessing without a single template");
    int n = cJSON_GetArraySize(single), seen_seq = 0;
    tok->prefix_ids = calloc(n + 1, sizeof(int32_t));
    tok->suffix_ids = calloc(n + 1, sizeof(int32_t));
    if (!tok->prefix_ids || !tok->suffix_ids) return dsi_error(DSI_ENOMEM, "tokenizer: out of memory");
    cJSON_ArrayForEach(it, single) {
        const cJSON *sp = cJSON_GetObjectItemCaseSensitive(it, "SpecialToken");
        if (cJSON_GetObjectItemCaseSensitive(it, "Sequence")) {
            seen_seq = 1;
            continue;
        }
        const char *name = jstr(sp, "id");
        if (!name) return fmt_err("TemplateProcessing item is neither SpecialToken nor Sequence");
        const cJSON *ids = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(specials, name), "ids");
        if (!cJSON_IsArray(ids) || cJSON_GetArraySize(ids) != 1)
            return dsi_error(DSI_EFORMAT, "tokenizer.json: TemplateProcessing special token \"%.60s\" needs exactly one id in special_tokens", name);
        int32_t id = jid(ids->child);
        if (id < 0 || id >= tok->n_vocab || !(tok->id_flags[id] & DSI__ID_PRESENT))
            return dsi_error(DSI_EFORMAT, "tokenizer.json: TemplateProcessing special token \"%.60s\" has an id outside the vocabulary", name);
        if (seen_seq) tok->suffix_ids[tok->n_suffix++] = id;
        else tok->prefix_ids[tok->n_prefix++] = id;
    }
    return DSI_OK;
}

static int parse_postproc(dsi_tokenizer *tok, const cJSON *p, int depth) {
    if (!p || cJSON_IsNull(p)) return DSI_OK;
    const char *type = jstr(p, "type");
    if (!type || depth > 8) return fmt_err("post_processor without a type");
    if (!strcmp(type, "ByteLevel")) return DSI_OK; /* offsets only */
    if (!strcmp(type, "TemplateProcessing")) {
        if (tok->prefix_ids) return dsi_error(DSI_EUNSUPPORTED, "tokenizer.json: more than one TemplateProcessing");
        return parse_template(tok, p);
    }
    if (!strcmp(type, "Sequence")) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(p, "processors"), *it;
        if (!cJSON_IsArray(list)) return fmt_err("Sequence post_processor without processors");
        cJSON_ArrayForEach(it, list) {
            int rc = parse_postproc(tok, it, depth + 1);
            if (rc) return rc;
        }
        return DSI_OK;
    }
    return dsi_error(DSI_EUNSUPPORTED, "tokenizer.json: post_processor type \"%.40s\" is not supported", type);
}

/* 1 for a ByteLevel decoder, 0 for none; error for anything else. */
static int parse_decoder(const cJSON *d, int *byte_level) {
    *byte_level = 0;
    if (!d || cJSON_IsNull(d)) return DSI_OK;
    const char *type = jstr(d, "type");
    if (type && !strcmp(type, "ByteLevel")) {
        *byte_level = 1;
        return DSI_OK;
    }
    return dsi_error(DSI_EUNSUPPORTED, "tokenizer.json: decoder type \"%.40s\" is not supported", type ? type : "(missing)");
}

/* Bytes each id decodes to: added tokens as written; model tokens through the
 * byte-level alphabet, or as written when a character is outside it (the rule of the
 * `tokenizers` ByteLevel decoder). */
static int build_decoded(dsi_tokenizer *tok, int byte_level) {
    size_t total = tok->str_off[tok->n_vocab];
    tok->dec_blob = malloc(total + 1);
    tok->dec_off = malloc(((size_t)tok->n_vocab + 1) * sizeof *tok->dec_off);
    if (!tok->dec_blob || !tok->dec_off) return dsi_error(DSI_ENOMEM, "tokenizer: out of memory");
    size_t o = 0;
    for (int32_t id = 0; id < tok->n_vocab; id++) {
        const char *s = tok->str_blob + tok->str_off[id];
        size_t n = tok->str_off[id + 1] - tok->str_off[id], start = o;
        tok->dec_off[id] = (uint32_t)o;
        int raw = !byte_level || (tok->id_flags[id] & DSI__ID_ADDED);
        for (size_t i = 0; !raw && i < n;) {
            size_t l = dsi__utf8_len(s + i, n - i);
            uint32_t cp = (unsigned char)s[i];
            if (l == 2) cp = (cp & 0x1F) << 6 | ((unsigned char)s[i + 1] & 0x3F);
            else if (l != 1) cp = UINT32_MAX;
            int b = dsi__bytelevel_byte(cp);
            if (b < 0) raw = 1;
            else tok->dec_blob[o++] = (char)b;
            i += l;
        }
        if (raw) {
            o = start;
            memcpy(tok->dec_blob + o, s, n);
            o += n;
        }
    }
    tok->dec_off[tok->n_vocab] = (uint32_t)o;
    return DSI_OK;
}

static int build_trie(dsi_tokenizer *tok) {
    size_t nodes = 1;
    for (int i = 0; i < tok->n_added; i++) nodes += tok->added[i].len;
    tok->trie = malloc(nodes * sizeof *tok->trie);
    if (!tok->trie) return dsi_error(DSI_ENOMEM, "tokenizer: out of memory");
    tok->n_trie = 1;
    tok->trie[0] = (dsi__trie_node){-1, -1, -1, 0};
    for (int i = 0; i < tok->n_added; i++) {
        const dsi__added *a = &tok->added[i];
        if (a->len == 0) continue;
        int32_t node = 0;
        for (uint32_t j = 0; j < a->len; j++) {
            uint8_t b = (uint8_t)a->content[j];
            int32_t c = tok->trie[node].child;
            while (c >= 0 && tok->trie[c].byte != b) c = tok->trie[c].sibling;
            if (c < 0) {
                c = tok->n_trie++;
                tok->trie[c] = (dsi__trie_node){-1, tok->trie[node].child, -1, b};
                tok->trie[node].child = c;
            }
            node = c;
        }
        tok->trie[node].added = i; /* a later duplicate wins, as in a map */
    }
    return DSI_OK;
}

/* ---- tokenizer_config.json -------------------------------------------------------------- */

/* bos_token / eos_token: a string or an AddedToken object {"content": ...}. */
static const char *config_token(const cJSON *cfg, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(cfg, key);
    if (cJSON_IsString(v)) return v->valuestring;
    return jstr(v, "content");
}

static int parse_config(dsi_tokenizer *tok, const char *json, size_t len) {
    const char *end = NULL;
    cJSON *cfg = cJSON_ParseWithLengthOpts(json, len, &end, 0);
    if (!cJSON_IsObject(cfg)) {
        cJSON_Delete(cfg);
        return dsi_error(DSI_EFORMAT, "tokenizer_config.json: not a JSON object (error near byte %zu)",
                         end && end >= json ? (size_t)(end - json) : (size_t)0);
    }
    int rc = DSI_OK;
    const char *names[2] = {"bos_token", "eos_token"};
    for (int k = 0; k < 2; k++) {
        const char *t = config_token(cfg, names[k]);
        if (!t) continue;
        int32_t id = dsi__vocab_find(tok, t, strlen(t));
        if (id < 0) {
            rc = dsi_error(DSI_EFORMAT, "tokenizer_config.json: %s \"%.60s\" is not a token of tokenizer.json", names[k], t);
            goto done;
        }
        char *copy = strdup(t);
        if (!copy) {
            rc = dsi_error(DSI_ENOMEM, "tokenizer: out of memory");
            goto done;
        }
        if (k == 0) tok->bos_id = id, tok->bos_text = copy;
        else tok->eos_id = id, tok->eos_text = copy;
    }
    const cJSON *ab = cJSON_GetObjectItemCaseSensitive(cfg, "add_bos_token");
    if (cJSON_IsBool(ab)) tok->add_bos_default = cJSON_IsTrue(ab);
    const cJSON *ct = cJSON_GetObjectItemCaseSensitive(cfg, "chat_template"), *it;
    const char *tmpl = cJSON_IsString(ct) ? ct->valuestring : NULL;
    const cJSON *list = cJSON_IsArray(ct) ? ct : NULL;
    cJSON_ArrayForEach(it, list) { /* [{name, template}]: take "default" */
        const char *name = jstr(it, "name");
        if (name && !strcmp(name, "default")) tmpl = jstr(it, "template");
    }
    if (tmpl) {
        tok->chat_template = strdup(tmpl);
        if (!tok->chat_template) rc = dsi_error(DSI_ENOMEM, "tokenizer: out of memory");
        else tok->chat_style = dsi__chat_style_of(tmpl, &tok->chat_fingerprint);
    }
done:
    cJSON_Delete(cfg);
    return rc;
}

/* null, or a Sequence of nothing but such (DeepSeek-V3 ships an empty Sequence). */
static int normalizer_is_noop(const cJSON *n, int depth) {
    if (!n || cJSON_IsNull(n)) return 1;
    const char *type = jstr(n, "type");
    const cJSON *list = cJSON_GetObjectItemCaseSensitive(n, "normalizers"), *it;
    if (!type || strcmp(type, "Sequence") || !cJSON_IsArray(list) || depth > 8) return 0;
    cJSON_ArrayForEach(it, list) if (!normalizer_is_noop(it, depth + 1)) return 0;
    return 1;
}

/* ---- entry points ------------------------------------------------------------------------- */

static int load_tokenizer_json(dsi_tokenizer *tok, const char *json, size_t len) {
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(json, len, &end, 0);
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return dsi_error(DSI_EFORMAT, "tokenizer.json: not a JSON object (error near byte %zu)",
                         end && end >= json ? (size_t)(end - json) : (size_t)0);
    }
    int rc = DSI_OK, dec_bl = 0;
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
    const char *mtype = jstr(model, "type");
    const cJSON *norm = cJSON_GetObjectItemCaseSensitive(root, "normalizer");
    const cJSON *drop = cJSON_GetObjectItemCaseSensitive(model, "dropout");
    const char *csp = jstr(model, "continuing_subword_prefix"), *eow = jstr(model, "end_of_word_suffix");
    if (!cJSON_IsObject(model)) rc = fmt_err("no model object");
    else if (mtype && strcmp(mtype, "BPE"))
        rc = dsi_error(DSI_EUNSUPPORTED, "tokenizer.json: model type \"%.40s\" is not supported (BPE only)", mtype);
    else if (!normalizer_is_noop(norm, 0))
        rc = dsi_error(DSI_EUNSUPPORTED, "tokenizer.json: normalizers are not supported (only null or an empty Sequence)");
    else if ((cJSON_IsNumber(drop) && drop->valuedouble > 0) || (csp && *csp) || (eow && *eow) ||
             jtrue(model, "byte_fallback"))
        rc = dsi_error(DSI_EUNSUPPORTED, "tokenizer.json: BPE dropout, subword affixes and byte_fallback are not supported");
    if (!rc) rc = build_vocab(tok, cJSON_GetObjectItemCaseSensitive(model, "vocab"),
                              cJSON_GetObjectItemCaseSensitive(root, "added_tokens"));
    if (!rc) rc = build_merges(tok, cJSON_GetObjectItemCaseSensitive(model, "merges"));
    if (!rc) rc = parse_pretok(tok, cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer"), 0);
    if (!rc) rc = parse_postproc(tok, cJSON_GetObjectItemCaseSensitive(root, "post_processor"), 0);
    if (!rc) rc = parse_decoder(cJSON_GetObjectItemCaseSensitive(root, "decoder"), &dec_bl);
    if (!rc) rc = build_decoded(tok, dec_bl);
    if (!rc) rc = build_trie(tok);
    if (!rc) {
        tok->ignore_merges = jtrue(model, "ignore_merges");
        const char *unk = jstr(model, "unk_token");
        if (unk && (tok->unk_id = dsi__vocab_find(tok, unk, strlen(unk))) < 0)
            rc = dsi_error(DSI_EFORMAT, "tokenizer.json: unk_token \"%.60s\" is not in the vocabulary", unk);
        for (int b = 0; b < 256; b++) {
            char u[3];
            uint32_t cp = dsi__bytelevel_cp((unsigned)b);
            size_t l = 1;
            if (cp < 0x80) u[0] = (char)cp;
            else u[0] = (char)(0xC0 | (cp >> 6)), u[1] = (char)(0x80 | (cp & 0x3F)), l = 2;
            tok->byte_id[b] = dsi__vocab_find(tok, u, l);
        }
    }
    cJSON_Delete(root);
    return rc;
}

int dsi_tokenizer_load_json(const char *tokenizer_json, size_t tokenizer_len, const char *config_json,
                            size_t config_len, dsi_tokenizer **out) {
    if (!out) return dsi_error(DSI_EINVAL, "dsi_tokenizer_load_json: out is NULL");
    *out = NULL;
    if (!tokenizer_json) return dsi_error(DSI_EINVAL, "dsi_tokenizer_load_json: no tokenizer.json text");
    dsi_tokenizer *tok = calloc(1, sizeof *tok);
    if (!tok) return dsi_error(DSI_ENOMEM, "tokenizer: out of memory");
    tok->serial = atomic_fetch_add(&g_serial, 1);
    tok->bos_id = tok->eos_id = tok->unk_id = -1;
    int rc = load_tokenizer_json(tok, tokenizer_json, tokenizer_len);
    if (!rc && config_json) rc = parse_config(tok, config_json, config_len);
    if (!rc && tok->bos_id < 0 && tok->n_prefix > 0) tok->bos_id = tok->prefix_ids[0];
    if (!rc && !config_json) tok->add_bos_default = tok->bos_id >= 0;
    if (!rc && !tok->prefix_ids && tok->bos_id >= 0) { /* no template: ADD_BOS prepends BOS */
        tok->prefix_ids = malloc(sizeof(int32_t));
        if (!tok->prefix_ids) rc = dsi_error(DSI_ENOMEM, "tokenizer: out of memory");
        else tok->prefix_ids[0] = tok->bos_id, tok->n_prefix = 1;
    }
    if (rc) {
        dsi_tokenizer_destroy(tok);
        return rc;
    }
    *out = tok;
    return DSI_OK;
}

static int read_file(const char *path, char **buf, size_t *len) {
    FILE *f = fopen(path, "rb");
    *buf = NULL;
    if (!f) return dsi_error(errno == ENOENT ? DSI_ENOTFOUND : DSI_EIO, "%s: %s", path, strerror(errno));
    size_t cap = 1 << 16, n = 0;
    char *b = malloc(cap);
    while (b) {
        n += fread(b + n, 1, cap - n, f);
        if (n < cap) break;
        char *nb = realloc(b, cap *= 2);
        if (!nb) free(b);
        b = nb;
    }
    int bad = ferror(f);
    fclose(f);
    if (!b) return dsi_error(DSI_ENOMEM, "%s: out of memory", path);
    if (bad) {
        free(b);
        return dsi_error(DSI_EIO, "%s: read error", path);
    }
    b[n] = '\0'; /* the loop stops with n < cap */
    *buf = b;
    *len = n;
    return DSI_OK;
}

int dsi_tokenizer_load(const char *dir, dsi_tokenizer **out) {
    if (!dir || !out) return dsi_error(DSI_EINVAL, "dsi_tokenizer_load: NULL argument");
    *out = NULL;
    size_t dl = strlen(dir);
    char *path = malloc(dl + 32);
    if (!path) return dsi_error(DSI_ENOMEM, "tokenizer: out of memory");
    char *tj = NULL, *cj = NULL;
    size_t tl = 0, cl = 0;
    snprintf(path, dl + 32, "%s/tokenizer.json", dir);
    int rc = read_file(path, &tj, &tl);
    if (!rc) {
        snprintf(path, dl + 32, "%s/tokenizer_config.json", dir);
        rc = read_file(path, &cj, &cl);
        if (rc == DSI_ENOTFOUND) rc = DSI_OK; /* optional */
    }
    if (!rc) {
        rc = dsi_tokenizer_load_json(tj, tl, cj, cl, out);
        if (rc) dsi_error_prefix(rc, "%s", dir);
    }
    if (!rc && !(*out)->chat_template) { /* newer checkpoints ship the template on its own */
        char *jt = NULL;
        size_t jl = 0;
        snprintf(path, dl + 32, "%s/chat_template.jinja", dir);
        rc = read_file(path, &jt, &jl);
        if (rc == DSI_ENOTFOUND) rc = DSI_OK;
        else if (!rc && (dsi__utf8_invalid_at(jt, jl) != jl || memchr(jt, 0, jl)))
            rc = dsi_error(DSI_EFORMAT, "%s: not UTF-8 text", path);
        else if (!rc) {
            (*out)->chat_template = jt;
            (*out)->chat_style = dsi__chat_style_of(jt, &(*out)->chat_fingerprint);
            jt = NULL;
        }
        free(jt);
        if (rc) {
            dsi_tokenizer_destroy(*out);
            *out = NULL;
        }
    }
    free(tj);
    free(cj);
    free(path);
    return rc;
}

void dsi_tokenizer_destroy(dsi_tokenizer *tok) {
    if (!tok) return;
    free(tok->str_blob);
    free(tok->str_off);
    free(tok->dec_blob);
    free(tok->dec_off);
    free(tok->id_flags);
    free(tok->vmap);
    free(tok->merges);
    free(tok->ranks);
#ifdef DSI_HAVE_PCRE2
    for (int i = 0; i < tok->n_splits; i++) pcre2_code_free(tok->splits[i].re);
#endif
    free(tok->splits);
    for (int i = 0; i < tok->n_added; i++) free(tok->added[i].content);
    free(tok->added);
    free(tok->trie);
    free(tok->prefix_ids);
    free(tok->suffix_ids);
    free(tok->bos_text);
    free(tok->eos_text);
    free(tok->chat_template);
    free(tok);
}
