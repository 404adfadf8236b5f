/* Internal layout of a loaded tokenizer, shared by the tokenizer/ sources. */
#ifndef DSI_TOKENIZER_IMPL_H
#define DSI_TOKENIZER_IMPL_H

#include <stdint.h>

#include "dsinfer/tokenizer.h"

#ifdef DSI_HAVE_PCRE2
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#endif

/* Split behaviours of the `tokenizers` Split pre-tokenizer. */
enum { DSI__SPLIT_REMOVED, DSI__SPLIT_ISOLATED, DSI__SPLIT_MERGED_PREV, DSI__SPLIT_MERGED_NEXT, DSI__SPLIT_CONTIGUOUS };

typedef struct dsi__split {
#ifdef DSI_HAVE_PCRE2
    pcre2_code *re;
#else
    void *re;
#endif
    int jit;      /* 1 when JIT-compiled: match with pcre2_jit_match */
    int behavior; /* DSI__SPLIT_* */
    int invert;   /* the pieces are the non-matches */
} dsi__split;

/* One added token (matched in raw text before pre-tokenization). */
typedef struct dsi__added {
    char *content;
    uint32_t len;
    int32_t id;
    uint8_t special, lstrip, rstrip;
} dsi__added;

/* Byte trie over added-token contents, first-child/next-sibling linked. */
typedef struct dsi__trie_node {
    int32_t child, sibling;
    int32_t added; /* index into added[] when a token ends here, else -1 */
    uint8_t byte;
} dsi__trie_node;

typedef struct dsi__merge {
    uint64_t key;
    int32_t rank, merged;
} dsi__merge;

typedef struct dsi__rank {
    int32_t left, right, merged;
} dsi__rank;

/* chat_style: none, unknown, or DSI__CHAT_FLAVOR0 + index into chat.c's FLAVORS */
enum { DSI__CHAT_NONE = 0, DSI__CHAT_UNKNOWN = 1, DSI__CHAT_FLAVOR0 = 2 };

struct dsi_tokenizer {
    uint64_t serial; /* unique per load; keys the per-thread caches */
    int32_t n_vocab;

    /* Token strings as written in tokenizer.json, by id (str_off[id+1]-str_off[id] bytes). */
    char *str_blob;
    uint32_t *str_off;
    /* Bytes each id decodes to. */
    char *dec_blob;
    uint32_t *dec_off;
    uint8_t *id_flags; /* DSI__ID_* */

    /* token string -> id: open addressing, -1 empty */
    int32_t *vmap;
    uint32_t vmap_mask;

    /* (left id << 32 | right id) -> rank, merged id: open addressing, key UINT64_MAX
     * empty; one 16-byte slot so a lookup touches one cache line */
    dsi__merge *merges;
    uint32_t mmask;
    size_t n_merges;
    /* by rank: the pair and its result ({-1,-1,-1} for a rank shadowed by a later
     * duplicate), so a popped heap entry is validated without a hash probe */
    dsi__rank *ranks;

    int byte_level;      /* pieces are mapped byte-wise to the GPT-2 alphabet before BPE */
    int32_t byte_id[256];/* byte-level: id of the single-byte token, -1 if absent */
    int ignore_merges;
    int32_t unk_id;

    dsi__split *splits;
    int n_splits;

    dsi__added *added;
    int n_added;
    dsi__trie_node *trie;
    int n_trie;

    int32_t *prefix_ids, *suffix_ids; /* post-processor template for one sequence */
    int n_prefix, n_suffix;

    int32_t bos_id, eos_id;
    char *bos_text, *eos_text;
    int add_bos_default;
    char *chat_template;
    int chat_style; /* DSI__CHAT_* */
    uint64_t chat_fingerprint;
};

enum { DSI__ID_PRESENT = 1, DSI__ID_ADDED = 2, DSI__ID_SPECIAL = 4 };

/* ---- utf8.c ---- */
/* Byte offset of the first invalid UTF-8 sequence in s[0..n), or n when all valid. */
size_t dsi__utf8_invalid_at(const char *s, size_t n);
/* Copies s[0..n) to out (capacity >= 3*n) with each maximal invalid subpart replaced
 * by U+FFFD. When `final` is 0 a trailing truncated-but-valid prefix is left unread.
 * Returns bytes written; *consumed gets bytes of s read. */
size_t dsi__utf8_sanitize(const char *s, size_t n, int final, char *out, size_t *consumed);
/* Length of the UTF-8 sequence starting at s (1 for invalid bytes), bounded by n. */
size_t dsi__utf8_len(const char *s, size_t n);

/* ---- bpe.c ---- */
/* GPT-2 byte-level alphabet: the code point byte b is written as, and its inverse
 * (-1 for code points that are not in the alphabet). */
uint32_t dsi__bytelevel_cp(unsigned b);
int dsi__bytelevel_byte(uint32_t cp);
uint64_t dsi__hash_bytes(const char *s, size_t n);
uint64_t dsi__mix64(uint64_t x);
int32_t dsi__vocab_find(const dsi_tokenizer *tok, const char *s, size_t n);
/* Looks up a merge of (a, b); returns rank or -1, *merged gets the new id. */
int32_t dsi__merge_find(const dsi_tokenizer *tok, int32_t a, int32_t b, int32_t *merged);

/* Per-thread scratch and word cache, keyed by tok->serial. */
typedef struct dsi__tls dsi__tls;
dsi__tls *dsi__tls_get(const dsi_tokenizer *tok);

/* Growable id vector. */
typedef struct dsi__ids {
    int32_t *v;
    size_t n, cap;
} dsi__ids;
int dsi__ids_push(dsi__ids *a, const int32_t *ids, size_t n);

/* Algorithms for encoding one pre-tokenized word (the bench and tests compare them). */
enum { DSI__BPE_HEAP = 0, DSI__BPE_NAIVE = 1 };
/* Appends the ids of word w[0..n) to out. use_cache: consult/update the thread cache. */
int dsi__bpe_word(const dsi_tokenizer *tok, dsi__tls *tls, const char *w, size_t n, int algo, int use_cache,
                  dsi__ids *out);

/* ---- pretok.c ---- */
/* Calls `emit` on each pre-tokenized word of text[0..n) (valid UTF-8, no added tokens). */
typedef int (*dsi__word_fn)(void *ctx, const char *w, size_t n);
int dsi__pretokenize(const dsi_tokenizer *tok, dsi__tls *tls, const char *text, size_t n, dsi__word_fn emit,
                     void *ctx);
/* Finds the leftmost-longest added token in text[from..n); returns its index in
 * tok->added or -1; *start, *end get the matched span including lstrip/rstrip
 * whitespace. */
int dsi__find_added(const dsi_tokenizer *tok, const char *text, size_t n, size_t from, size_t *start,
                    size_t *end);
/* Encoding with explicit algorithm choices (bench/tests). */
int dsi__encode_ex(const dsi_tokenizer *tok, const char *text, size_t len, unsigned flags, int algo,
                   int use_cache, int32_t **ids, size_t *n);

/* tls scratch accessors used by pretok.c */
#ifdef DSI_HAVE_PCRE2
pcre2_match_data *dsi__tls_match_data(dsi__tls *tls, int split);
pcre2_match_context *dsi__tls_match_context(dsi__tls *tls);
#endif

/* ---- chat.c ---- */
uint64_t dsi__chat_fingerprint(const char *tmpl);
int dsi__chat_style_of(const char *tmpl, uint64_t *fingerprint);

#endif
